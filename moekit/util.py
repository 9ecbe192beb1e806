"""Small helpers shared across moekit: atomic file writes (never leave a half-written file), reading a
config.json, and the --device flag."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_config_json(folder: str | Path, what: str = "a moekit run or a Hugging Face model folder") -> dict[str, Any]:
    """The JSON object in `folder`/config.json, or one clear error naming what is wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist: give {what}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give {what}")
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: is it {what}?")
    return read_json_object(file)


def read_json_object(file: str | Path) -> dict[str, Any]:
    """The JSON object in `file`, or a ValueError that names the file and what is wrong."""
    try:
        d = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return d


def resolve_device(name: str):
    """The torch.device for a --device flag: auto (CUDA when there is one), cpu, cuda, cuda:N."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name such as cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available; use --device cpu")
    return dev


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls (AVX-512 BF16 or AMX): there bf16 beats fp32 (oneDNN kernels)."""
    import torch

    try:
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(name: str, device, quantize: str = "none"):
    """The torch dtype for an inference --dtype flag: auto is bf16 on a GPU and fp32 on a CPU, except
    that int8 weights on a CPU with bf16 units compute in bf16 (the fused int8 kernel needs bf16
    activations: infer/quant.py `fused_int8_ok`)."""
    import torch

    if name == "auto":
        cpu_bf16 = device.type == "cpu" and quantize == "int8" and cpu_has_bf16()
        return torch.bfloat16 if device.type == "cuda" or cpu_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
