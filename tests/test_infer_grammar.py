"""Structured output in the engine (moekit/infer/grammar.py): the vocabulary as bytes, matchers that roll back, the
batched mask in the sampler, greedy output equal to a masked full recomputation, speculative decoding under a
grammar, 200 sampled completions that all validate against their schema, and logit_bias.

The model is conftest's tiny random MoE with a 512-token context and the servers' ASCII character tokenizer
(`<|endoftext|>` = 0 is the EOS); a random model rarely closes a JSON value by chance, so the schemas bound their
strings (maxLength), integers (minimum/maximum) and arrays (maxItems): the grammar then forces every output to end.
"""

import json
import re

import jsonschema
import pytest
import torch
from conftest import tiny_model
from test_serve_utils import ascii_tokenizer
from tokenizers import Tokenizer, decoders, models

from moekit.infer.engine import Engine
from moekit.infer.grammar import Constraint, Grammars, new_bitmask, token_bytes, unpack
from moekit.infer.sampler import SamplingParams
from moekit.train.tokenizer import train_bpe

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
    "required": ["name", "age", "color", "tags"], "additionalProperties": False}
JSON_SCHEMA = Constraint("json_schema", json.dumps(SCHEMA))
MAX_TOKENS = 400  # the longest output the schema allows: 16 whitespace characters a gap, 8-character strings
V = 97


@pytest.fixture(scope="module")
def model():
    return tiny_model(0, vocab_size=V, max_seq_len=512)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, ascii_tokenizer(), num_blocks=4096)


def allowed(bitmask_RW, row: int) -> list[int]:
    return torch.nonzero(unpack(bitmask_RW[row:row + 1], V)[0]).flatten().tolist()


def ids(text: str) -> list[int]:
    return ascii_tokenizer().encode(text, add_special_tokens=False).ids


# ---- the vocabulary ------------------------------------------------------------------------------------------------
def test_token_bytes_spell_every_text_in_a_byte_level_bpe():
    tok = train_bpe(["def main(args):\n    return {'a': [1, 2]}  # héllo wörld 😀\n"] * 20, 300)
    vocab = token_bytes(tok)
    for text in ['{"name": "Ada", "tags": ["x"]}\n', "naïve café 😀 日本", "\t\x00 trailing  "]:
        assert b"".join(vocab[i] for i in tok.encode(text).ids) == text.encode()
    assert vocab[tok.token_to_id("<|endoftext|>")] == b""  # a special token is never part of a match


