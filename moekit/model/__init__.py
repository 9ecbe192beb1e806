"""The moekit model: attention (MHA/GQA/MQA + RoPE), dense and MoE MLPs, the transformer."""

from moekit.model.moe import MoE, RoutingInfo
from moekit.model.transformer import ModelOutput, Transformer

__all__ = ["MoE", "ModelOutput", "RoutingInfo", "Transformer"]
