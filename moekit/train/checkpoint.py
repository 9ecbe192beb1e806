"""Checkpoints that survive `kill -9`: atomic, checksummed, the last K kept, exact resume.

GPT-4's training needed "an absurd number of failures requiring checkpoints that needed to be
restarted from" (SPEC section 3). A checkpoint is a folder `RUN/checkpoints/step_00000120/`:

    model.safetensors      model tensors (tied weights stored once)
    optimizer.safetensors  AdamW state per parameter: `<param>::exp_avg`, `::exp_avg_sq`, `::step`
    state.json             step, tokens, data position, RNG states, schedule horizon, and the
                           SHA-256 and size of both tensor files

A distributed run (moekit/train/dist_checkpoint.py) writes the same folder with the tensors as a
torch.distributed.checkpoint (DCP) set instead: one `__R_0.distcp` file of shards per rank and DCP's
`.metadata`, every file in state.json's checksums; it loads into any layout, one process included.

It is written into a hidden temporary folder, every file fsynced, then renamed into place and the
parent fsynced: a kill at any instant leaves either the old set of checkpoints or the new one.
Loading checks the checksums first; a truncated or corrupted checkpoint is reported by file name
and the previous good one is used (`load_latest`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moekit.model.transformer import upgrade_state_dict

CKPT_DIR = "checkpoints"
MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
DCP_METADATA = ".metadata"  # a distributed checkpoint (torch.distributed.checkpoint): one shard file per rank


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


# ---- tensors ---------------------------------------------------------------------------------------
def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied (shared-storage) tensors kept once, contiguous, on the CPU."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's tensors into `model` (its one loading path, `Transformer.load_tensors`)."""
    try:
        model.load_tensors(tensors, source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            t = value if torch.is_tensor(value) else torch.tensor(value, dtype=torch.float32)
            out[f"{name}::{key}"] = t.detach().contiguous().cpu()
    return out


def load_optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           source: str) -> None:
    """Through `Optimizer.load_state_dict`, which puts each state on its parameter's device and dtype."""
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    state: dict[int, dict] = {}
    names = dict(model.named_parameters())
    for key, t in upgrade_state_dict(tensors).items():  # a run saved before the Experts module: renamed
        name, _, field = key.partition("::")
        if name not in names or id(names[name]) not in index:
            raise CheckpointError(f"{source}: optimizer state for unknown parameter {name!r}")
        state.setdefault(index[id(names[name])], {})[field] = t
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


# ---- RNG states, as JSON ------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict:
    np_state = np.random.get_state()
    out = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---- files ---------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows cannot open a folder to fsync it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary and half-deleted ones are hidden)."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    state: dict, keep: int = 3) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`."""
    files = {MODEL_FILE: model_tensors(model)}
    if opt is not None:
        files[OPTIM_FILE] = optimizer_tensors(model, opt)
    return save_checkpoint_files(run_dir, step, files, state, keep)


def save_checkpoint_files(run_dir: str | Path, step: int, files: dict[str, dict[str, torch.Tensor]], state: dict,
                          keep: int = 3) -> Path:
    """`save_checkpoint` for tensors already gathered ({MODEL_FILE: ..., OPTIM_FILE: ...}), e.g. from many ranks."""
    tmp = new_checkpoint_dir(run_dir, step, f"{os.getpid()}")
    for name, tensors in files.items():
        save_file(tensors, tmp / name, metadata={"format": "pt", "step": str(step)})
    return publish_checkpoint(run_dir, step, tmp, state, keep)


def new_checkpoint_dir(run_dir: str | Path, step: int, tag: str) -> Path:
    """A fresh hidden folder to write checkpoint `step` into (stale ones from a killed save are removed first)."""
    folder = Path(run_dir) / CKPT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob(".tmp-*"), *folder.glob(".del-*")]:  # left by a kill during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".tmp-{step_dir(run_dir, step).name}-{tag}"
    tmp.mkdir()
    return tmp


def publish_checkpoint(run_dir: str | Path, step: int, tmp: Path, state: dict, keep: int = 3) -> Path:
    """Make the complete checkpoint in `tmp` visible: checksum every file into state.json, fsync, rename it to
    step_N in one step (a kill before leaves the previous checkpoints as they were), keep the newest `keep`."""
    folder = Path(run_dir) / CKPT_DIR
    final = step_dir(run_dir, step)
    state = dict(state, step=step, files={})
    for f in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != STATE_FILE):
        _fsync_path(f)
        state["files"][str(f.relative_to(tmp))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
        f.write(json.dumps(state, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp)
    if final.exists():  # the same step saved again (e.g. the end of a resumed run that had just saved)
        old = folder / f".del-{final.name}-{os.getpid()}"
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_path(folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        doomed = folder / f".del-{old.name}"
        os.rename(old, doomed)  # hidden first: a kill mid-delete never leaves a half checkpoint visible
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def verify_checkpoint(path: str | Path) -> dict:
    """The checkpoint's state.json, after checking that every file is present with its SHA-256."""
    path = Path(path)
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{state_file} is missing: the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{state_file} is truncated or corrupted (not valid JSON)") from None
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or not (
            MODEL_FILE in state["files"] or DCP_METADATA in state["files"]):
        raise CheckpointError(f"{state_file} does not describe a moekit checkpoint (no 'files' record)")
    for name, rec in state["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint is incomplete")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"{f} is truncated or damaged: {size:,} bytes, {rec['bytes']:,} were written")
        if sha256_file(f) != rec["sha256"]:
            raise CheckpointError(f"{f} is corrupted: its SHA-256 differs from the one recorded at save time")
    return state


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    opt: torch.optim.Optimizer | None = None) -> dict:
    """Verify, then load the model (and optimizer) tensors; returns the state.json record."""
    path = Path(path)
    state = verify_checkpoint(path)
    load_model_tensors(model, load_file(path / MODEL_FILE), str(path / MODEL_FILE))
    if opt is not None:
        if OPTIM_FILE not in state["files"]:
            raise CheckpointError(f"{path} has no optimizer state: it cannot be resumed, only used with --init-from")
        load_optimizer_tensors(model, opt, load_file(path / OPTIM_FILE), str(path / OPTIM_FILE))
    return state


def load_latest(run_dir: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None = None,
                log=print) -> tuple[Path, dict]:
    """Load the newest checkpoint that verifies; say which bad ones were skipped and why."""
    return load_newest(run_dir, lambda path: load_checkpoint(path, model, opt), log)


def load_newest(run_dir: str | Path, load: Callable[[Path], dict], log=print) -> tuple[Path, dict]:
    """(path, state) of the newest checkpoint `load(path)` takes without a CheckpointError, newest first; every
    one skipped is logged with its reason (the fallback of `load_latest` and of distributed loading)."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"{run_dir} has no checkpoints (no {CKPT_DIR}/step_* folder)")
    errors = []
    for path in reversed(ckpts):
        try:
            state = load(path)
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
            continue
        if errors:
            log(f"using {path.name}, the newest checkpoint that verifies")
        return path, state
    raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / CKPT_DIR}: {errors[0]}")
