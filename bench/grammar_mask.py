"""What structured output costs per token: the grammar mask (moekit/infer/grammar.py), measured beside plain decoding.

    python bench/grammar_mask.py                          # tiny preset, 4k and 32k byte-level BPE vocabularies, CPU
    python bench/grammar_mask.py --vocab 32768 --batch 1,16,64 --device cuda

Prints one JSON object with, for each vocabulary size:
- `compile_ms`: the vocabulary's preprocessing (once per engine), a typical object schema's compilation (a string,
  an integer, an enum, an array of strings; once per schema, cached after), `json_object`'s, and the same schema's
  with bounds (maxLength, minimum/maximum, maxItems); `import_xgrammar_ms` is paid once, on the first use;
- `mask_us`: per token, on a valid document walked token by token: xgrammar filling the packed mask, the mask
  applied to a logits row (apply_bitmask), the matcher accepting the token;
- `decode`: engine decode tokens/s at each batch size, plain and under the schema, in the same run on the same
  random weights, and the difference as microseconds added per generated token (the whole cost: mask fill,
  transfer, apply, accept, the finish check). A random model writes long strings, so the schema's outputs run to
  max_tokens like the plain ones (`tokens` says how many each generated). On a busy machine that difference is
  noisy (best of 3, interleaved), so `grammar_work_us_per_token` times the grammar's own per-step work at that batch
  size directly (a fresh bitmask, a fill per row, one batched apply, an accept and a finish check per row);
- `outlines_core` (only when that package is installed): its index compile and mask fill for the same schema and
  vocabulary, the comparison behind choosing xgrammar.
The tokenizers are byte-level BPEs (moekit's own kind) trained here on the Python standard library's source and
cached under $MOEKIT_CACHE/tokenizers/bench-grammar-<V>/.
"""

from __future__ import annotations

import argparse
import json
import platform
import sysconfig
import time
from pathlib import Path

import torch

