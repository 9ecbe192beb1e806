"""Structured output: a request's constraint compiled against the vocabulary once, applied as a token mask.

    grammars = Grammars(codec.tokenizer, vocab_size=cfg.vocab_size, stop_token_ids=(0,))  # one per engine
    m = grammars.matcher(Constraint("json_schema", json.dumps(schema)))    # compiled once per constraint (cached)
    bitmask_RW = new_bitmask(R, cfg.vocab_size)                           # every token allowed
    m.fill_rows(bitmask_RW, r0, drafts)    # rows r0..r0+k: the tokens allowed after each prefix of the drafts
    logits_RV = apply_bitmask(logits_RV, bitmask_RW, [r0, ...])           # -inf elsewhere (sampler.target_probs)
    m.accept(token); m.finished                                           # the committed tokens; nothing but EOS left

A `Constraint` is what a request asks for (OpenAI's `response_format`, vLLM's `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`): any JSON object, a JSON schema, a regular expression, one of a list of strings,
or an EBNF grammar (llama.cpp's GBNF syntax). The engine is **xgrammar** (Dong et al. 2024, "XGrammar: Flexible and
Efficient Structured Generation Engine for Large Language Models"; vLLM's default structured-output backend). A
pushdown automaton over bytes, its compiler precomputes which tokens are decided by the grammar's position alone,
so a mask costs microseconds per token; it handles recursive schemas and unbounded rollback. Chosen over
outlines-core 0.2.14 (a regex DFA indexed over the whole vocabulary) on bench/grammar_mask.py's figures (2-core
CPU, byte-level BPEs of 4k and 32k tokens): a typical object schema compiled in 2.3 / 12.5 ms against
outlines-core's 7.2 / 29 ms, and the same schema with bounds (maxLength, maximum, maxItems) in 1.5 / 13 ms against
30 / 141 ms (a DFA grows with every bound). outlines-core fills a mask faster (2.3 / 18 us against 4.4 / 31 us),
but both are far below a decode step, and outlines-core cannot express `json_object` (any JSON is not a regular
language), recursive schemas or EBNF grammars at all.

Speculative decoding: `fill_rows` advances the matcher tentatively through a request's drafts, so that each
verification row gets the mask of its own prefix, then rolls back; the engine accepts only what was committed.
A draft the grammar refuses gets probability 0 at its row, so verification rejects it there (speculative.verify).

Whitespace between JSON elements is allowed (as vLLM does) but capped at MAX_WHITESPACE characters per gap: a model
that keeps emitting newlines would otherwise never finish its object (the reason for vLLM's
`disable-any-whitespace` option). Schemas are always compiled strict (no properties or items beyond the schema's,
xgrammar's `strict_mode`, as vLLM does), whatever `strict` says.

xgrammar is imported on first use, and the vocabulary read then (`Grammars`, once per engine): an engine that
serves no constrained request never loads it; the first one that does waits for it (0.7-0.9 s for the import,
which loads transformers, and 10 / 140 ms for a 4k / 32k vocabulary on the 2-core machine).

Shape legend: R rows, V vocabulary, W = ceil(V / 32) int32 words of a packed bitmask (bit j of word w: token 32w + j).
"""

from __future__ import annotations

import json
import re
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
MAX_WHITESPACE = 16  # whitespace characters between two JSON elements (a pretty-printed nesting of 7 fits)
MAX_CACHED = 256  # compiled grammars kept, least recently used first out


@dataclass(frozen=True)
class Constraint:
    """What the output must match. spec: json_schema: the schema as JSON text; regex: the pattern; choice: a JSON
    array of the strings allowed; grammar: EBNF text; json_object: "". Hashable: the compiled-grammar cache key."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


def _xgr():
    try:
        import xgrammar
    except ImportError:  # a dependency of moekit: only a broken install gets here
        raise ValueError("structured output needs the xgrammar package: pip install 'xgrammar>=0.2.9'") from None
    return xgrammar


def _reason(e: Exception) -> str:
    """xgrammar's message without its '[time] /project/cpp/file.cc:123: Check failed: ... is false:' prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*\S+?:\d+:\s*", "", text)
    return re.sub(r"^Check failed: .*? is false:\s*", "", text)[:300]


def _ebnf_literal(s: str) -> str:
    out = []
    for ch in s:
        c = ord(ch)
        out.append("\\" + ch if ch in '"\\' else ch if 0x20 <= c < 0x7F else f"\\U{c:08x}")
    return '"' + "".join(out) + '"'


