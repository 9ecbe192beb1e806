"""Speculative decoding is lossless: greedy output equals plain decoding; sampled output follows the
target's exact distribution (chi-square over > 20,000 draws, with a power check against a biased
rejection sampler); the acceptance rate matches sum(min(p, q)) (Leviathan et al. 2023, Chen et al. 2023).

For the sampled tests the target and the draft are *Markov* moekit models: attention and MLP
outputs are zeroed, so the next-token law depends on the current token only and the exact
distribution of every emitted token is the transition matrix P[a, b] = softmax(logits of token a)[b].
The engine does not know that: requests run through the full paged, batched, speculative path.
"""

import math

import pytest
import torch
from conftest import greedy_reference, random_prompts, tiny_model

from moekit.infer import Engine, SamplingParams, speculative
from moekit.model.moe import MoE


def proposer_kwargs(kind: str, target):
    if kind == "draft":
        return {"draft": tiny_model(12, n_layer=1, moe_every=1)}
    if kind == "self":  # the target drafting for itself: every draft must be accepted
        return {"draft": target}
    return {"ngram": True}


@pytest.mark.parametrize("num_blocks", [256, 16])  # plenty / preemption forced
@pytest.mark.parametrize("kind", ["draft", "self", "ngram"])
def test_speculative_greedy_equals_plain_decoding(kind, num_blocks):
    model = tiny_model(11)
    prompts = random_prompts([1, 4, 6, 9, 13, 17, 22, 30], seed=12)
    max_tokens = [12, 20, 7, 16, 25, 9, 14, 18]
    engine = Engine(model, num_blocks=num_blocks, block_size=4, max_num_batched_tokens=24, max_model_len=64,
                    num_spec_tokens=3, **proposer_kwargs(kind, model))
    outs = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens])
    for p, m, o in zip(prompts, max_tokens, outs, strict=True):
        assert o.token_ids == greedy_reference(model, p, m), o.request_id
    met = engine.metrics()
    assert met["spec_drafted"] > 0 and (met["preemptions"] > 0) == (num_blocks == 16)
    if kind == "self":
        assert met["spec_accepted"] == met["spec_drafted"]
    acc = met["spec_accepted_per_pos"]
    assert sum(acc) == met["spec_accepted"] and all(a >= b for a, b in zip(acc, acc[1:], strict=False))
    engine.check_idle()


def test_drafts_the_token_budget_cuts_or_defers_keep_the_draft_cache_in_step():
    """Three decoding requests with 3 drafts each need 12 tokens; a budget of 6 leaves one request with
    fewer drafts checked than it had (or none) and another not scheduled at all. The draft model's K/V must
    still follow the target's (this raised "bad RunItem: 0 tokens" before)."""
    model = tiny_model(11)
    engine = Engine(model, num_blocks=256, block_size=4, max_num_batched_tokens=6, num_spec_tokens=3,
                    **proposer_kwargs("draft", model))
    seen = {"cut": 0, "deferred": 0}
    schedule = engine.scheduler.schedule

    def spy():
        out = schedule()
        ids = {s.request.request_id for s in out.scheduled}
        seen["cut"] += sum(len(s.spec_token_ids) < len(s.request.spec_token_ids) for s in out.scheduled)
        seen["deferred"] += sum(r.request_id not in ids and bool(r.spec_token_ids) for r in engine.scheduler.running)
        return out

    engine.scheduler.schedule = spy
    prompts = random_prompts([1, 1, 1], seed=1)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=20))
    assert [o.token_ids for o in outs] == [greedy_reference(model, p, 20) for p in prompts]
    assert seen["cut"] > 0 and seen["deferred"] > 0 and engine.metrics()["spec_drafted"] > 0
    engine.check_idle()


def test_speculative_greedy_with_penalties_equals_plain():
    """Each verified position is penalized with the drafts before it counted as output."""
    model = tiny_model(13)
    prompts = random_prompts([5, 11], seed=14)
    params = SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, presence_penalty=0.4,
                            frequency_penalty=0.2)
    plain = Engine(model, num_blocks=64, block_size=4).generate(prompts, params)
    engine = Engine(model, num_blocks=64, block_size=4, draft=model, num_spec_tokens=4)
    spec = engine.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert engine.metrics()["spec_accepted"] == engine.metrics()["spec_drafted"] > 0
    engine.check_idle()


# ---- sampled: the exact target distribution ------------------------------------------------------
V = 8


