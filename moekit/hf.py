"""Load and save Hugging Face checkpoints (Llama / Mistral dense, Mixtral MoE) as moekit models.

    model = load_hf("Mixtral-8x7B-v0.1", dtype=torch.bfloat16)  # a moekit Transformer, in eval mode
    model.hf_source.tokenizer                                     # its tokenizer.json, or None
    save_hf(model, "out", tokenizer=model.hf_source.tokenizer)   # Hub layout, loadable by transformers

A folder holds config.json and safetensors weights: `model.safetensors`, or shards listed in
`model.safetensors.index.json`. config.json is read in both forms in the wild: as published on the
Hub (`rope_theta` / `rope_scaling` at the top level) and as transformers 5 writes it
(`rope_parameters`). Mixtral experts are read in both layouts: the Hub's one-matrix-per-expert
`block_sparse_moe.experts.{e}.w1.weight` (which transformers 5 also writes, reversing its
conversion_mapping.py on save) and transformers 5's fused `mlp.experts.gate_up_proj` (E, 2F, D) /
`down_proj` (E, D, F). Saving always writes the Hub layout, which transformers 4.x, 5.x and vLLM read.

Loading builds the model on the meta device and assigns tensors read shard by shard, so peak memory
stays near one copy of the weights. Pickle files (pytorch_model.bin) are never read.
Shape legend: V vocabulary, D d_model, E experts, F expert hidden size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moekit.config import ModelConfig
from moekit.model.transformer import Transformer
from moekit.util import read_config_json

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
# transformers' defaults for keys a config.json may leave out (models/*/configuration_*.py, v5).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 1e4, "sliding_window": None},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 131_072, "rope_theta": 1e4,
                "sliding_window": 4096},
    "mixtral": {"rms_norm_eps": 1e-5, "max_position_embeddings": 131_072, "rope_theta": 1e6,
                "sliding_window": None, "router_aux_loss_coef": 0.001},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # kept from a loaded config on save


# ---- config.json <-> ModelConfig ---------------------------------------------------------------
def _rope_from_hf(d: dict[str, Any], model_type: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, moekit rope_scaling) with transformers 5's priorities (modeling_rope_utils.py):
    a top-level `rope_scaling` replaces `rope_parameters`; theta comes from the dict, then the top level."""
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"config.json: unsupported rope_scaling/rope_parameters {params!r} (moekit needs one "
                         "global RoPE, not one per layer type)")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta") or d.get("rope_theta") or _DEFAULTS[model_type]["rope_theta"]
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported (moekit rotates the whole head)")
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ("linear", "llama3"):
        raise ValueError(f"config.json: RoPE type {rope_type!r} is not supported; moekit implements "
                         "'default', 'linear' and 'llama3'")
    if "factor" not in params:
        raise ValueError(f"config.json: RoPE type {rope_type!r} needs a 'factor'")
    scaling: dict[str, Any] = {"rope_type": rope_type, "factor": float(params["factor"])}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ValueError(f"config.json: RoPE type 'llama3' needs {key!r}")
            scaling[key] = float(params[key])
        # transformers falls back to max_position_embeddings (standardize_rope_params).
        scaling["original_max_position_embeddings"] = int(
            params.get("original_max_position_embeddings") or d.get("max_position_embeddings")
            or _DEFAULTS[model_type]["max_position_embeddings"])
    return float(theta), scaling


