"""Where a ModelConfig comes from: a preset name, a run or Hugging Face folder, a JSON file, `--key=value`.

    cfg = resolve_config("gpt4-mini")                    # or "runs/tiny", "Mixtral-8x7B-v0.1", "my.json"
    cfg = apply_overrides(cfg, {"n_layer": "2", "top_k": "1"})
    save_config(cfg, "runs/tiny/config.json"); cfg = load_config("runs/tiny/config.json")

`moekit.config` is a leaf (it imports nothing from moekit, DESIGN.md "Layout"); everything that
reads files, knows the presets or maps Hugging Face configs lives here, one step above it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig
from moekit.util import atomic_write_text, read_config_json, read_json_object


def save_config(cfg: ModelConfig, path: str | Path) -> None:
    """Write `cfg` as JSON, atomically (a reader never sees half a config.json)."""
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig in a moekit config.json (as `save_config` wrote it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    return ModelConfig.from_dict(read_json_object(path))


def resolve_config(spec: str) -> ModelConfig:
    """A ModelConfig from a preset name, a moekit run / Hugging Face directory, or a config JSON file."""
    from moekit.presets import PRESETS, get_preset

    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    d = read_config_json(path) if path.is_dir() else read_json_object(path)  # a run / HF folder, or a JSON file
    if "model_type" in d:  # a Hugging Face config.json
        from moekit.hf import config_from_hf  # lazily: hf imports torch, which `moekit info tiny` never needs

        return config_from_hf(d, name=path.resolve().name if path.is_dir() else path.resolve().parent.name)
    return ModelConfig.from_dict(d)


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Pull `--key=value` ModelConfig overrides (keys with underscores) out of argv."""
    fields = set(ModelConfig.__dataclass_fields__)
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            if "_" in key or key in fields:
                overrides[key] = value
                continue
        rest.append(arg)
    return rest, overrides


def parse_override(key: str, value: str) -> Any:
    """Turn a `--key=value` string into the type of ModelConfig's field `key`."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    if key not in fields:
        raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(sorted(fields))}")
    kind = fields[key].type
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        if key == "rope_scaling":
            return None if value.lower() in ("none", "null", "") else json.loads(value)
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"--{key}={value}: expected a value of type {kind}") from None
    return value


def apply_overrides(cfg: ModelConfig, overrides: dict[str, str]) -> ModelConfig:
    """`cfg` with the `--key=value` overrides of `split_overrides` applied (derived fields recomputed)."""
    if not overrides:
        return cfg
    return cfg.replace(**{k: parse_override(k, v) for k, v in overrides.items()})


__all__ = ["apply_overrides", "load_config", "parse_override", "resolve_config", "save_config", "split_overrides"]
