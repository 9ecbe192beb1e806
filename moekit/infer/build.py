"""EngineConfig + build_engine: the one way a model folder and deployment flags become an Engine.

    engine = build_engine(EngineConfig(model="runs/tiny", quantize="int8", draft="runs/tiny-draft"))
    engine = build_engine(EngineConfig.from_args(args))    # the flags of add_engine_arguments, + --model

`moekit generate` and `moekit serve` (whose ServeConfig is an EngineConfig with the server's settings
added) both build their engine here: load the model (and the draft) from a moekit run or a Hugging
Face folder (`loader.py`), pick the dtype, quantize, then call `Engine(...)`. Every flag is checked in
`__post_init__`, so a bad one is a one-line ValueError naming it before anything loads. Code that holds
a model in memory (tests, benchmarks on random weights) calls `Engine(model, ...)` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Self

import torch

from moekit.infer.engine import Engine
from moekit.infer.loader import load_codec, load_model
from moekit.infer.quant import quantize_int8
from moekit.util import resolve_device, resolve_dtype

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on a GPU, float32 on a CPU (resolve_dtype)
QUANTIZE = ("none", "int8")


@dataclass
class EngineConfig:
    model: str  # a moekit run or a Hugging Face folder
    draft: str | None = None  # speculative decoding with this smaller model (same tokenizer)
    ngram: bool = False  # speculative decoding by prompt lookup
    num_spec_tokens: int = 4
    quantize: str = "none"
    dtype: str = "auto"
    device: str = "auto"
    kv_cache_gb: float = 1.0
    block_size: int = 16
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context, capped by the KV cache
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs for decode steps (vLLM's flag)
    tp: int = 1  # tensor-parallel workers per pipeline stage
    pp: int = 1  # pipeline stages, one worker process each (x tp)
    ep: int = 1  # expert parallel across each stage's tensor ranks (1 or tp)
    threads: int | None = None  # torch threads (per worker when sharded)
    # Derived in __post_init__, so that a bad --device fails before the model loads.
    torch_device: torch.device = field(init=False, repr=False, compare=False)
    torch_dtype: torch.dtype = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is empty: give a moekit run or a Hugging Face folder")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"--quantize must be none or int8, got {self.quantize!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.draft and self.ngram:
            raise ValueError("--draft and --ngram are two proposers: choose one")
        positive = {"num_spec_tokens": "--num-spec-tokens", "block_size": "--block-size",
                    "max_num_seqs": "--max-num-seqs", "max_num_batched_tokens": "--max-num-batched-tokens"}
        for name, flag in positive.items():
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        for flag, v in (("--tp", self.tp), ("--pp", self.pp), ("--ep", self.ep)):
            if v < 1:
                raise ValueError(f"{flag} must be >= 1, got {v}")
        if self.sharded and self.quantize != "none":
            raise ValueError("--quantize int8 runs in one process: leave out --tp/--pp, or serve unquantized")
        if not self.kv_cache_gb > 0:
            raise ValueError(f"--kv-cache-gb must be > 0, got {self.kv_cache_gb}")
        self.torch_device = resolve_device(self.device)
        self.torch_dtype = resolve_dtype(self.dtype, self.torch_device, self.quantize)

    @property
    def sharded(self) -> bool:
        return self.tp * self.pp > 1 or self.ep > 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """This config from parsed flags: each field whose name the namespace holds; the rest keep defaults."""
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
        return cls(**given)

    def describe(self) -> str:
        """Where and how the weights run, for logs: e.g. `cuda bfloat16 int8`."""
        return (f"{self.torch_device} {str(self.torch_dtype).removeprefix('torch.')}"
                + (" int8" if self.quantize == "int8" else ""))


def add_engine_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, batching: bool = True) -> None:
    """The engine's flags, shared by `moekit generate` (batching=False: one request) and `moekit serve`."""
    p.add_argument("--draft", metavar="RUN|HF_DIR", help="speculative decoding with this smaller model")
    p.add_argument("--ngram", action="store_true", help="speculative decoding by prompt lookup (no draft model)")
    p.add_argument("--num-spec-tokens", type=int, default=4, help="draft tokens per step (default 4)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none", help="int8 weight-only quantization")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and activations (auto: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache size in GiB (default 1)")
    if batching:
        p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
        p.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once (default 256)")
        p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (default 2048)")
        p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request "
                       "(default: the model's context, capped by the KV cache)")
        p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="turn the prefix cache off")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: launch every decode kernel from Python")
    d = p.add_argument_group("sharded serving") if isinstance(p, argparse.ArgumentParser) else p
    d.add_argument("--tp", type=int, default=1, help="tensor-parallel workers per pipeline stage (default 1)")
    d.add_argument("--pp", type=int, default=1, help="pipeline stages, tp worker processes each (default 1)")
    d.add_argument("--ep", type=int, default=1, help="expert parallel across each stage's tensor ranks: 1 or --tp")