def config_from_hf(d: dict[str, Any], name: str | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama, Mistral or Mixtral config.json (as a dict)."""
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"config.json: unsupported model_type {model_type!r}; moekit reads "
                         f"{', '.join(ARCHITECTURES)} (causal LMs with SwiGLU MLPs and RMSNorm)")
    defaults = _DEFAULTS[model_type]
    arch = d.get("architectures") or [ARCHITECTURES[model_type]]
    if arch != [ARCHITECTURES[model_type]]:
        raise ValueError(f"config.json: architectures {arch} are not supported; moekit reads "
                         f"[{ARCHITECTURES[model_type]!r}] for model_type {model_type!r}")
    if d.get("quantization_config"):
        qc = d["quantization_config"]
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else qc
        raise ValueError(f"config.json: quantized checkpoints ({method}) are not supported; use the "
                         "unquantized bf16/fp16/fp32 weights")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not supported; Llama/Mixtral use "
                         "'silu' (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise ValueError(f"config.json: {key}=true is not supported (moekit's SwiGLU models have no biases)")
    is_moe = model_type == "mixtral"
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    required += ["num_local_experts", "num_experts_per_tok"] if is_moe else []
    for key in required:
        if not isinstance(d.get(key), int) or isinstance(d[key], bool) or d[key] < 1:
            raise ValueError(f"config.json: {key} must be a positive integer, got {d.get(key)!r}")
    if is_moe and d["num_local_experts"] < 2:
        raise ValueError("config.json: num_local_experts must be >= 2 for a Mixtral (moekit maps 1 expert "
                         "to a dense model; save it as Llama)")
    max_pos = d.get("max_position_embeddings") or defaults["max_position_embeddings"]
    window = d.get("sliding_window", defaults["sliding_window"])
    for key, value in (("max_position_embeddings", max_pos), ("sliding_window", window or 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
    if window is not None and window < max_pos:
        raise ValueError(f"config.json: sliding_window={window} < max_position_embeddings={max_pos}, and moekit "
                         "has no sliding-window attention; set max_position_embeddings to at most "
                         f"{window} (outputs are then exact) or sliding_window to null")
    theta, scaling = _rope_from_hf(d, model_type)
    fields: dict[str, Any] = {
        "name": name or Path(str(d.get("_name_or_path") or model_type)).name,
        "vocab_size": d["vocab_size"], "n_layer": d["num_hidden_layers"], "d_model": d["hidden_size"],
        "n_head": d["num_attention_heads"], "n_kv_head": d.get("num_key_value_heads") or d["num_attention_heads"],
        "head_dim": d.get("head_dim") or 0, "d_ff": d["intermediate_size"], "mlp": "swiglu", "norm": "rmsnorm",
        "norm_eps": float(d.get("rms_norm_eps") or defaults["rms_norm_eps"]), "rope_theta": theta,
        "rope_scaling": scaling, "max_seq_len": max_pos, "tie_embeddings": bool(d.get("tie_word_embeddings")),
        "init_std": float(d.get("initializer_range") or 0.02),
    }
    if is_moe:
        fields.update(n_expert=d["num_local_experts"], top_k=d["num_experts_per_tok"],
                      aux_loss_coef=float(d.get("router_aux_loss_coef", defaults["router_aux_loss_coef"])))
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"config.json ({model_type}) does not describe a valid model: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers config.json dict: LlamaConfig for a dense model, MixtralConfig for an MoE model.

    RoPE is written in the Hub form (top-level rope_theta / rope_scaling), which transformers 4.x and
    5.x both read. The router z-loss coefficient has no Hugging Face field and is not written.
    """
    problems = []
    if cfg.mlp != "swiglu":
        problems.append(f"mlp={cfg.mlp!r} (Llama and Mixtral use a SwiGLU MLP)")
    if cfg.norm != "rmsnorm":
        problems.append(f"norm={cfg.norm!r} (Llama and Mixtral use RMSNorm)")
    if cfg.bias:
        problems.append("bias=True (Llama and Mixtral have no biases)")
    if cfg.is_moe and cfg.moe_every != 1:
        problems.append(f"moe_every={cfg.moe_every} (Mixtral has experts in every layer)")
    if cfg.is_moe and cfg.capacity_factor > 0:
        problems.append(f"capacity_factor={cfg.capacity_factor} (Mixtral is dropless)")
    if problems:
        raise ValueError(f"model {cfg.name!r} cannot be written as a Hugging Face Llama/Mixtral: "
                         + "; ".join(problems))
    model_type = "mixtral" if cfg.is_moe else "llama"
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
        "intermediate_size": cfg.d_ff if cfg.is_moe else cfg.dense_d_ff,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "attention_dropout": 0.0,
    }
    if cfg.is_moe:
        d.update(num_local_experts=cfg.n_expert, num_experts_per_tok=cfg.top_k, sliding_window=None,
                 router_aux_loss_coef=cfg.aux_loss_coef, output_router_logits=False, router_jitter_noise=0.0)
    else:
        d.update(attention_bias=False, mlp_bias=False)
    return d