def markov_model(seed: int, scale: float):
    model = tiny_model(seed, vocab_size=V, n_layer=1, moe_every=1, d_model=16, n_head=2, n_kv_head=1, d_ff=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks.values():
            block.attn.wo.weight.zero_()
            (block.mlp.experts.w2 if isinstance(block.mlp, MoE) else block.mlp.w2.weight).zero_()
        model.tok_emb.weight.copy_(torch.randn(V, 16, generator=g))
        model.lm_head.weight.copy_(torch.randn(V, 16, generator=g) * scale)
    return model


@torch.no_grad()
def transitions(model) -> torch.Tensor:
    return model(torch.arange(V)[:, None]).logits[:, 0].double().softmax(-1)


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square(df) at 1 - alpha (z = 3.09: alpha = 0.001), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def markov_chi2(seqs: list[list[int]], P: torch.Tensor) -> tuple[float, int, int]:
    """Pearson's statistic of the observed transitions against P, conditioning on each row's count
    (Anderson & Goodman 1957); cells expecting < 5 are pooled within their row. (X^2, df, draws)."""
    N = torch.zeros(V, V, dtype=torch.float64)
    for s in seqs:
        for a, b in zip(s, s[1:], strict=False):
            N[a, b] += 1
    x2, df = 0.0, 0
    for a in range(V):
        n = N[a].sum()
        if n == 0:
            continue
        exp, obs = n * P[a], N[a]
        small = exp < 5
        cells_e = torch.cat([exp[~small], exp[small].sum()[None]]) if small.any() else exp
        cells_o = torch.cat([obs[~small], obs[small].sum()[None]]) if small.any() else obs
        x2 += float(((cells_o - cells_e) ** 2 / cells_e).sum())
        df += len(cells_e) - 1
    return x2, df, int(N.sum())


def run_markov(kind: str, monkeypatch=None, biased: bool = False):
    target, draft = markov_model(21, 0.5), markov_model(22, 0.8)
    kw = {"draft": draft} if kind == "draft" else {"ngram": True}
    engine = Engine(target, num_blocks=2048, block_size=16, max_num_batched_tokens=8192, num_spec_tokens=4, **kw)
    record = []
    verify = speculative.verify

    def recording_verify(p_RV, draft_ids, q_KV, gen, greedy):
        out = verify(p_RV, draft_ids, q_KV, gen, greedy)
        n_acc = len(out) - 1
        for i in range(min(n_acc + 1, len(draft_ids))):  # the positions that were actually tested
            q_V = q_KV[i] if q_KV is not None else torch.nn.functional.one_hot(
                torch.tensor(draft_ids[i]), V).to(p_RV.dtype)
            record.append((float(torch.minimum(p_RV[i], q_V).sum()), i < n_acc))
        return out

    monkeypatch.setattr(speculative, "verify", recording_verify)
    if biased:  # the classic bug: after a rejection, draw from p instead of the residual max(0, p - q)
        monkeypatch.setattr(speculative, "residual", lambda p_V, q_V: p_V)
    prompts = [[i % V] for i in range(256)]  # 256 x 84 tokens: > 20,000 draws in ~60 steps
    params = [SamplingParams(temperature=1.0, max_tokens=84, seed=1000 + i) for i in range(256)]
    outs = engine.generate(prompts, params)
    engine.check_idle()
    return [o.prompt_token_ids + o.token_ids for o in outs], transitions(target), engine.metrics(), record


@pytest.mark.parametrize("kind", ["draft", "ngram"])
def test_sampled_speculative_output_has_the_target_distribution(kind, monkeypatch):
    seqs, P, met, record = run_markov(kind, monkeypatch)
    x2, df, draws = markov_chi2(seqs, P)
    assert draws >= 20_000
    assert x2 < chi2_critical(df), f"chi2 {x2:.1f} with {df} df rejects the target distribution"
    assert met["spec_drafted"] > 5_000 and 0 < met["spec_accepted"] < met["spec_drafted"]
    # Acceptance: each tested position is kept with probability sum(min(p, q)) (Leviathan et al. 2023, thm 3.5).
    expected = sum(a for a, _ in record)
    accepted = sum(ok for _, ok in record)
    sd = math.sqrt(sum(a * (1 - a) for a, _ in record))
    assert accepted == met["spec_accepted"]
    assert abs(accepted - expected) < 4 * sd, f"accepted {accepted}, expected {expected:.0f} +- {sd:.0f}"


def test_chi_square_rejects_a_biased_rejection_sampler(monkeypatch):
    seqs, P, _, _ = run_markov("draft", monkeypatch, biased=True)
    x2, df, draws = markov_chi2(seqs, P)
    assert draws >= 20_000
    assert x2 > chi2_critical(df), f"chi2 {x2:.1f} with {df} df fails to see the bias: the test has no power"
