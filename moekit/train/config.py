"""TrainConfig: every training hyper-parameter of `moekit train`, checked in `__post_init__`.

The model's shape lives in `moekit.config.ModelConfig`; this dataclass holds how it is trained.
It is saved as `train_config.json` in the run folder, so that `moekit train --resume RUN` continues
with exactly the same settings. Defaults are sized for the `tiny` preset on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("auto", "bf16", "fp32")
RECOMPUTE = ("none", "selective", "full")  # moekit/parallel/parallelize.py says what each keeps


@dataclass
class TrainConfig:
    # ---- data --------------------------------------------------------------------------------
    # `NAME=PATH[:EPOCHS]` specs; empty = the embedded standard-library corpus (text x2, code x4).
    data: list[str] = field(default_factory=list)
    tokenizer: str = ""  # an existing tokenizer.json; "" = train a byte-level BPE (cached)
    val_fraction: float = 0.05  # share of files held out for validation (split by file)
    seq_len: int = 0  # 0 = the model's max_seq_len
    # ---- batch: tokens per optimizer step ramp linearly from start to final (GPT-4: to 60M) ------
    batch_tokens: int = 4096  # final tokens per step
    batch_tokens_start: int = 1024  # 0 = no ramp (start at batch_tokens)
    batch_ramp_tokens: int = 262_144  # tokens seen over which the batch grows from start to final
    grad_accum: int = 1  # micro-batches per step (the step's sequences split evenly)
    # ---- optimizer (AdamW, decoupled weight decay on matrices only) -------------------------------
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr x min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # ---- length of the run ----------------------------------------------------------------------
    steps: int = 0  # 0 = as many steps as fit in max_minutes (decided after a few timed steps)
    max_minutes: float = 0.0  # training-time budget for the whole run; 0 = none (needs steps)
    # ---- evaluation, logging, checkpoints ----------------------------------------------------------
    eval_every: int = 100  # steps; 0 = only at the end
    eval_tokens: int = 32_768  # validation tokens per source at each evaluation
    log_every: int = 10
    save_every: int = 100  # steps; 0 = only at the end
    keep_checkpoints: int = 3
    # ---- numerics and reproducibility ---------------------------------------------------------------
    seed: int = 0
    dtype: str = "auto"  # auto = bf16 autocast where the hardware has bf16 matmuls, else fp32
    device: str = "auto"  # auto = cuda if available, else cpu
    compile: bool = False  # torch.compile each transformer block (torchtitan's --compile): fuses the elementwise ops
    recompute: str = "none"  # activation recomputation, Megatron's names: none | selective | full (moekit/parallel/)
    init_from: str = ""  # a run whose weights start this one (fresh optimizer and schedule)

    def __post_init__(self) -> None:
        ints = {"seq_len": 0, "batch_tokens": 1, "batch_tokens_start": 0, "batch_ramp_tokens": 0,
                "grad_accum": 1, "warmup_steps": 0, "steps": 0, "eval_every": 0, "eval_tokens": 1,
                "log_every": 1, "save_every": 0, "keep_checkpoints": 1, "seed": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0, got {self.max_minutes}")
        if self.steps == 0 and self.max_minutes == 0:
            raise ValueError("give the length of the run: --steps N or --max-minutes M (or both)")
        if self.batch_tokens_start > self.batch_tokens:
            raise ValueError(f"batch_tokens_start ({self.batch_tokens_start}) cannot exceed batch_tokens "
                             f"({self.batch_tokens}): the ramp grows the batch")
        if self.batch_tokens_start and not self.batch_ramp_tokens:
            raise ValueError("batch_tokens_start needs batch_ramp_tokens (the tokens over which to ramp)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from moekit.util import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}): the run folder is damaged") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object of TrainConfig fields")
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