# ---- tensor names: Hugging Face <-> moekit -------------------------------------------------------
@dataclass(frozen=True)
class _Piece:
    """Where (part of) one Hugging Face tensor goes in the moekit state dict."""

    target: str  # moekit state-dict name
    shape: tuple[int, ...]  # the Hugging Face tensor's shape
    expert: int | None = None  # Hub per-expert tensor: moekit target[expert]
    half: int | None = None  # fused gate_up_proj (E, 2F, D): 0 = gate rows (w1), 1 = up rows (w3)


def _plan(cfg: ModelConfig, fused_layers: Collection[int] = ()) -> dict[str, list[_Piece]]:
    """Every Hugging Face tensor name of `cfg` -> the moekit pieces it fills (Hub layout unless fused)."""
    V, D, F, E = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.n_expert
    plan = {"model.embed_tokens.weight": [_Piece("tok_emb.weight", (V, D))],
            "model.norm.weight": [_Piece("norm.weight", (D,))]}
    if not cfg.tie_embeddings:
        plan["lm_head.weight"] = [_Piece("lm_head.weight", (V, D))]
    for i in range(cfg.n_layer):
        hf, mk = f"model.layers.{i}.", f"blocks.{i}."
        plan[hf + "input_layernorm.weight"] = [_Piece(mk + "attn_norm.weight", (D,))]
        plan[hf + "post_attention_layernorm.weight"] = [_Piece(mk + "mlp_norm.weight", (D,))]
        for proj, ours, shape in (("q", "wq", (cfg.q_dim, D)), ("k", "wk", (cfg.kv_dim, D)),
                                  ("v", "wv", (cfg.kv_dim, D)), ("o", "wo", (D, cfg.q_dim))):
            plan[f"{hf}self_attn.{proj}_proj.weight"] = [_Piece(f"{mk}attn.{ours}.weight", shape)]
        if not cfg.is_moe_layer(i):
            Fd = cfg.dense_d_ff
            for proj, ours, shape in (("gate", "w1", (Fd, D)), ("up", "w3", (Fd, D)), ("down", "w2", (D, Fd))):
                plan[f"{hf}mlp.{proj}_proj.weight"] = [_Piece(f"{mk}mlp.{ours}.weight", shape)]
        elif i in fused_layers:  # transformers 5 in memory: MixtralExperts / MixtralTopKRouter
            plan[hf + "mlp.gate.weight"] = [_Piece(mk + "mlp.router.weight", (E, D))]
            plan[hf + "mlp.experts.gate_up_proj"] = [_Piece(mk + "mlp.experts.w1", (E, 2 * F, D), half=0),
                                                     _Piece(mk + "mlp.experts.w3", (E, 2 * F, D), half=1)]
            plan[hf + "mlp.experts.down_proj"] = [_Piece(mk + "mlp.experts.w2", (E, D, F))]
        else:  # the Hub's layout: one nn.Linear (out, in) per expert, w1 = gate, w3 = up, w2 = down
            plan[hf + "block_sparse_moe.gate.weight"] = [_Piece(mk + "mlp.router.weight", (E, D))]
            for e in range(E):
                for w, shape in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F))):
                    plan[f"{hf}block_sparse_moe.experts.{e}.{w}.weight"] = [
                        _Piece(f"{mk}mlp.experts.{w}", shape, expert=e)]
    return plan


