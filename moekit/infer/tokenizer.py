"""Text <-> token ids for the engine: a Hugging Face `tokenizers.Tokenizer` plus the model's conventions.

A moekit run starts every document with `<|endoftext|>` (moekit/train/tokenizer.py) and a Llama or
Mixtral checkpoint with its BOS token; both stop at their end-of-text token. `TextCodec` carries
those conventions so that the engine only sees `encode(text)` and `decode(ids)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

# End-of-text tokens of common tokenizers, used when a bare Tokenizer is given without eos ids.
KNOWN_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")


@dataclass
class TextCodec:
    tokenizer: Tokenizer
    prefix_ids: tuple[int, ...] = ()  # prepended to every prompt (a moekit run: <|endoftext|>)
    bos_token_id: int | None = None  # prepended unless the tokenizer's post-processor already did
    eos_token_ids: tuple[int, ...] = ()
    add_special_tokens: bool = True

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return list(self.prefix_ids) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def same_vocabulary(self, other: TextCodec) -> bool:
        return self.tokenizer.get_vocab(with_added_tokens=True) == other.tokenizer.get_vocab(with_added_tokens=True)


def as_codec(tokenizer) -> TextCodec | None:
    """None, a TextCodec, or a bare Tokenizer (wrapped; its eos ids guessed from KNOWN_EOS)."""
    if tokenizer is None or isinstance(tokenizer, TextCodec):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        eos = tuple(i for name in KNOWN_EOS if (i := tokenizer.token_to_id(name)) is not None)
        return TextCodec(tokenizer, eos_token_ids=eos)
    raise ValueError(f"tokenizer must be a tokenizers.Tokenizer or a TextCodec, got {type(tokenizer).__name__}")
