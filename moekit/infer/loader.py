"""Load a model to serve: a moekit training run or a Hugging Face Llama/Mistral/Mixtral folder.

    model, codec = load_model("runs/tiny")                        # newest good checkpoint + tokenizer.json
    model, codec = load_model("Mixtral-8x7B-v0.1", dtype=torch.bfloat16)

A run folder (written by `moekit train`) holds config.json (a ModelConfig), tokenizer.json, and
weights in `checkpoints/step_*/model.safetensors` (newest first; an unreadable one falls back to
the previous) or an exported `model.safetensors`. These files are the contract between training
and serving: `moekit.infer` reads them itself and never imports `moekit.train` (DESIGN.md).
Only safetensors are read, never pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from moekit.config import ModelConfig
from moekit.infer.tokenizer import TextCodec, as_codec
from moekit.model.transformer import Transformer, upgrade_state_dict
from moekit.resolve import load_config
from moekit.util import read_config_json

EOT = "<|endoftext|>"  # a moekit run's document separator (moekit/train/tokenizer.py)


def _tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None


def _run_file(run: Path) -> Path:
    """The newest checkpoint of `run` whose safetensors header reads (an unreadable one falls back to the previous)."""
    folder = run / "checkpoints"
    ckpts = sorted((p for p in folder.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]),
                   reverse=True) if folder.is_dir() else []
    errors = []
    for f in [c / "model.safetensors" for c in ckpts] + [run / "model.safetensors"]:
        if not f.is_file():
            continue
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
            return f
        except (SafetensorError, OSError) as e:
            errors.append(f"{f}: {e}")
    why = f" ({errors[0]})" if errors else ""
    raise FileNotFoundError(f"{run} has no readable model.safetensors in checkpoints/step_*/ or at its top{why}; "
                            "train it with `moekit train`")


def _run_weights(run: Path) -> tuple[dict[str, torch.Tensor], Path]:
    f = _run_file(run)
    try:
        return load_file(f), f
    except (SafetensorError, OSError) as e:
        raise FileNotFoundError(f"{f} is not a readable safetensors file ({e}); train the run again") from None


class RunReader:
    """The tensors of a moekit run's newest checkpoint, read one at a time (HFReader's interface, moekit/hf.py):
    `cfg`, `names` (the model's state-dict names), `get(name, dtype)`, `close()`. Names of older moekit layouts are
    renamed as `Transformer.load_tensors` renames them; a tied lm_head reads the embedding."""

    def __init__(self, run: str | Path):
        self.path = run = Path(run)
        self.cfg = load_config(run / "config.json")
        self.file = _run_file(run)
        self._f = safe_open(str(self.file), framework="pt").__enter__()
        stored = list(self._f.keys())
        self._stored = {}
        for name in stored:  # our name -> (stored name, whether the stored layout is the transpose)
            new = upgrade_state_dict({name: torch.empty(0)})
            (ours,) = new
            self._stored[ours] = (name, ours != name)
        if self.cfg.tie_embeddings and "lm_head.weight" not in self._stored and "tok_emb.weight" in self._stored:
            self._stored["lm_head.weight"] = self._stored["tok_emb.weight"]

    @property
    def names(self) -> list[str]:
        return list(self._stored)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        stored, transposed = self._stored[name]
        t = self._f.get_tensor(stored)
        if transposed and t.dim() == 3:
            t = t.transpose(1, 2)
        return (t if dtype is None else t.to(dtype)).contiguous()

    def close(self) -> None:
        self._f.__exit__(None, None, None)


def open_weights(path: str | Path):
    """A tensor-at-a-time reader (RunReader or moekit.hf.HFReader) of a moekit run or a Hugging Face folder."""
    path = Path(path)
    if "model_type" in read_config_json(path):
        from moekit.hf import HFReader

        return HFReader(path)
    return RunReader(path)


def _run_codec(run: Path, cfg) -> TextCodec:
    tok_file = run / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{run} has no tokenizer.json")
    tok = _tokenizer(tok_file)
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"{tok_file} has no {EOT} token; is it a moekit run's tokenizer?")
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"{tok_file} has {tok.get_vocab_size()} tokens but the model only {cfg.vocab_size}")
    return TextCodec(tok, prefix_ids=(eot,), eos_token_ids=(eot,), add_special_tokens=False)


def _hf_codec(path: Path, config: dict) -> TextCodec | None:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        return None
    tok = _tokenizer(tok_file)
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    bos = config.get("bos_token_id")
    codec = as_codec(tok)  # a config without eos_token_id: the tokenizer's own end-of-text token
    codec.bos_token_id = bos if isinstance(bos, int) else None
    codec.eos_token_ids = eos_ids or codec.eos_token_ids
    return codec


def load_run(run: str | Path, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> tuple[Transformer, TextCodec]:
    run = Path(run)
    cfg = load_config(run / "config.json")
    tensors, source = _run_weights(run)
    model = Transformer.from_tensors(cfg, tensors, dtype=dtype, device=device,
                                     source=f"{source} (read with {run / 'config.json'})")
    return model.eval(), _run_codec(run, cfg)


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> tuple[Transformer, TextCodec | None]:
    from moekit.hf import load_hf

    model = load_hf(path, dtype=dtype, device=device)
    return model, _hf_codec(Path(path), model.hf_source.config)


def load_codec(path: str | Path) -> tuple[ModelConfig, TextCodec | None]:
    """(configuration, TextCodec or None) of a moekit run or a Hugging Face folder, without reading any weight:
    what the driver of sharded workers needs (moekit/infer/executor.py)."""
    reader = open_weights(path)
    try:
        if isinstance(reader, RunReader):
            return reader.cfg, _run_codec(reader.path, reader.cfg)
        return reader.cfg, _hf_codec(reader.path, reader.config)
    finally:
        reader.close()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[Transformer, TextCodec | None]:
    """(model in eval mode, its TextCodec or None) from a moekit run or a Hugging Face model folder."""
    path = Path(path)
    d = read_config_json(path)
    if "model_type" in d:
        return load_hf_model(path, dtype, device)
    return load_run(path, dtype, device)