def test_token_bytes_of_a_sentencepiece_style_vocabulary():
    vocab = {"<unk>": 0, "<s>": 1, "▁hi": 2, "<0xC3>": 3, "<0xA9>": 4, "{": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.add_special_tokens(["<s>"])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    got = token_bytes(tok)
    assert got[1:] == [b"", b" hi", b"\xc3", b"\xa9", b"{"]
    assert tok.decode([2, 3, 4]).encode() == b"".join(got[i] for i in (2, 3, 4))  # " hié"


# ---- matchers --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grammars():
    return Grammars(ascii_tokenizer(), V, [0])


def test_fill_rows_gives_each_draft_prefix_its_own_mask_and_rolls_back(grammars):
    c = Constraint("regex", "ab+c")
    m = grammars.matcher(c)
    drafts = ids("abb")
    bm = new_bitmask(4, V)
    m.fill_rows(bm, 0, drafts)
    for i in range(4):  # row i: what a fresh matcher allows after the first i drafts
        ref = grammars.matcher(c)
        assert all(ref.accept(t) for t in drafts[:i])
        one = new_bitmask(1, V)
        ref.fill(one, 0)
        assert allowed(bm, i) == allowed(one, 0)
    assert allowed(bm, 0) == ids("a") and allowed(bm, 3) == ids("bc")
    after = new_bitmask(1, V)
    m.fill(after, 0)
    assert allowed(after, 0) == ids("a")  # back where it started

    bm = new_bitmask(4, V)
    m.fill_rows(bm, 0, ids("axb"))  # "x" is refused: the rows after it stay all-allowed, never used
    assert allowed(bm, 1) == ids("b") and len(allowed(bm, 2)) == len(allowed(bm, 3)) == V
    assert m.accept(ids("a")[0]) and not m.accept(ids("x")[0]) and m.accept(ids("b")[0])


def test_finished_only_when_nothing_but_eos_is_left(grammars):
    m = grammars.matcher(Constraint("regex", "a+"))
    assert m.accept(ids("a")[0]) and not m.finished  # "aa" still fits
    m = grammars.matcher(Constraint("choice", json.dumps(["ab", "abc"])))
    assert m.accept(ids("a")[0]) and m.accept(ids("b")[0]) and not m.finished
    assert m.accept(ids("c")[0]) and m.finished and not m.ended
    bm = new_bitmask(1, V)
    m.fill(bm, 0)
    assert allowed(bm, 0) == [0]
    assert m.accept(0) and m.ended and m.finished
    m.fill(bm, 0)  # after the stop token: the stop token only, not an error
    assert allowed(bm, 0) == [0]


def test_compiled_grammars_are_cached_by_constraint():
    g = Grammars(ascii_tokenizer(), V, [0], max_cached=2)
    for c in ["a", "b", "a", "c", "b"]:
        g.matcher(Constraint("regex", c))
    assert (g.misses, g.hits) == (4, 1)  # a b [a] c b: "b" was evicted by "c" (least recently used)


def test_a_constraint_that_cannot_compile_is_a_value_error_and_changes_nothing(engine):
    for c, why in [(Constraint("regex", "(?<=a)b"), "Lookbehind is not supported"),
                   (Constraint("json_schema", '{"type": "strin"}'), 'Unsupported type "strin"'),
                   (Constraint("grammar", "root ::= nope"), 'Rule "nope" is not defined')]:
        with pytest.raises(ValueError, match=re.escape(why)):
            engine.add_request("x", SamplingParams(constraint=c))
    engine.check_idle()


def test_an_engine_without_eos_or_tokenizer_refuses_constraints(model):
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        Engine(model, None, num_blocks=64).add_request([1, 2], SamplingParams(constraint=JSON_SCHEMA))
    with pytest.raises(ValueError, match="end-of-text token"):
        Engine(model, ascii_tokenizer(), num_blocks=64, eos_token_ids=[]).add_request(
            "x", SamplingParams(constraint=JSON_SCHEMA))


# ---- decoding under a grammar --------------------------------------------------------------------------------------
@torch.no_grad()
def masked_greedy_reference(model, grammars, prompt: list[int], c: Constraint, max_tokens: int) -> list[int]:
    """Full recomputation of the whole sequence per token, argmax over what a fresh-built mask allows."""
    m, out = grammars.matcher(c), []
    while len(out) < max_tokens and not m.finished:
        logits = model(torch.tensor([prompt + out])).logits[0, -1]
        bm = new_bitmask(1, V)
        m.fill(bm, 0)
        tok = int(logits.masked_fill(~unpack(bm, V)[0], float("-inf")).argmax())
        out.append(tok)
        if tok == 0:
            break
        assert m.accept(tok)
    return out


def test_greedy_under_a_schema_equals_masked_full_recomputation(model, engine, grammars):
    prompts = ["hello", "the cat, ", "xyz"]
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, constraint=JSON_SCHEMA))
    for p, o in zip(prompts, outs, strict=True):
        assert o.token_ids == masked_greedy_reference(model, grammars, ids(p), JSON_SCHEMA, MAX_TOKENS)
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), SCHEMA)


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculative_decoding_under_a_schema_keeps_greedy_output_and_validity(model, engine, proposer):
    prompts = ["hello", "the cat, ", "xyz", "a"]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, constraint=JSON_SCHEMA)
    plain = engine.generate(prompts, greedy)
    kw = {"ngram": True} if proposer == "ngram" else {"draft": tiny_model(1, vocab_size=V, max_seq_len=512)}
    spec = Engine(model, ascii_tokenizer(), num_blocks=4096, num_spec_tokens=4, **kw)
    got = spec.generate(prompts, greedy)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    sampled = spec.generate(["hello"] * 24, [SamplingParams(max_tokens=MAX_TOKENS, seed=i, constraint=JSON_SCHEMA)
                                             for i in range(24)])
    for o in sampled:
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), SCHEMA)
    m = spec.metrics()
    assert m["spec_drafted"] > 0 and m["spec_accepted"] > 0  # drafts went through the masked verification
    spec.check_idle()


