"""Helpers shared by tests/test_infer_*.py: tiny random models, a character tokenizer, slow oracles.

The oracle for every engine test is `greedy_reference`: full recomputation of the whole sequence
for every new token, with no cache, no batching and no paging (DESIGN.md principle 4).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models

from moekit.config import ModelConfig
from moekit.model.transformer import Transformer

CHARS = list("abcdefghijklmnopqrstuvwxyz .,\n")



def tiny_cfg(**overrides) -> ModelConfig:
    """2 layers (one dense, one MoE of 4 experts, top-2), GQA 4:2, a 97-token vocabulary, fp32."""
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


def char_tokenizer() -> Tokenizer:
    """One token per character (ids 1..), `<|endoftext|>` = 0, decoding concatenates."""
    vocab = {c: i for i, c in enumerate(["<|endoftext|>"] + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.decoder = decoders.Fuse()
    return tok