from moekit.infer.engine import Engine
from moekit.infer.grammar import Constraint, Grammars, apply_bitmask, new_bitmask, token_bytes
from moekit.infer.sampler import SamplingParams
from moekit.model.transformer import Transformer
from moekit.presets import get_preset
from moekit.train.tokenizer import cache_dir, load_tokenizer, train_bpe

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "color", "tags"], "additionalProperties": False}
# The same with bounds (maxLength, minimum/maximum, maxItems), as tests/test_infer_grammar.py uses: a regex engine's
# automaton grows with every bound, a pushdown automaton's does not.
BOUNDED = {**SCHEMA, "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}}}
DOC = '{"name": "Ada Lovelace", "age": 36, "color": "green", "tags": ["mathematics", "poetry", "engines"]}'


def tokenizer(vocab_size: int):
    path = cache_dir() / "tokenizers" / f"bench-grammar-{vocab_size}" / "tokenizer.json"
    if path.is_file():
        return load_tokenizer(path)
    docs, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            docs.append(p.read_text())
        except (UnicodeDecodeError, OSError):
            continue
        total += len(docs[-1])
        if total > 24 << 20:
            break
    tok = train_bpe(docs, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def ms(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def mask_costs(grammars: Grammars, tok, V: int, device: torch.device, repeats: int = 20) -> dict:
    c = Constraint("json_schema", json.dumps(SCHEMA))
    ids = tok.encode(DOC).ids
    logits_RV = torch.randn(1, V, device=device)
    fill, apply, accept = [], [], []
    for _ in range(repeats):
        m = grammars.matcher(c)
        bm = new_bitmask(1, V)
        for t in ids:
            t0 = time.perf_counter()
            m.fill(bm, 0)
            t1 = time.perf_counter()
            out = apply_bitmask(logits_RV, bm, [0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            assert m.accept(t), "the document does not fit the schema"
            t3 = time.perf_counter()
            fill.append(t1 - t0)
            apply.append(t2 - t1)
            accept.append(t3 - t2)
        assert m.finished and bool(torch.isfinite(out).any())

    def stats(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {"mean": round(sum(xs) / len(xs) * 1e6, 1), "p99": round(xs[int(0.99 * (len(xs) - 1))] * 1e6, 1)}

    return {"doc_tokens": len(ids), "fill": stats(fill), "apply": stats(apply), "accept": stats(accept)}


def step_costs(grammars: Grammars, tok, V: int, device: torch.device, batch: int, repeats: int = 5) -> float:
    """Microseconds per token of the whole per-step grammar work the engine does for `batch` constrained rows: a
    fresh bitmask, a fill per row, one batched apply, an accept and a finish check per row (engine._sample/_output)."""
    c = Constraint("json_schema", json.dumps(SCHEMA))
    ids = tok.encode(DOC).ids
    logits_RV = torch.randn(batch, V, device=device)
    total, n = 0.0, 0
    for _ in range(repeats):
        ms_ = [grammars.matcher(c) for _ in range(batch)]
        for t in ids:
            t0 = time.perf_counter()
            bm = new_bitmask(batch, V)
            for r, m in enumerate(ms_):
                m.fill(bm, r)
            out = apply_bitmask(logits_RV, bm, range(batch))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            for m in ms_:
                m.accept(t)
                _ = m.finished
            total += time.perf_counter() - t0
            n += batch
        assert bool(torch.isfinite(out).any())
    return round(total / n * 1e6, 1)


def decode(engine: Engine, V: int, batch: int, max_tokens: int, repeats: int = 3) -> dict:
    """Best of `repeats`, the two kinds interleaved, so that a busy machine slows both alike."""
    prompt = [1 + (i * 7919) % (V - 1) for i in range(16)]
    kinds = {"plain": None, "schema": Constraint("json_schema", json.dumps(SCHEMA))}
    params = {name: [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, ignore_eos=c is None, constraint=c)
                     for i in range(batch)] for name, c in kinds.items()}
    for name in kinds:  # warm-up (and the schema's compilation, cached after)
        engine.generate([prompt] * batch, params[name])
    best: dict[str, tuple[float, int]] = {}
    for _ in range(repeats):
        for name in kinds:
            t0 = time.perf_counter()
            done = engine.generate([prompt] * batch, params[name])
            wall = time.perf_counter() - t0
            n = sum(len(c.token_ids) for c in done)
            if name not in best or wall / n < best[name][0] / best[name][1]:
                best[name] = (wall, n)
    out = {}
    for name, (wall, n) in best.items():
        out[name] = {"tok_s": round(n / wall, 1), "tokens": n, "us_per_token": round(wall / n * 1e6, 1)}
    out["added_us_per_token"] = round(out["schema"]["us_per_token"] - out["plain"]["us_per_token"], 1)
    out["ratio"] = round(out["schema"]["tok_s"] / out["plain"]["tok_s"], 3)
    return out


def outlines_core(tok, V: int) -> dict | None:
    try:
        import outlines_core as oc
    except ImportError:
        return None
    vocab = token_bytes(tok)
    t_voc, voc = ms(lambda: oc.Vocabulary(0, _by_bytes(vocab)))
    t_idx, index = ms(lambda: oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?"), voc))
    t_bounded, _ = ms(lambda: oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(BOUNDED), r"[ ]?"), voc))
    guide, mask, fills = oc.Guide(index), torch.zeros((V + 31) // 32, dtype=torch.int32), []
    for t in tok.encode(DOC).ids:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
        fills.append(time.perf_counter() - t0)
        guide.advance(t)
    return {"vocabulary_ms": round(t_voc, 1), "schema_index_ms": round(t_idx, 1),
            "bounded_schema_index_ms": round(t_bounded, 1), "fill_us_mean": round(sum(fills) / len(fills) * 1e6, 1)}


def _by_bytes(vocab: list[bytes]) -> dict[bytes, list[int]]:
    d: dict[bytes, list[int]] = {}
    for i, b in enumerate(vocab):
        if b:  # special tokens (b"") are not text; id 0 is the EOS
            d.setdefault(b, []).append(i)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", default="4096,32768", help="vocabulary sizes, comma-separated")
    ap.add_argument("--batch", default="1,16", help="decode batch sizes, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens of each decode request")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    result = {"bench": "grammar_mask", "preset": args.preset, "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "schema": SCHEMA, "vocab": {}}
    from importlib.metadata import version
    result["xgrammar"] = version("xgrammar")
    result["import_xgrammar_ms"] = round(ms(lambda: __import__("xgrammar"))[0], 1)  # once per process, on first use
    for V in [int(v) for v in args.vocab.split(",")]:
        tok = tokenizer(V)
        t_info, grammars = ms(lambda tok=tok, V=V: Grammars(tok, V, [0]))
        t_schema, _ = ms(lambda g=grammars: g.compile(Constraint("json_schema", json.dumps(SCHEMA))))
        t_cached, _ = ms(lambda g=grammars: g.compile(Constraint("json_schema", json.dumps(SCHEMA))))
        t_obj, _ = ms(lambda g=grammars: g.compile(Constraint("json_object")))
        t_bounded, _ = ms(lambda g=grammars: g.compile(Constraint("json_schema", json.dumps(BOUNDED))))
        entry = {"compile_ms": {"vocabulary": round(t_info, 1), "schema": round(t_schema, 1),
                                "schema_cached": round(t_cached, 3), "json_object": round(t_obj, 1),
                                "bounded_schema": round(t_bounded, 1)},
                 "mask_us": mask_costs(grammars, tok, V, device), "decode": {}}
        torch.manual_seed(0)
        model = Transformer(get_preset(args.preset).replace(vocab_size=V)).to(device).eval()
        engine = Engine(model, tok, kv_cache_gb=0.25)
        for b in [int(x) for x in args.batch.split(",")]:
            entry["decode"][f"batch_{b}"] = decode(engine, V, b, args.tokens)
            entry["decode"][f"batch_{b}"]["grammar_work_us_per_token"] = step_costs(grammars, tok, V, device, b)
        if (oc := outlines_core(tok, V)) is not None:
            entry["outlines_core"] = oc
        result["vocab"][str(V)] = entry
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