def build(c: Constraint):
    """The xgrammar Grammar of a constraint (no vocabulary needed); ValueError saying why it cannot be built."""
    xgr = _xgr()
    try:
        if c.kind == "json_object":  # an object with any members: strict off, so additional properties are allowed
            return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False,
                                                max_whitespace_cnt=MAX_WHITESPACE)
        if c.kind == "json_schema":
            return xgr.Grammar.from_json_schema(c.spec, strict_mode=True, max_whitespace_cnt=MAX_WHITESPACE)
        if c.kind == "regex":
            return xgr.Grammar.from_regex(c.spec)
        if c.kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(_ebnf_literal(s) for s in json.loads(c.spec)))
        return xgr.Grammar.from_ebnf(c.spec)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(_reason(e)) from None


def check(c: Constraint) -> None:
    """Raise ValueError (why) if the constraint cannot be compiled; cheap (no vocabulary): for request parsing."""
    build(c)


# ---- the vocabulary as bytes -------------------------------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (`bytes_to_unicode` in openai/gpt-2 encoder.py), inverted: character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_types(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [d for s in spec.get("decoders", []) for d in _decoder_types(s)]
    return [spec]


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each token id stands for in the output text; b"" for special tokens (never part of a match).

    Byte-level BPE (GPT-2, Llama 3, moekit's own): each character of a token is one byte (GPT-2's alphabet).
    SentencePiece-style (Llama 2, Mixtral): "▁" is a space and "<0xNN>" a byte (ByteFallback). Otherwise the token's
    text as it is (a character-level or plain BPE vocabulary).
    """
    spec = json.loads(tokenizer.to_str())
    decs = _decoder_types(spec.get("decoder"))
    kinds = {d.get("type") for d in decs}
    byte_level = "ByteLevel" in kinds
    spaces = [(d.get("pattern", {}).get("String"), d.get("content")) for d in decs if d.get("type") == "Replace"]
    if "Metaspace" in kinds:
        spaces.append(("▁", " "))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    bd = _byte_decoder() if byte_level else {}
    out = []
    for i in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        piece = tokenizer.id_to_token(i)
        if piece is None or added.get(i, {}).get("special"):
            out.append(b"")
        elif i in added:  # an added token is stored as its text, in every tokenizer kind
            out.append(piece.encode())
        elif byte_level and all(ch in bd for ch in piece):
            out.append(bytes(bd[ch] for ch in piece))
        elif "ByteFallback" in kinds and (m := _BYTE_TOKEN.match(piece)):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            for old, new in spaces:
                if old and new is not None:
                    piece = piece.replace(old, new)
            out.append(piece.encode())
    return out


# ---- bitmasks ------------------------------------------------------------------------------------------------
def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """(R, W) int32 on the CPU, every bit set: every token allowed (xgrammar fills rows in place)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


# Byte b -> its 8 bits, lowest first. A packed int32 word read as 4 little-endian bytes is then 32 bits in token
# order, so one table lookup per byte unpacks a mask (x86 and ARM are little-endian; checked below).
_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()
_TABLES: dict[tuple, torch.Tensor] = {}


