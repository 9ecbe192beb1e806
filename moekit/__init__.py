"""moekit: train, serve and plan GPT-4-style sparse Mixture-of-Experts language models."""

from moekit.config import ModelConfig
from moekit.presets import PRESETS, get_preset

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "get_preset"]
