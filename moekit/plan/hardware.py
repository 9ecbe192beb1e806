"""The hardware table: accelerators as data (peak FLOP/s per dtype, HBM, links, price), plus user files.

    from moekit.plan.hardware import get_gpu
    h100 = get_gpu("H100")                  # built-in entry (case, dashes and spaces do not matter)
    mine = get_gpu("L40S", files=["gpus.toml"])   # an entry of a user JSON/TOML file
    here = get_gpu("local")                 # what `moekit bench hardware` measured on this machine

File format (JSON or TOML; one GPU object, or {"gpus": [...]} / `[[gpus]]` for several). Units are
the ones datasheets use, written into the field names so that a file reads on its own:

    name = "L40S"            memory_gb = 48           hbm_gb_s = 864       # GB = 1e9 bytes
    nvlink_gb_s = 32         internode_gb_s = 25      gpus_per_node = 8    # per GPU, one direction
    price_per_hour = 1.0     tflops = {bf16 = 362, fp8 = 733}            # dense (no 2:4 sparsity)

Optional: `gemv_gb_s` (measured matrix-vector read bandwidth per dtype) and `batched_gemv_gb_s` (the same at more
tokens per step, {dtype = {"16" = GB/s}}), `bandwidth_efficiency` and
`flops_efficiency` (the fraction of peak a real kernel reaches: < 1 for datasheet peaks, 1 for
measured figures), `allreduce_latency_us`, `hop_latency_us`, the software overheads (`layer_overhead_us`,
`step_overhead_us`, `expert_overhead_us`, `seq_overhead_us`, and per weight format `overhead_by_dtype`), `source`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bytes per element of each number format moekit plans with; "fp16" computes at the bf16 rate.
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
OVERHEAD_KEYS = ("layer", "step", "expert", "seq")  # overhead_by_dtype's keys, in `GPU.overheads` order


@dataclass
class GPU:
    name: str
    memory_gb: float  # HBM capacity, GB = 1e9 bytes
    hbm_gb_s: float  # peak HBM (or, measured, streaming read) bandwidth
    tflops: dict[str, float]  # dense peak TFLOP/s (TOP/s for int8) per dtype: fp32, bf16, fp8, int8
    nvlink_gb_s: float = 0.0  # scale-up link bandwidth per GPU, one direction (half the datasheet's total)
    internode_gb_s: float = 0.0  # scale-out (InfiniBand/Ethernet) bandwidth per GPU, one direction
    gpus_per_node: int = 8  # the scale-up (NVLink) domain
    price_per_hour: float | None = None  # $ per GPU-hour; None = unknown, pass one to get dollars
    # What a well-tuned kernel reaches, as a fraction of the peaks above. Decode GEMV and attention
    # reach 80-90% of HBM bandwidth on A100/H100, large GEMMs ~70-80% of dense peak; a measured entry
    # holds achieved figures and sets both to 1.
    bandwidth_efficiency: float = 0.8
    flops_efficiency: float = 0.7
    gemv_gb_s: dict[str, float] = field(default_factory=dict)  # measured y = W x read bandwidth per dtype
    # The same with more tokens per step, where the matmuls' compute starts to show (a CPU's small-batch GEMMs):
    # {"fp32": {"16": GB/s}}, the bytes of the weights read over the time of the matmuls that read them.
    batched_gemv_gb_s: dict[str, dict[str, float]] = field(default_factory=dict)
    allreduce_latency_us: float = 10.0  # fixed cost of one small NCCL all-reduce over the scale-up links
    hop_latency_us: float = 10.0  # fixed cost of one pipeline send between stages
    # Software overhead of a forward pass beyond reading and computing: kernel launches and framework
    # dispatch, per layer and per decode step. 0 in the datasheet entries (the article's figures assume
    # fused, graph-launched kernels); `moekit bench hardware` measures moekit's own engine, which is what
    # bounds a small model (gpt4-mini on a CPU: ~0.6 ms per layer of eager PyTorch).
    layer_overhead_us: float = 0.0
    step_overhead_us: float = 0.0
    # The part of that overhead that grows with the batch: per expert a MoE layer runs (the sorted path launches
    # one matmul group per expert the batch touches: MoE dispatch) and per sequence in a step (sampling, block
    # tables, the scheduler's bookkeeping).
    expert_overhead_us: float = 0.0
    seq_overhead_us: float = 0.0
    # The four per weight format, where they differ (a measured entry: eager PyTorch dispatches other kernels for
    # bf16 and int8 weights), as {"int8": {"layer": us, "step": us, "expert": us, "seq": us}}; a format not
    # listed uses the four fields above.
    overhead_by_dtype: dict[str, dict[str, float]] = field(default_factory=dict)
    # A measured entry's training figures at a model's shapes (moekit/train_profile.py): TFLOP/s per GEMM shape
    # {"fp32": {"m,n,k": TFLOP/s}}, causal attention's {"fp32": {"fwd": TFLOP/s, "bwd": TFLOP/s}}, and the bandwidth
    # of an eager memory-bound op (0: the stream figure x bandwidth_efficiency).
    gemm_tflops_at: dict[str, dict[str, float]] = field(default_factory=dict)
    attention_tflops: dict[str, dict[str, float]] = field(default_factory=dict)
    elementwise_gb_s: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        where = f"GPU {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a GPU entry needs a non-empty 'name'")
        for key in ("memory_gb", "hbm_gb_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{where}: {key} must be a positive number, got {value!r}")
        for key in ("nvlink_gb_s", "internode_gb_s", "allreduce_latency_us", "hop_latency_us", "layer_overhead_us",
                    "step_overhead_us", "expert_overhead_us", "seq_overhead_us"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{where}: {key} must be a number >= 0, got {value!r}")
        for key in ("bandwidth_efficiency", "flops_efficiency"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise ValueError(f"{where}: {key} must be in (0, 1], got {value!r}")
        if self.price_per_hour is not None and not (isinstance(self.price_per_hour, int | float)
                                                    and self.price_per_hour >= 0):
            raise ValueError(f"{where}: price_per_hour must be a number >= 0, got {self.price_per_hour!r}")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"{where}: gpus_per_node must be a positive integer, got {self.gpus_per_node!r}")
        for key in ("tflops", "gemv_gb_s"):
            table = getattr(self, key)
            if not isinstance(table, dict):
                raise ValueError(f"{where}: {key} must be a table of dtype -> number, got {table!r}")
            for dtype, value in table.items():
                if dtype not in DTYPE_BYTES:
                    raise ValueError(f"{where}: {key} has unknown dtype {dtype!r}; use "
                                     f"{', '.join(DTYPE_BYTES)}")
                if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                    raise ValueError(f"{where}: {key}.{dtype} must be a positive number, got {value!r}")
        # The per-dtype tables of named figures: {dtype: {name: number}}, each with its rule for names and values.
        _check_tables(where, "batched_gemv_gb_s", self.batched_gemv_gb_s, lambda k: k.isdigit() and int(k) > 1,
                      'token counts > 1 (as strings, e.g. "16")', positive=True)
        _check_tables(where, "gemm_tflops_at", self.gemm_tflops_at, lambda k: re.fullmatch(r"\d+,\d+,\d+", k),
                      'GEMM shapes "m,n,k"', positive=True)
        _check_tables(where, "attention_tflops", self.attention_tflops, None, "fwd, bwd", positive=True,
                      exact={"fwd", "bwd"})
        _check_tables(where, "overhead_by_dtype", self.overhead_by_dtype, None, "layer, step, expert, seq "
                      "(microseconds)", positive=False, exact=set(OVERHEAD_KEYS))
        if isinstance(self.elementwise_gb_s, bool) or not isinstance(self.elementwise_gb_s, int | float) \
                or self.elementwise_gb_s < 0:
            raise ValueError(f"{where}: elementwise_gb_s must be a number >= 0, got {self.elementwise_gb_s!r}")
        if "bf16" not in self.tflops:
            raise ValueError(f"{where}: tflops needs at least a 'bf16' entry (dense peak TFLOP/s)")

    # ---- units the cost model uses: bytes and FLOP per second -----------------------------------
    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def bandwidth(self) -> float:
        """Peak HBM bandwidth, bytes/s."""
        return self.hbm_gb_s * 1e9

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for matmuls in `dtype` (fp16 runs at the bf16 rate; int4 at the int8 rate)."""
        key = {"fp16": "bf16", "int4": "int8"}.get(dtype, dtype)
        if key not in self.tflops:
            raise ValueError(f"{self.name} has no {dtype} peak in its hardware entry; "
                             f"choose one of {', '.join(self.tflops)}")
        return self.tflops[key] * 1e12

    def weight_read_bandwidth(self, dtype: str, tokens: float = 1) -> float:
        """Bytes/s at which a step of `tokens` tokens reads weights: the measured figures if any (`gemv_gb_s` at one
        token, `batched_gemv_gb_s` at more; between two, interpolated on log tokens; past the last, the last),
        else peak x efficiency."""
        points = sorted((int(t), v) for t, v in self.batched_gemv_gb_s.get(dtype, {}).items())
        if dtype in self.gemv_gb_s:
            points.insert(0, (1, self.gemv_gb_s[dtype]))
        if not points:
            return self.bandwidth * self.bandwidth_efficiency
        if tokens <= points[0][0]:
            return points[0][1] * 1e9
        for (t0, v0), (t1, v1) in itertools.pairwise(points):
            if tokens <= t1:
                f = math.log(tokens / t0) / math.log(t1 / t0)
                return (v0 + f * (v1 - v0)) * 1e9
        return points[-1][1] * 1e9

    def measured_gemm_flops(self, m: float, n: float, k: float, dtype: str) -> float | None:
        """FLOP/s of an (m x k) @ (k x n) GEMM from `gemm_tflops_at`: the measured shape nearest on log scales
        (exact for the shapes the bench timed); None when the entry has no table for `dtype`."""
        table = self.gemm_tflops_at.get(dtype)
        if not table:
            return None

        def distance(key: str) -> float:
            return sum(abs(math.log(max(a, 1) / b)) for a, b in zip((m, n, k), map(int, key.split(",")), strict=True))

        return table[min(table, key=distance)] * 1e12

    @property
    def memory_bound_bandwidth(self) -> float:
        """Bytes/s at which memory-bound ops (norms, activations, residuals) move their bytes."""
        return self.elementwise_gb_s * 1e9 if self.elementwise_gb_s else self.bandwidth * self.bandwidth_efficiency

    def overheads(self, dtype: str) -> tuple[float, float, float, float]:
        """(layer, step, expert, seq) software overhead in microseconds for weights in `dtype` (the fields above)."""
        if dtype in self.overhead_by_dtype:
            return tuple(float(self.overhead_by_dtype[dtype][k]) for k in OVERHEAD_KEYS)  # type: ignore[return-value]
        return self.layer_overhead_us, self.step_overhead_us, self.expert_overhead_us, self.seq_overhead_us

    def supports(self, dtype: str) -> bool:
        return {"fp16": "bf16", "int4": "int8"}.get(dtype, dtype) in self.tflops

    def replace(self, **changes: Any) -> GPU:
        return dataclasses.replace(copy.deepcopy(self), **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "hardware entry") -> GPU:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: a GPU must be a table/object of fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known fields: {', '.join(sorted(known))}")
        missing = [k for k in ("name", "memory_gb", "hbm_gb_s", "tflops") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; the format is in moekit/plan/hardware.py")
        return cls(**copy.deepcopy(d))


def _check_tables(where: str, key: str, tables: Any, name_ok, names: str, *, positive: bool,
                  exact: set[str] | None = None) -> None:
    """One line naming the field for a per-dtype table of named figures that is malformed: not {dtype: {name:
    number}}, an unknown dtype, names that break the rule (`name_ok`, or exactly `exact`), a value not > 0
    (`positive`) or < 0."""
    if not isinstance(tables, dict):
        raise ValueError(f"{where}: {key} must be a table of dtype -> {{{names}}}, got {tables!r}")
    for dtype, table in tables.items():
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"{where}: {key} has unknown dtype {dtype!r}; use {', '.join(DTYPE_BYTES)}")
        if not isinstance(table, dict) or (exact is not None and set(table) != exact) or (
                name_ok is not None and not all(isinstance(k, str) and name_ok(k) for k in table)):
            want = f"have exactly the keys {names}" if exact is not None else f"map {names} to numbers"
            raise ValueError(f"{where}: {key}.{dtype} must {want}, got {table!r}")
        for name, value in table.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 if positive
                                                                                    else value >= 0):
                rule = "a positive number" if positive else "a number >= 0"
                raise ValueError(f"{where}: {key}.{dtype}.{name} must be {rule}, got {value!r}")


