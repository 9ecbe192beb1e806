"""Shared test set-up: one torch thread, the one tiny config, and the helpers the test files import.

Tests import the helpers by name, `from conftest import tiny_cfg, tiny_model, ...` (tests/ is on
sys.path: it has no __init__.py). One torch thread: the tests run tiny tensors, where a second
thread only adds synchronisation (on a busy 2-core machine, tiny matmuls took 2-24 ms instead of 10 us).

The oracle for every engine test is `greedy_reference`: full recomputation of the whole sequence
for every new token, with no cache, no batching and no paging (DESIGN.md principle 4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models

from moekit.config import ModelConfig
from moekit.model.transformer import Transformer
from moekit.resolve import save_config

CHARS = list("abcdefghijklmnopqrstuvwxyz .,\n")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the tiny model ------------------------------------------------------------------------------
def tiny_cfg(**overrides) -> ModelConfig:
    """2 layers (one dense, one MoE of 4 experts, top-2), GQA 4:2, a 97-token vocabulary, fp32.

    Every test model is this config with the overrides its numbers need (`tiny_cfg(d_model=16, ...)`);
    `head_dim` and `dense_d_ff` are derived from the overridden shape unless given.
    """
    base = dict(name="test", vocab_size=97, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=48, n_expert=4,
                top_k=2, moe_every=2, mlp="swiglu", max_seq_len=128)
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_cfg(**overrides)).eval()
    model.init_weights(seed)
    return model


def random_prompts(lengths: list[int], vocab: int = 97, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy decoding by full recomputation: the whole sequence through the model for every token."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        if len(ids) >= model.cfg.max_seq_len:
            break
        tok = int(model(torch.tensor([ids], device=model.tok_emb.weight.device)).logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok == eos:
            break
    return out


def token_agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """The share of the reference's generated tokens that `other` reproduces at the same position.

    For free-running decoding this is a pessimistic measure: after the first differing token the two
    continuations condition on different text, so one early flip costs the rest of its sequence.
    A missing token (a shorter output) counts as a disagreement.
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference outputs but {len(other)} others")
    total = sum(len(r) for r in reference)
    same = sum(a == b for r, o in zip(reference, other, strict=True) for a, b in zip(r, o, strict=False))
    return same / total


# ---- a briefly trained tiny model --------------------------------------------------------------------
def synthetic_batch(g: torch.Generator, table: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """n sequences of a second-order Markov language: the next token is table[previous two] 90% of the time."""
    V = table.shape[0]
    seq = torch.randint(0, V, (n, 2), generator=g)
    for _ in range(length - 2):
        nxt = table[seq[:, -2], seq[:, -1]]
        noise = torch.rand(n, generator=g) < 0.1
        nxt = torch.where(noise, torch.randint(0, V, (n,), generator=g), nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq


MARKOV_VOCAB = 48


def train_markov_lm() -> tuple[Transformer, torch.Tensor, float]:
    """A tiny MoE (48 tokens, 64 wide, MQA, MoE in both layers) trained for 150 AdamW steps (~2 s) on
    `synthetic_batch`: the peaked next-token distributions of a trained model, which a random model
    lacks (its near-uniform logits flip under any rounding). Returns (model, 16 held-out sequences of
    40 tokens, the last training loss). A test must not depend on a run of `moekit train`, so it is
    trained here, from fixed seeds: the same weights every time."""
    torch.manual_seed(0)
    V = MARKOV_VOCAB
    model = tiny_model(0, vocab_size=V, d_model=64, n_head=4, n_kv_head=1, d_ff=96, moe_every=1, max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, V, (V, V), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        x = synthetic_batch(g, table, 32, 33)
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, synthetic_batch(g, table, 16, 40), loss.item()


@pytest.fixture(scope="session")
def markov_lm() -> tuple[Transformer, torch.Tensor, float]:
    """`train_markov_lm()`, trained once per session: tests must copy the model before changing it."""
    return train_markov_lm()


# ---- tokenizers and run folders --------------------------------------------------------------------
def char_tokenizer(chars: list[str] = CHARS) -> Tokenizer:
    """One token per character (ids 1..), `<|endoftext|>` = 0, decoding concatenates."""
    vocab = {c: i for i, c in enumerate(["<|endoftext|>"] + list(chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.decoder = decoders.Fuse()
    return tok


def save_run(folder: Path, model: Transformer, tokenizer: Tokenizer, checkpoint_step: int | None = None) -> None:
    """A run folder as `moekit train` leaves it: config.json, tokenizer.json and safetensors weights (a
    tied lm_head stored once), in the folder or, with `checkpoint_step`, in its checkpoint of that step."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    save_config(model.cfg, folder / "config.json")
    tokenizer.save(str(folder / "tokenizer.json"))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
    target = folder / "model.safetensors"
    if checkpoint_step is not None:
        target = folder / "checkpoints" / f"step_{checkpoint_step:08d}" / "model.safetensors"
        target.parent.mkdir(parents=True)
    save_file(tensors, target)
