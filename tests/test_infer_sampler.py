"""The sampler against a plain, one-row-at-a-time oracle: penalties, temperature, min-p, top-k, top-p;
seeded draws; logprobs; SamplingParams validation."""

import math

import pytest
import torch

from moekit.infer.sampler import Row, SamplingParams, logprobs, sample, target_probs

V = 50


def oracle_probs(logits_V: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """vLLM's order, written out: penalties, then greedy argmax or temperature, min-p, top-k, top-p."""
    x = logits_V.double().clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    if p.greedy:
        return torch.nn.functional.one_hot(x.argmax(), V).double()
    x = x / p.temperature
    probs = x.softmax(-1)
    allowed = [i for i in range(V) if probs[i] >= p.min_p * probs.max()]
    allowed.sort(key=lambda i: -x[i])
    if p.top_k:
        allowed = allowed[:p.top_k]
    z = sum(math.exp(x[i] - x[allowed[0]]) for i in allowed)
    kept, mass = [], 0.0
    for i in allowed:  # the smallest most-likely-first set whose mass reaches top_p
        if mass >= p.top_p:
            break
        kept.append(i)
        mass += math.exp(x[i] - x[allowed[0]]) / z
    out = torch.zeros(V, dtype=torch.float64)
    out[kept] = x[kept].softmax(-1)
    return out


CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(top_p=0.6),
    SamplingParams(temperature=0.8, top_k=10, top_p=0.5),
    SamplingParams(min_p=0.2),
    SamplingParams(temperature=0.5, min_p=0.05, top_k=20, top_p=0.9),
    SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0),
    SamplingParams(temperature=0),
]


def test_target_probs_equal_the_row_by_row_oracle():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), V, generator=g) * 3
    prompt, output = [1, 2, 3, 3], [4, 4, 4, 7, 1]
    rows = [Row(p, None, prompt, output) for p in CASES]
    probs = target_probs(logits, rows)
    for i, p in enumerate(CASES):
        want = oracle_probs(logits[i], p, prompt, output)
        assert torch.allclose(probs[i].double(), want, atol=1e-6), p
    assert (probs[2] > 0).sum() == 5 and (probs[4] > 0).sum() <= 10


def test_seeded_draws_are_reproducible_and_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-9.0] * (V - 4)])
    p = SamplingParams(temperature=1.0, seed=3)

    def draws(seed, n):
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, [Row(p, g, [0], [])])[0] for _ in range(n)]

    assert draws(3, 50) == draws(3, 50) and draws(3, 50) != draws(4, 50)
    counts = torch.bincount(torch.tensor(draws(5, 4000)), minlength=V)[:4].double()
    want = logits[0, :4].double().softmax(-1) * 4000
    assert ((counts - want) ** 2 / want).sum() < 16.3  # chi-square(3) at alpha = 0.001


def test_logprobs_rank_and_top_alternatives():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0] + [-5.0] * (V - 4)])
    (rec,) = logprobs(logits, [2], [2])
    lp = logits[0].log_softmax(-1)
    assert rec.token_id == 2 and rec.rank == 3 and abs(rec.logprob - float(lp[2])) < 1e-6
    assert [t for t, _ in rec.top] == [1, 3]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
    ({"presence_penalty": 3}, r"presence_penalty must be in \[-2, 2\]"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"stop": [""]}, "stop must be a list of non-empty strings"),
    ({"logprobs": 21}, r"logprobs must be an integer in \[0, 20\]"),
    ({"seed": -1}, "seed must be a non-negative integer"),
])
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