def _hf_view(piece: _Piece, t: torch.Tensor) -> torch.Tensor:
    """The part of Hugging Face tensor `t` that `piece.target` (or its expert slice) holds, moekit-shaped."""
    if piece.half is not None:
        F = t.shape[1] // 2
        t = t[:, piece.half * F:(piece.half + 1) * F]
    return t  # moekit stores experts (E, out, in), as nn.Linear: no transpose


# ---- load ---------------------------------------------------------------------------------------
def _expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked expert tensors, which are filled expert by expert as the shards are read."""
    E, D, F = cfg.n_expert, cfg.d_model, cfg.d_ff
    out = {}
    for i in range(cfg.n_layer):
        if cfg.is_moe_layer(i):
            for w, shape in (("w1", (E, F, D)), ("w3", (E, F, D)), ("w2", (E, D, F))):
                out[f"blocks.{i}.mlp.experts.{w}"] = shape
    return out


@dataclass(frozen=True)
class HFSource:
    """Where a model loaded by `load_hf` came from (set as `model.hf_source`)."""

    path: Path
    config: dict[str, Any]  # the raw config.json
    tokenizer: Path | None  # tokenizer.json beside the weights, if any


def _read_config(path: Path) -> dict[str, Any]:
    return read_config_json(path, "a Hugging Face model folder")


def _weight_files(path: Path) -> dict[str, list[str]]:
    """Shard file name -> the tensor names it holds, from the index or the single file's header."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        missing = sorted(f for f in files if not (path / f).is_file())
        if missing:
            raise FileNotFoundError(f"{index.name} lists shard(s) missing from {path}: {', '.join(missing)}; "
                                    "the download is incomplete, fetch those files again")
        return files
    if (path / "model.safetensors").is_file():
        with _open(path / "model.safetensors") as f:
            return {"model.safetensors": list(f.keys())}
    hint = " (pytorch_model.bin is pickle, which moekit never loads: convert it to safetensors)" if any(
        path.glob("pytorch_model*.bin")) else ""
    raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json{hint}")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}); download it again") from None


def _check_names(path: Path, files: dict[str, list[str]], plan: dict[str, list[_Piece]], what: str,
                 tied: bool) -> None:
    """Every tensor `plan` needs is in the checkpoint (the index lists each name once), and no other."""
    names = {n for ns in files.values() for n in ns}
    missing = sorted(set(plan) - names)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{path}: tensor(s) {', '.join(missing[:3])}{more} missing from the weights that "
                         f"{what} needs; the checkpoint does not match its config")
    # Tolerated extras: a tied checkpoint's copy of the output matrix (transformers ignores it too), and
    # the RoPE buffers that early Llama conversions saved.
    unexpected = sorted(n for n in names - set(plan)
                        if not (tied and n == "lm_head.weight") and not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        file = next(f for f, ns in files.items() if unexpected[0] in ns)
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]} in {file}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                         + f", which {what} does not have; the checkpoint does not match its config")


def _check_headers(path: Path, files: dict[str, list[str]], plan: dict[str, list[_Piece]], what: str) -> None:
    """Each shard holds what the index says, with the shapes the config implies, in a float dtype."""
    for file, file_names in files.items():
        with _open(path / file) as f:
            present = set(f.keys())
            for name in file_names:
                if name not in plan:
                    continue
                if name not in present:
                    raise ValueError(f"{path}: the index says {name} is in {file}, which does not hold it; "
                                     "the download is corrupt")
                shape, kind = tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()
                if shape != plan[name][0].shape:
                    raise ValueError(f"{path}: tensor {name} in {file} has shape {shape}, expected "
                                     f"{plan[name][0].shape} from {what}")
                if kind not in ("F16", "BF16", "F32", "F64"):
                    raise ValueError(f"{path}: tensor {name} in {file} has dtype {kind}; moekit loads "
                                     "unquantized float16/bfloat16/float32 weights only")