_DGX = {"gpus_per_node": 8}
# Datasheet figures, dense (the datasheets' headline tensor numbers assume 2:4 sparsity: halved here).
# NVLink is per GPU per direction; inter-node is one NIC per GPU (DGX/HGX designs).
TABLE: dict[str, GPU] = {g.name: g for g in [
    # NVIDIA A100 datasheet: 312 TFLOP/s BF16, 624 TOP/s INT8, no FP8; NVLink 3 600 GB/s total;
    # HDR InfiniBand 200 Gb/s per GPU. $1 per A100-hour is the article's price (SPEC section 3).
    GPU("A100-40GB", memory_gb=40, hbm_gb_s=1555, tflops={"fp32": 19.5, "bf16": 312, "int8": 624},
        nvlink_gb_s=300, internode_gb_s=25, price_per_hour=1.0, source="NVIDIA A100 datasheet", **_DGX),
    GPU("A100-80GB", memory_gb=80, hbm_gb_s=2039, tflops={"fp32": 19.5, "bf16": 312, "int8": 624},
        nvlink_gb_s=300, internode_gb_s=25, price_per_hour=1.0, source="NVIDIA A100 datasheet", **_DGX),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s BF16, 1,979 FP8/INT8; 3.35 TB/s (the article rounds to
    # 3 TB/s and 2,000 TFLOP/s, SPEC section 6); NVLink 4 900 GB/s total; NDR 400 Gb/s per GPU.
    # $2 per H100-hour is the article's price (SPEC section 3).
    GPU("H100", memory_gb=80, hbm_gb_s=3350, tflops={"fp32": 67, "bf16": 989, "fp8": 1979, "int8": 1979},
        nvlink_gb_s=450, internode_gb_s=50, price_per_hour=2.0, source="NVIDIA H100 SXM datasheet", **_DGX),
    # NVIDIA H200 SXM datasheet: H100 compute, 141 GB of HBM3e at 4.8 TB/s. No price in the article.
    GPU("H200", memory_gb=141, hbm_gb_s=4800, tflops={"fp32": 67, "bf16": 989, "fp8": 1979, "int8": 1979},
        nvlink_gb_s=450, internode_gb_s=50, source="NVIDIA H200 SXM datasheet", **_DGX),
    # NVIDIA HGX/DGX B200 datasheet divided by 8: 2.25 PFLOP/s BF16, 4.5 FP8/INT8 dense, 180 GB
    # (1,440 GB per 8), 8 TB/s; NVLink 5 1.8 TB/s total; ConnectX-7 400 Gb/s per GPU.
    GPU("B200", memory_gb=180, hbm_gb_s=8000, tflops={"fp32": 75, "bf16": 2250, "fp8": 4500, "int8": 4500},
        nvlink_gb_s=900, internode_gb_s=50, source="NVIDIA DGX B200 datasheet (per GPU)", **_DGX),
    # AMD Instinct MI300X datasheet: 1,307 TFLOP/s BF16, 2,615 FP8/INT8 dense, 192 GB at 5.3 TB/s;
    # 7 Infinity Fabric links of 64 GB/s per direction (896 GB/s total) in an 8-GPU mesh.
    GPU("MI300X", memory_gb=192, hbm_gb_s=5300, tflops={"fp32": 163.4, "bf16": 1307.4, "fp8": 2614.9,
                                                        "int8": 2614.9},
        nvlink_gb_s=448, internode_gb_s=50, source="AMD Instinct MI300X datasheet", **_DGX),
]}

_ALIASES = {"a10040g": "A100-40GB", "a10080g": "A100-80GB", "h100sxm": "H100", "h100sxm5": "H100",
            "h200sxm": "H200", "mi300": "MI300X"}


def local_hardware_path() -> Path:
    """Where `moekit bench hardware` writes this machine's entry (the name `local` reads it back)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moekit" / "hardware.json"


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_hardware_file(path: str | Path) -> list[GPU]:
    """The GPUs of a JSON or TOML file: one GPU object, or a list of them under `gpus`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hardware file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ValueError(f"{path} is not valid {kind}: {e}") from None
    if isinstance(data, dict) and "gpus" in data:
        data = data["gpus"]
    entries = data if isinstance(data, list) else [data]
    if not entries:
        raise ValueError(f"{path} holds no GPU entries")
    return [GPU.from_dict(e, where=f"{path} entry {i}") for i, e in enumerate(entries)]


def known_gpus(files: list[str | Path] | tuple = ()) -> dict[str, GPU]:
    """The built-in table, the measured `local` entry if there is one, and the entries of `files`."""
    gpus = dict(TABLE)
    local = local_hardware_path()
    if local.is_file():
        try:
            (entry,) = load_hardware_file(local)[:1]
            gpus["local"] = entry.replace(name="local")
        except ValueError:
            pass  # a corrupt cache must not break the built-in table; `--gpu local` reports it below
    for f in files:
        for g in load_hardware_file(f):
            gpus[g.name] = g
    return gpus


def get_gpu(spec: str | GPU, files: list[str | Path] | tuple = ()) -> GPU:
    """A copy of a known GPU by name, or the single GPU of a hardware file given as a path."""
    if isinstance(spec, GPU):
        return spec.replace()
    if _key(spec) == "local":
        if not local_hardware_path().is_file():
            raise ValueError(f"no measured hardware at {local_hardware_path()}: run `moekit bench hardware`")
        return load_hardware_file(local_hardware_path())[0].replace(name="local")
    gpus = known_gpus(files)
    by_key = {_key(n): g for n, g in gpus.items()}
    key = _ALIASES.get(_key(spec), spec)
    if _key(key) in by_key:
        return by_key[_key(key)].replace()
    if Path(spec).is_file():
        entries = load_hardware_file(spec)
        if len(entries) > 1:
            raise ValueError(f"{spec} holds {len(entries)} GPUs ({', '.join(g.name for g in entries)}): "
                             f"pass --hardware {spec} --gpu NAME")
        return entries[0]
    raise ValueError(f"unknown GPU {spec!r}; known: {', '.join(gpus)} (or a JSON/TOML hardware file)")


__all__ = ["DTYPE_BYTES", "GPU", "TABLE", "get_gpu", "known_gpus", "load_hardware_file",
           "local_hardware_path"]