def _table(kind: str, device: torch.device, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    key = (kind, device, dtype)
    if key not in _TABLES:
        t = _BYTE_BITS if kind == "bits" else torch.where(_BYTE_BITS, 0.0, float("-inf")).to(dtype)
        _TABLES[key] = t.to(device)
    return _TABLES[key]


def _lookup(bitmask_RW: torch.Tensor, table_B8: torch.Tensor, vocab_size: int) -> torch.Tensor:
    assert sys.byteorder == "little", "the packed token masks are read as little-endian bytes"
    bytes_ = bitmask_RW.contiguous().view(torch.uint8).reshape(-1).int()
    return table_B8.index_select(0, bytes_).reshape(bitmask_RW.shape[0], -1)[:, :vocab_size]


def unpack(bitmask_RW: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, V) bool: token j of row r allowed."""
    return _lookup(bitmask_RW, _table("bits", bitmask_RW.device), vocab_size)


def apply_bitmask(logits_RV: torch.Tensor, bitmask_RW: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """logits with -inf on the tokens the listed rows' masks refuse (out of place: the caller's logits are kept for
    logprobs). The packed mask travels to the logits' device (V / 8 bytes a row) and becomes an additive 0 / -inf
    mask there: on a CPU, a masked_fill with a scattered bool mask is ~8x slower than this add (bench/grammar_mask.py
    measured 2.1 ms against 0.23 ms for 16 rows of 32k tokens)."""
    R, V = logits_RV.shape
    dev = logits_RV.device
    table = _table("add", dev, logits_RV.dtype)
    if len(rows) == R:
        return logits_RV + _lookup(bitmask_RW.to(dev, non_blocking=True), table, V)
    idx = torch.tensor(list(rows), dtype=torch.long)
    add_RV = _lookup(bitmask_RW[idx].to(dev, non_blocking=True), table, V)
    return logits_RV.index_add(0, idx.to(dev), add_RV)


# ---- compiled grammars and matchers --------------------------------------------------------------------------
class Matcher:
    """One request's position in its grammar: accepts committed tokens, fills mask rows, rolls back."""

    def __init__(self, compiled, stop_W: torch.Tensor):
        self._m = _xgr().GrammarMatcher(compiled)
        self._stop_W = stop_W  # (W,) the stop tokens' bits
        self._scratch = torch.zeros((1, stop_W.numel()), dtype=torch.int32)

    def accept(self, token: int) -> bool:
        """Advance by one token; False (nothing changed) if the grammar refuses it or has already ended."""
        return not self._m.is_terminated() and self._m.accept_token(int(token))

    def rollback(self, n: int) -> None:
        if n:
            self._m.rollback(n)

    def fill(self, bitmask_RW: torch.Tensor, row: int) -> None:
        """Row `row` := the tokens allowed next (only the stop tokens once the grammar has ended)."""
        if self._m.is_terminated():
            bitmask_RW[row] = self._stop_W
        else:
            self._m.fill_next_token_bitmask(bitmask_RW, row)

    def fill_rows(self, bitmask_RW: torch.Tensor, row0: int, drafts: Sequence[int]) -> None:
        """Rows row0 .. row0 + len(drafts): the mask after each prefix of the drafts (speculative verification).
        After a draft the grammar refuses, the later rows keep every token allowed: verification rejects that draft
        (its probability is 0), so those rows are never used. The matcher ends where it started."""
        n = 0
        for i in range(len(drafts) + 1):
            self.fill(bitmask_RW, row0 + i)
            if i == len(drafts) or not self.accept(drafts[i]):
                break
            n += 1
        self.rollback(n)

    @property
    def ended(self) -> bool:
        """A stop token was accepted."""
        return self._m.is_terminated()

    @property
    def finished(self) -> bool:
        """The grammar accepts nothing more but a stop token (or has accepted one): the output is complete."""
        if self._m.is_terminated():
            return True
        if not self._m.is_completed():
            return False
        self._m.fill_next_token_bitmask(self._scratch, 0)
        return not bool((self._scratch[0] & ~self._stop_W).any())


class Grammars:
    """One engine's vocabulary as xgrammar sees it, and its compiled grammars by constraint (LRU, MAX_CACHED)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                 max_cached: int = MAX_CACHED, max_threads: int = 1):
        """vocab_size: the model's (its logits' width, which may exceed the tokenizer's: the extra ids are never
        allowed). max_threads: xgrammar's compile threads (1: the engine thread's core, nobody else's)."""
        if not stop_token_ids:
            raise ValueError("structured output needs an end-of-text token to end the output, and this engine has "
                             "none: give the engine eos_token_ids")
        xgr = _xgr()
        vocab = token_bytes(tokenizer)[:vocab_size]
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=list(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        words = [0] * ((vocab_size + 31) // 32)
        for t in stop_token_ids:
            words[t // 32] |= 1 << (t % 32)
        # as int32 words: bit 31 is the sign bit
        self.stop_W = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
        self.max_cached = max_cached
        self._cache: OrderedDict[Constraint, object] = OrderedDict()
        self.hits = self.misses = 0

    def compile(self, c: Constraint):
        """The compiled grammar of `c` (cached); ValueError saying why it cannot be compiled."""
        compiled = self._cache.get(c)
        if compiled is not None:
            self.hits += 1
            self._cache.move_to_end(c)
            return compiled
        grammar = build(c)
        try:
            compiled = self.compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as e:
            raise ValueError(_reason(e)) from None
        self.misses += 1
        self._cache[c] = compiled
        if len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, c: Constraint) -> Matcher:
        return Matcher(self.compile(c), self.stop_W)