class HFReader:
    """The tensors of a Hugging Face Llama/Mistral/Mixtral folder, read one moekit tensor at a time.

        reader = HFReader(path)                    # config and every shard's header checked; no data read
        reader.cfg, reader.names                   # the ModelConfig, the moekit state-dict names
        w1 = reader.get("blocks.3.mlp.experts.w1") # (E, F, D), stacked from the Hub's per-expert tensors

    `load_hf` reads every name; a serving worker (moekit/infer/worker.py) reads only its shard's, so
    no process ever holds more than its part of the model and one tensor.
    """

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        self.config = d = _read_config(path)
        self.cfg = cfg = config_from_hf(d, name=path.resolve().name)
        files = _weight_files(path)
        names = {n for ns in files.values() for n in ns}
        fused = {i for i in range(cfg.n_layer) if f"model.layers.{i}.mlp.experts.gate_up_proj" in names}
        plan = _plan(cfg, fused)
        self.what = what = (f"config.json ({d['model_type']}, {cfg.n_layer} layers, d_model {cfg.d_model}"
                            + (f", {cfg.n_expert} experts" if cfg.is_moe else "") + ")")
        _check_names(path, files, plan, what, cfg.tie_embeddings)
        _check_headers(path, files, plan, what)  # before reading any data: a bad checkpoint fails in a second
        self._sources: dict[str, list[tuple[str, str, _Piece]]] = {}  # moekit name -> (file, HF name, piece)
        for file, file_names in files.items():
            for name in file_names:
                for piece in plan.get(name, []):
                    self._sources.setdefault(piece.target, []).append((file, name, piece))
        self._stacked = _expert_shapes(cfg)
        self._files: dict[str, Any] = {}
        # A tied output layer is stored once, as the embedding; a last pipeline stage still asks for it by name.
        self._alias = {"lm_head.weight": "tok_emb.weight"} if cfg.tie_embeddings else {}

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype as config.json states it (float32 when it does not)."""
        d = self.config
        dtype = getattr(torch, str(d.get("dtype") or d.get("torch_dtype") or "float32"), None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    def _read(self, file: str, name: str) -> torch.Tensor:
        if file not in self._files:
            self._files[file] = _open(self.path / file).__enter__()
        return self._files[file].get_tensor(name)

    def get(self, target: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The moekit tensor `target` (in `dtype`, default the checkpoint's own)."""
        sources = self._sources[self._alias.get(target, target)]
        if target not in self._stacked:
            (file, name, piece), = sources
            t = _hf_view(piece, self._read(file, name))
            return (t if dtype is None else t.to(dtype)).contiguous()
        out = None
        for file, name, piece in sources:  # stacked experts: filled expert by expert (or from a fused tensor)
            t = _hf_view(piece, self._read(file, name))
            if out is None:
                out = torch.empty(self._stacked[target], dtype=dtype or t.dtype)
            (out if piece.expert is None else out[piece.expert]).copy_(t)
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.__exit__(None, None, None)
        self._files.clear()


def load_hf(path: str | Path, dtype: torch.dtype | None = torch.float32,
            device: torch.device | str = "cpu") -> Transformer:
    """A moekit Transformer (eval mode) holding the weights of a Hugging Face Llama/Mistral/Mixtral folder.

    `dtype=None` keeps the checkpoint's dtype (config.json's `dtype` / `torch_dtype`). The returned
    model has `model.hf_source` (an HFSource: folder, raw config.json, tokenizer.json path or None).
    """
    reader = HFReader(path)
    dtype = reader.dtype() if dtype is None else dtype
    try:  # tensor by tensor: one HF tensor in flight at a time, beside the moekit state being built
        state = {name: reader.get(name, dtype).to(device) for name in reader.names}
    finally:
        reader.close()
    model = Transformer.from_tensors(reader.cfg, state, dtype=dtype, device=device,
                                     source=f"{reader.path} ({reader.what})")
    tokenizer = reader.path / "tokenizer.json"
    model.hf_source = HFSource(reader.path, reader.config, tokenizer if tokenizer.is_file() else None)
    return model.eval()


