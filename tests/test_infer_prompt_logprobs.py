"""Prompt logprobs (vLLM's `prompt_logprobs`, what `echo` + `logprobs` needs) against a full-forward oracle: the
whole prompt through the model at once, log-softmax, each token's logprob given the tokens before it.

Computed in the same forward pass as prefill, so every way the engine can split or reuse a prefill is covered:
one chunk, chunked prefill under a small token budget, batched with other requests, after a preemption (the prompt
is recomputed: its logprobs are kept once), and with a prefix-cache hit available (a request with prompt logprobs
does not read the cache: a cached block holds K/V, not the logits of its positions; it recomputes, and the request
after it still hits).
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts, tiny_model

from moekit.infer.engine import Engine
from moekit.infer.sampler import SamplingParams


@torch.no_grad()
def oracle(model, prompt: list[int], top: int) -> list[tuple[float, int, list[int]]]:
    """(logprob, rank, top ids) of prompt tokens 1.. from one forward pass over the whole prompt."""
    lp_TV = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    out = []
    for t in range(1, len(prompt)):
        row = lp_TV[t - 1]
        chosen = row[prompt[t]]
        out.append((float(chosen), int((row > chosen).sum()) + 1, row.topk(max(top, 1)).indices[:top].tolist()))
    return out


def check(model, prompt: list[int], got, top: int) -> float:
    want = oracle(model, prompt, top)
    assert got is not None and len(got) == len(prompt) - 1
    worst = 0.0
    for lp, (value, rank, ids) in zip(got, want, strict=True):
        worst = max(worst, abs(lp.logprob - value))
        assert lp.rank == rank
        assert [i for i, _ in lp.top] == ids
    assert worst < 1e-5
    return worst


@pytest.mark.parametrize("budget", [64, 7])  # the whole prompt in one step / chunks of 7 (and mixed with others)
def test_prompt_logprobs_equal_a_full_forward(budget):
    model = tiny_model(1)
    prompts = random_prompts([2, 9, 23, 40], seed=1)
    engine = Engine(model, num_blocks=128, block_size=4, max_num_batched_tokens=budget, max_model_len=64)
    params = [SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=k) for k in (0, 1, 5, 2)]
    outs = engine.generate(prompts, params)
    for p, sp, o in zip(prompts, params, outs, strict=True):
        check(model, p, o.prompt_logprobs, sp.prompt_logprobs)
    engine.check_idle()


def test_prompt_logprobs_come_once_on_the_first_output_when_streaming():
    model = tiny_model(1)
    prompt = random_prompts([30], seed=2)[0]
    engine = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=8, max_model_len=64)
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=1))
    deltas = list(engine.stream(rid))
    carrying = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(carrying) == 1 and carrying[0] is deltas[0] and deltas[0].new_token_ids
    check(model, prompt, carrying[0].prompt_logprobs, 1)


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs_and_still_shared_by_others():
    model = tiny_model(2)
    system = random_prompts([17], seed=3)[0]  # 4 full blocks of 4, then one token
    a, b, c = (system + s for s in random_prompts([3, 5, 2], seed=4))
    engine = Engine(model, num_blocks=128, block_size=4, max_num_batched_tokens=64, max_model_len=64)
    first = engine.generate([a], SamplingParams(temperature=0, max_tokens=2))[0]
    assert first.num_cached_tokens == 0 and first.prompt_logprobs is None
    with_lp = engine.generate([b], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))[0]
    assert with_lp.num_cached_tokens == 0  # recomputed, not read from the cache
    check(model, b, with_lp.prompt_logprobs, 3)
    after = engine.generate([c], SamplingParams(temperature=0, max_tokens=2))[0]
    assert after.num_cached_tokens == 16  # the prefix is still cached for everyone else
    engine.check_idle()


def test_prompt_logprobs_survive_preemption_without_duplicates():
    model = tiny_model(3)
    prompts = random_prompts([21, 19, 25, 18, 22, 20], seed=6)
    # So few blocks that the newest requests are preempted while decoding and recompute their prompts.
    engine = Engine(model, num_blocks=24, block_size=4, max_num_batched_tokens=32, max_model_len=64)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=2))
    assert engine.metrics()["preemptions"] > 0
    assert any(o.num_preemptions for o in outs)
    for p, o in zip(prompts, outs, strict=True):
        check(model, p, o.prompt_logprobs, 2)
    engine.check_idle()


def test_bad_prompt_logprobs_is_a_clear_error():
    for bad in (-1, 21, 1.5):
        with pytest.raises(ValueError, match="prompt_logprobs must be an integer in"):
            SamplingParams(prompt_logprobs=bad)