def _start_workers(cfg: EngineConfig, progress, launch: str):
    """The tokenizer and a WorkerGroup holding the model over tp x pp workers (the layout checked first: a bad one is
    a one-line ValueError before any process starts)."""
    from moekit.infer.executor import WorkerGroup

    spec, codec = worker_spec(cfg)
    return codec, WorkerGroup(spec, threads=cfg.threads or 1, progress=progress, launch=launch)


def worker_spec(cfg: EngineConfig):
    """(the workers' WorkerSpec, the model's TextCodec or None), the layout checked against the model's config."""
    from moekit.infer.worker import WorkerSpec, check_layout

    model_cfg, codec = load_codec(cfg.model)
    check_layout(model_cfg, cfg.tp, cfg.pp, cfg.ep)
    device = "cuda" if cfg.torch_device.type == "cuda" else str(cfg.torch_device)
    return WorkerSpec(cfg.model, cfg.tp, cfg.pp, cfg.ep, str(cfg.torch_dtype).removeprefix("torch."), device,
                      cfg.kv_cache_gb, cfg.block_size), codec


def build_engine(cfg: EngineConfig, *, tokenizer_for: str | None = None, progress=print,
                 launch: str = "spawn") -> Engine:
    """The Engine `cfg` describes. `tokenizer_for` names a command that needs text prompts (e.g. "generate"):
    then a model without tokenizer.json is an error, raised before the draft loads or int8 quantizes. With --tp/--pp
    the model runs in worker processes (`progress` gets their start-up lines; launch="torchrun" when this process is
    rank 0 of a torchrun launch) and this process keeps the scheduler, the sampler and any draft model."""
    group = None
    if cfg.sharded:
        if cfg.torch_device.type == "cuda" and cfg.torch_device.index is not None and cfg.tp * cfg.pp > 1:
            raise ValueError(f"--device {cfg.torch_device} names one GPU; sharded workers take one each: "
                             "give --device cuda")
        codec, group = _start_workers(cfg, progress, launch)
        model = None
    else:
        model, codec = load_model(cfg.model, cfg.torch_dtype, cfg.torch_device)
    try:
        return _engine(cfg, model, codec, group, tokenizer_for)
    except BaseException:
        if group is not None:
            group.close()
        raise


def _engine(cfg: EngineConfig, model, codec, group, tokenizer_for: str | None) -> Engine:
    if codec is None and tokenizer_for:
        raise FileNotFoundError(f"{cfg.model} has no tokenizer.json, which {tokenizer_for} needs to read the prompt")
    draft = None
    if cfg.draft:
        draft, draft_codec = load_model(cfg.draft, cfg.torch_dtype, cfg.torch_device)
        # The draft proposes token ids the target verifies: equal vocabulary sizes are not enough, the
        # same ids must mean the same text. (Without a target tokenizer, prompts are ids: nothing to compare.)
        if codec is not None and (draft_codec is None or not codec.same_vocabulary(draft_codec)):
            raise ValueError(f"--draft {cfg.draft} does not use the tokenizer of --model {cfg.model}: "
                             "a draft model must share the target's tokenizer")
    if cfg.quantize == "int8":
        quantize_int8(model)
    return Engine(model, codec, kv_cache_gb=cfg.kv_cache_gb, block_size=cfg.block_size,
                  max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                  max_model_len=cfg.max_model_len, enable_prefix_caching=cfg.enable_prefix_caching,
                  draft=draft, ngram=cfg.ngram, num_spec_tokens=cfg.num_spec_tokens,
                  enforce_eager=cfg.enforce_eager, executor=group)


__all__ = ["EngineConfig", "add_engine_arguments", "build_engine", "worker_spec"]