# ---- save ---------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """Bytes in "5GB" / "500MB" / "2GiB" / 1000 (transformers' convert_file_size_to_int)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size such as '5GB', '500MB' or 1000000")
    unit = m.group(2) or "B"
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _fsync(file: Path) -> None:
    with open(file, "rb+") as f:
        os.fsync(f.fileno())


def save_hf(model: Transformer, path: str | Path, *, max_shard_size: int | str = "5GB",
            tokenizer: str | Path | None = None, dtype: torch.dtype | None = None,
            overwrite: bool = False) -> Path:
    """Write `model` as a Hugging Face folder (config.json, safetensors shards + index) in the Hub layout.

    The folder is written next to `path` and renamed into place when complete: a crash leaves the old
    folder (or none), never a half-written model. An existing non-empty `path` is replaced only with
    `overwrite=True`. `tokenizer` is a tokenizer.json (or a folder holding one) to copy along with
    its tokenizer_config.json / special_tokens_map.json; `dtype` converts the weights as they are written.
    """
    cfg, path = model.cfg, Path(path)
    hf_config = config_to_hf(cfg)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{path} is not empty; choose a new folder or pass overwrite=True to replace it")
    tok_files: list[Path] = []
    if tokenizer is not None:
        tok = Path(tokenizer)
        tok = tok / "tokenizer.json" if tok.is_dir() else tok
        if not tok.is_file():
            raise FileNotFoundError(f"tokenizer {tok} does not exist")
        tok_files = [tok] + [tok.parent / n for n in TOKENIZER_FILES[1:] if (tok.parent / n).is_file()]

    state = model.state_dict()
    plan = _plan(cfg)  # the Hub layout
    written = {p.target for pieces in plan.values() for p in pieces}
    if cfg.tie_embeddings:
        written.add("lm_head.weight")  # the same tensor as tok_emb.weight
    if set(state) - written:  # never drop a tensor silently
        raise ValueError(f"model {cfg.name!r} has tensors the Hugging Face layout cannot hold: "
                         f"{sorted(set(state) - written)}")
    dtype = dtype or state["tok_emb.weight"].dtype
    sizes = {name: torch.Size(p[0].shape).numel() * dtype.itemsize for name, p in plan.items()}
    shards: list[list[str]] = [[]]
    limit, used = parse_size(max_shard_size), 0
    for name in plan:  # greedy, in model order; a tensor larger than the limit gets a shard of its own
        if shards[-1] and used + sizes[name] > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for file, shard in zip(files, shards, strict=True):  # one shard of tensors in memory at a time
            tensors = {}
            for name in shard:
                piece = plan[name][0]
                t = state[piece.target] if piece.expert is None else state[piece.target][piece.expert]
                tensors[name] = t.to("cpu", dtype).contiguous()
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        if n > 1:
            index = {"metadata": {"total_size": sum(sizes.values()),
                                  "total_parameters": sum(sizes.values()) // dtype.itemsize},
                     "weight_map": {name: file for file, shard in zip(files, shards, strict=True) for name in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        source = getattr(model, "hf_source", None)
        hf_config.update({k: source.config[k] for k in _TOKEN_ID_KEYS if source and k in source.config})
        hf_config["dtype"] = hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for tok in tok_files:
            shutil.copyfile(tok, tmp / tok.name)
        for file in tmp.iterdir():
            _fsync(file)
        if path.exists():  # swap: the old folder goes only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


__all__ = ["HFSource", "config_from_hf", "config_to_hf", "load_hf", "save_hf"]