def test_200_sampled_completions_all_parse_and_validate(engine):
    # Issue 16's acceptance: temperature 1, a string, an integer, an enum and an array. All 200 must end with
    # "stop" (a "length" one is truncated JSON): the bounds in SCHEMA and MAX_TOKENS make that certain.
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, constraint=JSON_SCHEMA)
              for i in range(200)]
    outs = engine.generate(["Here is a person as JSON: "] * 200, params)
    reasons = [o.finish_reason for o in outs]
    assert reasons.count("stop") == 200, {r: reasons.count(r) for r in set(reasons)}
    docs = [json.loads(o.text) for o in outs]
    for d in docs:
        jsonschema.validate(d, SCHEMA)
    assert len({json.dumps(d) for d in docs}) > 150  # sampled, not one answer 200 times
    engine.check_idle()


def test_masks_hold_under_truncation_and_penalties(engine):
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=5, top_p=0.9, min_p=0.01,
                             repetition_penalty=1.3, presence_penalty=0.5, seed=i, constraint=JSON_SCHEMA)
              for i in range(16)]
    for o in engine.generate(["abc"] * 16, params):
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_regex_choice_and_json_object(engine):
    regex = SamplingParams(max_tokens=64, seed=0, constraint=Constraint("regex", r"[a-z]{3}-[0-9]{2,4}"))
    choices = ["yes", "no", "maybe so"]
    choice = SamplingParams(max_tokens=64, seed=0, constraint=Constraint("choice", json.dumps(choices)))
    outs = engine.generate(["x"] * 8, [regex] * 4 + [choice] * 4)
    assert all(re.fullmatch(r"[a-z]{3}-[0-9]{2,4}", o.text) and o.finish_reason == "stop" for o in outs[:4])
    assert all(o.text in choices and o.finish_reason == "stop" for o in outs[4:])
    # json_object: any object. The grammar stops at the object's end; greedy, so that the output is short.
    obj = engine.generate(["x"], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                 constraint=Constraint("json_object")))[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)


def test_logit_bias_moves_greedy_choices(engine):
    x, base = ids("x")[0], engine.generate(["hello"], SamplingParams(max_tokens=4, temperature=0))[0]
    forced = engine.generate(["hello"], SamplingParams(max_tokens=4, temperature=0, logit_bias={x: 100}))[0]
    assert forced.text == "xxxx"
    banned = engine.generate(["hello"], SamplingParams(max_tokens=4, temperature=0,
                                                       logit_bias={base.token_ids[0]: -100}))[0]
    assert banned.token_ids[0] != base.token_ids[0]
    # A bias never lets a token through the grammar's mask.
    digit = engine.generate(["hello"], SamplingParams(max_tokens=4, temperature=0, logit_bias={x: 100},
                                                      constraint=Constraint("regex", "[0-9]{4}")))[0]
    assert re.fullmatch("[0-9]{4}", digit.text)
    with pytest.raises(ValueError, match=r"logit_bias holds token id 97"):
        engine.add_request("x", SamplingParams(logit_bias={97: 1.0}))
    with pytest.raises(ValueError, match="logit_bias must be"):
        SamplingParams(logit_bias={1: 101})
    engine.check_idle()
