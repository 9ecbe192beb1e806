"""Images through the engine (moekit/infer/encoder_cache.py, runner.vision): the paged + encoder-cache path
equals full recomputation, batch mates' images do not leak, the prefix cache keys on the image, and the
encoder cache and KV blocks are all free afterwards."""

from __future__ import annotations

import pytest
import torch
from test_vision_model import MARK, models, open_gates

from moekit.infer.engine import Engine
from moekit.infer.sampler import SamplingParams
from moekit.model.vision import VisionInput, image_index

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def vis():
    _, model = models(seed=2, vocab_size=64)
    open_gates(model, 1.5)
    return model


def pixels(seed: int, n: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.rand(n, 3, 16, 16, generator=g) * 2 - 1)


def prompt(seed: int, n: int, markers: tuple[int, ...]) -> list[int]:
    ids = torch.randint(6, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    for p in markers:
        ids[p] = MARK
    return ids


@torch.no_grad()
def recompute(model, ids: list[int], images: list[torch.Tensor], n: int) -> tuple[list[int], list[float]]:
    """Greedy by full recomputation, images encoded every time: the oracle."""
    ids, toks, lps = list(ids), [], []
    visual = model.encode_images(torch.stack(images)) if images else None
    for _ in range(n):
        x = torch.tensor([ids])
        vision = VisionInput(image_index(x, MARK), visual_ILD=visual) if images else None
        logp = model(x, vision=vision).logits[0, -1].log_softmax(-1)
        tok = int(logp.argmax())
        toks.append(tok)
        lps.append(float(logp[tok]))
        ids.append(tok)
    return toks, lps


def engine(model, **kw) -> Engine:
    return Engine(model, None, num_blocks=64, block_size=4, **kw)


def test_paged_and_encoder_cache_equal_full_recomputation(vis):
    """Chunked prefill (a 7-token budget), two images in one prompt, a text-only and a late-image request."""
    cases = [(prompt(1, 20, (2, 11)), pixels(1, 2)), (prompt(2, 9, ()), []), (prompt(3, 15, (13,)), pixels(3))]
    eng = engine(vis, max_num_batched_tokens=7)
    outs = eng.generate([c[0] for c in cases], GREEDY, images=[c[1] for c in cases])
    for (ids, imgs), out in zip(cases, outs, strict=True):
        toks, lps = recompute(vis, ids, imgs, GREEDY.max_tokens)
        assert out.token_ids == toks
        got = [lp.logprob for lp in out.logprobs]
        assert max(abs(a - b) for a, b in zip(got, lps, strict=True)) < 1e-5
    assert eng.metrics()["images_encoded"] == 3
    eng.check_idle()


def test_a_requests_output_does_not_depend_on_its_batch_mates_images(vis):
    a = (prompt(4, 12, (1,)), pixels(4))
    runs = []
    for mate_seed in (5, 6):
        eng = engine(vis)
        outs = eng.generate([a[0], prompt(5, 12, (3,))], GREEDY, images=[a[1], pixels(mate_seed)])
        runs.append(outs)
        eng.check_idle()
    assert runs[0][0].token_ids == runs[1][0].token_ids
    assert [x.logprob for x in runs[0][0].logprobs] == [x.logprob for x in runs[1][0].logprobs]  # bitwise
    assert [x.logprob for x in runs[0][1].logprobs] != [x.logprob for x in runs[1][1].logprobs]  # the mate's did


def test_the_image_changes_the_answer_and_text_only_requests_batch_with_it(vis):
    ids = prompt(7, 10, (0,))
    eng = engine(vis)
    outs = eng.generate([ids, ids, prompt(8, 10, ())], GREEDY, images=[pixels(7), pixels(8), []])
    assert [x.logprob for x in outs[0].logprobs] != [x.logprob for x in outs[1].logprobs]
    assert outs[2].token_ids == recompute(vis, prompt(8, 10, ()), [], GREEDY.max_tokens)[0]
    eng.check_idle()


def test_prefix_cache_keys_include_the_image(vis):
    ids = prompt(9, 17, (0,))  # 4 full blocks of 4
    eng = engine(vis)
    first = eng.generate([ids], GREEDY, images=[pixels(9)])[0]
    same = eng.generate([ids], GREEDY, images=[pixels(9)])[0]
    other = eng.generate([ids], GREEDY, images=[pixels(10)])[0]
    assert first.num_cached_tokens == 0 and same.num_cached_tokens == 16 and other.num_cached_tokens == 0
    assert same.token_ids == first.token_ids
    assert other.token_ids == recompute(vis, ids, pixels(10), GREEDY.max_tokens)[0]
    eng.check_idle()


def test_preemption_and_abort_free_the_encoder_cache(vis):
    eng = Engine(vis, None, num_blocks=9, block_size=4)  # too few blocks for both: one is preempted
    long = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    r1 = eng.add_request(prompt(11, 8, (0,)), long, images=pixels(11))
    r2 = eng.add_request(prompt(12, 8, (2,)), long, images=pixels(12))
    while eng.has_unfinished():
        eng.step()
    assert eng.scheduler.num_preemptions >= 1
    assert eng.result(r1).token_ids == recompute(vis, prompt(11, 8, (0,)), pixels(11), 14)[0]
    assert eng.result(r2).token_ids == recompute(vis, prompt(12, 8, (2,)), pixels(12), 14)[0]
    eng.check_idle()
    rid = eng.add_request(prompt(13, 8, (0,)), long, images=pixels(13))
    assert eng.metrics()["encoder_cache_requests"] == 1 and eng.metrics()["encoder_cache_bytes"] > 0
    eng.step()
    eng.abort(rid)
    eng.check_idle()


def test_bad_image_requests_change_nothing(vis, markov_lm):
    eng = engine(vis)
    with pytest.raises(ValueError, match="2 image markers .* but 1 images"):
        eng.add_request(prompt(1, 8, (1, 4)), GREEDY, images=pixels(1))
    with pytest.raises(ValueError, match="image marker .* but no image"):
        eng.add_request(prompt(1, 8, (1,)), GREEDY)
    with pytest.raises(ValueError, match="at most 8"):
        eng.add_request(prompt(1, 20, tuple(range(9))), GREEDY, images=pixels(1, 9))
    with pytest.raises(ValueError, match="shape"):
        eng.add_request(prompt(1, 8, (1,)), GREEDY, images=[torch.zeros(3, 8, 8)])
    text_only = Engine(markov_lm[0], None, num_blocks=16)
    with pytest.raises(ValueError, match="does not take images"):
        text_only.add_request([1, 2, 3], GREEDY, images=pixels(1))
    assert not eng.requests and not text_only.requests
    eng.check_idle()
