"""The training loop's arithmetic: LR schedule, batch ramp, grad accumulation, bits per byte, MFU, routing
metrics, the KV-cache sampler against full recomputation, and context extension."""

import argparse
import math
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moekit.counts import count_params
from moekit.model.moe import RoutingInfo
from moekit.model.transformer import Transformer
from moekit.presets import get_preset
from moekit.train.cli import extend_context
from moekit.train.config import TrainConfig
from moekit.train.data import Mixture, PackedSource
from moekit.train.loop import Trainer, evaluate
from moekit.train.metrics import (
    RoutingStats,
    bits_per_byte,
    format_log_line,
    measure_gemm_peak,
    mfu,
    read_metrics,
    train_flops_per_token,
)
from moekit.train.optim import batch_tokens_at, lr_at, micro_sizes, param_groups, sequences_at, steps_that_fit
from moekit.train.sample import generate, sample_next

# The tiny config at 16 wide (2 heads of 8, one KV head), 50 tokens, a GELU MoE in both layers, 32-token context.
CFG = tiny_cfg(vocab_size=50, d_model=16, n_head=2, n_kv_head=1, d_ff=32, moe_every=1, mlp="gelu", max_seq_len=32)


def test_lr_warmup_then_cosine_to_the_floor():
    tc = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, tc, 110) == pytest.approx(1e-4) and lr_at(9, tc, 110) == pytest.approx(1e-3)
    assert lr_at(10, tc, 110) == pytest.approx(1e-3)
    assert lr_at(60, tc, 110) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way down the cosine
    assert lr_at(110, tc, 110) == pytest.approx(1e-4) and lr_at(500, tc, 110) == pytest.approx(1e-4)
    after = [lr_at(s, tc, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))


def test_batch_ramp_grows_linearly_in_tokens_per_step():
    tc = TrainConfig(steps=1, batch_tokens=1024, batch_tokens_start=256, batch_ramp_tokens=10_000, grad_accum=2)
    assert batch_tokens_at(0, tc) == 256 and batch_tokens_at(5_000, tc) == 640
    assert batch_tokens_at(10_000, tc) == 1024 and batch_tokens_at(10**9, tc) == 1024
    assert sequences_at(0, tc, 64) == 4 and sequences_at(5_000, tc, 64) == 10 and sequences_at(10**6, tc, 64) == 16
    assert sequences_at(0, tc, 512) == 2  # never fewer sequences than micro-batches
    assert batch_tokens_at(0, TrainConfig(steps=1, batch_tokens=1024, batch_tokens_start=0)) == 1024  # no ramp
    # The step count that a token budget buys follows the ramp.
    seen, step, budget = 0, 0, 20_000
    while sequences_at(seen, tc, 64) * 64 <= budget:
        budget -= sequences_at(seen, tc, 64) * 64
        seen += sequences_at(seen, tc, 64) * 64
        step += 1
    assert steps_that_fit(0, 0, 20_000, tc, 64) == step and 20 < step < 80


def test_micro_batches_split_evenly():
    assert micro_sizes(10, 3) == [4, 3, 3] and micro_sizes(2, 4) == [1, 1] and sum(micro_sizes(17, 5)) == 17


@pytest.mark.parametrize("bad", [dict(lr=0), dict(batch_tokens=0), dict(grad_accum=0), dict(dtype="fp8"),
                                 dict(batch_tokens_start=10**6), dict(batch_tokens_start=10, batch_ramp_tokens=0),
                                 dict(max_minutes=0),
                                 dict(val_fraction=0.7), dict(warmup_steps=-1), dict(compile="yes")])
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**{"steps": 0 if "max_minutes" in bad else 10, **bad})


def test_no_weight_decay_on_norms_and_biases():
    cfg = CFG.replace(n_expert=1, top_k=1, norm="layernorm", bias=True)
    model = Transformer(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert any(names[id(p)].endswith("bias") for p in no_decay["params"])
    moe = Transformer(CFG)
    assert any(p.dim() == 3 for p in param_groups(moe, 0.1)[0]["params"])  # stacked experts are decayed


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # The Switch load-balancing loss is a product of two batch means, so it is not additive over
    # micro-batches (as in every framework); with it off, 3 micro-batches give the 1-batch gradient.
    grads = []
    for accum in (1, 3):
        torch.manual_seed(0)
        model = Transformer(CFG.replace(aux_loss_coef=0.0))
        src = PackedSource("s", 1.0, np.arange(2000, dtype=np.uint16) % 50, 16)
        tc = TrainConfig(steps=1, batch_tokens=96, batch_tokens_start=0, grad_accum=accum, dtype="fp32",
                         grad_clip=0)
        trainer = Trainer(model, tc, 16, Mixture([src], 0), {}, torch.ones(50), tmp_path / str(accum),
                          torch.device("cpu"), None)
        captured = {}

        def capture(opt, args, kwargs, model=model, captured=captured):  # before the AdamW step: the gradients
            captured.update({n: p.grad.clone() for n, p in model.named_parameters()})

        trainer.opt.register_step_pre_hook(capture)
        rec = trainer.train_step()
        grads.append((captured, rec["loss"]))
    (g1, l1), (g3, l3) = grads
    assert l1 == pytest.approx(l3, rel=1e-5)
    for name in g1:
        torch.testing.assert_close(g3[name], g1[name], rtol=1e-4, atol=1e-6)


def test_compiled_blocks_trace_and_give_the_eager_loss_and_gradients():
    """TrainConfig.compile compiles every block in place (state-dict names unchanged). Here dynamo traces
    the blocks with the aot_eager backend (no C++ code generation, so it takes seconds on a CPU): the
    traced forward and backward must equal the eager ones. The inductor backend runs in the GPU test."""
    from moekit.train import cli as train_cli

    torch.manual_seed(0)
    model = Transformer(CFG)
    names = list(model.state_dict())
    x, y = torch.randint(0, 50, (2, 32)), torch.randint(0, 50, (2, 32))
    model(x, y).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for block in model.blocks.values():
        block.compile(backend="aot_eager")
    loss = model(x, y).loss
    loss.backward()
    assert list(model.state_dict()) == names
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-7)
    trainer = Trainer(Transformer(CFG), TrainConfig(steps=1, compile=True), 16, None, {}, torch.ones(50), "unused",
                      torch.device("cpu"), None)
    assert all(b._compiled_call_impl is not None for b in trainer.model.blocks.values())
    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    assert p.parse_args(["--compile"]).compile is True and p.parse_args([]).compile is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_train_step_on_gpu_matches_eager(tmp_path):
    losses = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = Transformer(CFG.replace(d_model=64, d_ff=128, head_dim=32)).cuda()
        src = PackedSource("s", 1.0, np.arange(20000, dtype=np.uint16) % 50, 32)
        tc = TrainConfig(steps=3, batch_tokens=512, batch_tokens_start=0, dtype="bf16", compile=compile_)
        trainer = Trainer(model, tc, 32, Mixture([src], 0), {}, torch.ones(50), tmp_path / str(compile_),
                          torch.device("cuda"), None)
        losses.append([trainer.train_step()["loss"] for _ in range(3)])
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


# ---- bits per byte and MFU ---------------------------------------------------------------------------
def test_bits_per_byte_arithmetic():
    # 1,000 tokens of a uniform model over 256 symbols, each token 2 bytes: 8 bits/token, 4 bits/byte.
    assert bits_per_byte(1000 * math.log(256), 2000) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_evaluate_matches_a_direct_cross_entropy_and_a_uniform_model():
    torch.manual_seed(0)
    model = Transformer(CFG)
    windows = [np.random.default_rng(i).integers(0, 50, 17) for i in range(5)] + [np.arange(9)]
    token_bytes = torch.arange(50) % 4 + 1  # pretend token t spells t % 4 + 1 bytes
    res = evaluate(model, {"v": windows}, token_bytes, batch=2, device=torch.device("cpu"), dtype=None)
    nats, n_tok, n_bytes = 0.0, 0, 0
    for w in windows:
        t = torch.from_numpy(w)[None]
        logits = model(t[:, :-1]).logits
        nats += F.cross_entropy(logits[0], t[0, 1:], reduction="sum").item()
        n_tok += len(w) - 1
        n_bytes += int(token_bytes[t[0, 1:]].sum())
    assert res["v"]["tokens"] == n_tok and res["v"]["bytes"] == n_bytes
    assert res["v"]["loss"] == pytest.approx(nats / n_tok, rel=1e-5)
    assert res["v"]["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert res["all"] == res["v"]
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform predictions: loss = ln V exactly
    res = evaluate(model, {"v": windows}, token_bytes, 4, torch.device("cpu"), None)
    assert res["v"]["loss"] == pytest.approx(math.log(50), rel=1e-6)
    assert res["v"]["bpb"] == pytest.approx(math.log2(50) * n_tok / n_bytes, rel=1e-6)


def test_evaluate_pads_windows_for_sequence_parallelism_without_changing_the_result():
    """Sequence parallelism needs lengths divisible by --tp: windows of 16 and 8 tokens are padded to multiples of 3
    at their end, and causal attention leaves the real positions' losses as they were."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    windows = [np.random.default_rng(i).integers(0, 50, 17) for i in range(3)] + [np.arange(9)]
    token_bytes = torch.ones(50, dtype=torch.long)
    cpu = torch.device("cpu")
    plain = evaluate(model, {"v": windows}, token_bytes, 2, cpu, None)
    padded = evaluate(model, {"v": windows}, token_bytes, 2, cpu, None, multiple_of=3)
    assert padded["v"]["tokens"] == plain["v"]["tokens"] == 3 * 16 + 8
    assert padded["v"]["loss"] == pytest.approx(plain["v"]["loss"], rel=1e-6)


def test_training_flops_per_token_hand_worked_and_counted_by_torch():
    cfg = CFG.replace(tie_embeddings=True)
    # Active parameters, by hand: the tied embedding (read by the lm_head matmul) 50 x 16 = 800; attention
    # per layer q 16 x 16 + k, v 16 x 8 each (one KV head) + o 16 x 16 = 768, x 2 layers = 1,536; a GELU
    # expert 2 x 16 x 32 = 1,024, 2 of 4 per token x 2 layers = 4,096; routers 2 x 4 x 16 = 128; norms
    # (2 x 2 + 1) x 16 = 80. Total: 6,640; the model holds the 2 skipped experts of each layer besides.
    c = count_params(cfg)
    assert c.active == 800 + 1536 + 4096 + 128 + 80 == 6640 and c.total == 6640 + 2 * 2 * 1024
    # Forward: 2 FLOPs per active parameter, 13,280, + attention over 32 tokens (QK^T and AV, 2 FLOPs per
    # multiply-add each): 4 x 32 keys x 16 query channels x 2 layers = 4,096. Training: 3 x forward.
    assert train_flops_per_token(cfg, 32) == 3 * (2 * 6640 + 4096) == 52_128
    # torch's FLOP counter over a real forward and backward pass (the math attention kernel, which it sees
    # as matmuls) counts the same, less the norms: they are in N by convention but multiply elementwise.
    model = Transformer(cfg)
    x = torch.randint(0, 50, (2, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x).loss.backward()
    assert counter.get_total_flops() / x.numel() == 52_128 - 3 * 2 * 80


def test_mfu_of_the_articles_gpt4_run_is_32_to_36_percent():
    # SPEC 3: ~13T tokens on ~25,000 A100s (312 TFLOP/s bf16, SPEC 6) for 90-100 days at 32-36% MFU, where
    # MFU counts 6 x active parameters per token and no attention term (SPEC 6): seq_len 0.
    f = train_flops_per_token(get_preset("gpt4"), 0)
    assert f * 13e12 == pytest.approx(2.15e25, rel=0.03)  # SPEC 3: ~2.15e25 FLOPs
    peak = 25_000 * 312e12
    at = {days: mfu(13e12 / (days * 86_400), f, peak) for days in (90, 100)}
    assert 0.32 <= at[100] < at[90] <= 0.36
    # The definition at a round figure: the throughput whose model FLOP/s are half the peak is 50% MFU.
    assert mfu(peak / 2 / f, f, peak) == pytest.approx(0.5)


def test_log_line_format():
    line = format_log_line(120, 3.2101, 3e-4, 152_000, 0.412, 1.081)
    assert line == "step 120 | loss 3.210 | lr 3.0e-04 | 152.0k tok/s | mfu 41.2% | moe imbalance 1.08"


def test_gemm_probe_measures_a_positive_peak():
    peak = measure_gemm_peak(torch.float32, "cpu", n=128, min_seconds=0.01)
    assert math.isfinite(peak) and peak > 1e6


def test_routing_stats_imbalance_entropy_dropped_dead():
    stats = RoutingStats()
    info = lambda counts, dropped, ent: RoutingInfo(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(counts),  # noqa
                                                     torch.tensor(dropped), torch.tensor(ent))
    stats.add([info([4, 4, 0, 0], 0, 1.0), info([2, 2, 2, 2], 2, 1.2)])
    stats.add([info([4, 0, 0, 0], 0, 0.5), info([2, 2, 2, 2], 0, 1.4)])
    s = stats.summary()
    assert s["tokens_per_expert"] == [[8, 4, 0, 0], [4, 4, 4, 4]]
    assert s["imbalance"] == [pytest.approx(8 / 3), 1.0]
    assert s["dead_experts"] == [2, 0] and s["entropy"] == [pytest.approx(0.75), pytest.approx(1.3)]
    assert s["dropped_frac"] == [0.0, pytest.approx(2 / 18)]
    stats.reset()
    assert stats.summary() is None


# ---- sampling --------------------------------------------------------------------------------------
def generate_no_cache(model, prompt, n, temperature, top_k, gen, stop_id=None):
    """Oracle: recompute the whole sequence for every new token."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(sample_next(logits, temperature, top_k, gen))
        if ids[-1] == stop_id:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 10), (0.7, 0)])
def test_kv_cache_sampler_matches_full_recomputation(temperature, top_k):
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        fast = generate(model, [1, 2, 3], 20, temperature, top_k, torch.Generator().manual_seed(5))
        slow = generate_no_cache(model, [1, 2, 3], 20, temperature, top_k, torch.Generator().manual_seed(5))
    assert fast == slow and len(fast) == 20
    with torch.no_grad():  # stops at the end-of-document token, and at the context length
        stop = fast[5]
        assert generate(model, [1, 2, 3], 100, temperature, top_k, torch.Generator().manual_seed(5),
                        stop_id=stop) == fast[:fast.index(stop) + 1]
        assert len(generate(model, [1] * 30, 100, temperature, top_k, torch.Generator().manual_seed(0))) == 2


def test_top_k_only_samples_the_k_most_likely():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0, 3.0])
    gen = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, 2, gen) for _ in range(200)} == {1, 2}


# ---- context extension ----------------------------------------------------------------------------------
def test_context_extension_sets_linear_rope_interpolation():
    cfg = extend_context(CFG, 128)
    assert cfg.max_seq_len == 128 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    again = extend_context(cfg, 256)  # 32 -> 128 -> 256: factor 8 relative to the original training length
    assert again.rope_scaling["factor"] == 8.0
    # Interpolated positions: position 4p of the extended model sees the angles of position p of the base.
    from moekit.model.attention import rope_inv_freq
    assert torch.allclose(rope_inv_freq(cfg) * 4, rope_inv_freq(CFG))


def test_a_timed_run_anneals_on_the_clock(tmp_path):
    src = PackedSource("s", 1.0, np.arange(5000, dtype=np.uint16) % 50, 16)
    tc = TrainConfig(max_minutes=1.0, warmup_steps=2, batch_tokens=64, batch_tokens_start=0, eval_every=0)
    trainer = Trainer(Transformer(CFG), tc, 16, Mixture([src], 0), {}, torch.ones(50), tmp_path,
                      torch.device("cpu"), None)
    s = trainer.state
    end = 0.98 * 60 - 0.02 * 60  # the budget less a margin and the (estimated) final evaluation
    assert trainer.end_seconds() == pytest.approx(end)
    s.step, s.train_seconds = 1, 3.0
    assert trainer.time_progress() is None  # still warming up, by steps
    s.step, s.train_seconds = 2, 5.0
    assert trainer.time_progress() == 0.0 and s.warmup_seconds == 5.0
    s.train_seconds = 5.0 + (end - 5.0) / 2
    assert trainer.time_progress() == pytest.approx(0.5) and not trainer.finished()
    assert lr_at(s.step, tc, None, trainer.time_progress()) == pytest.approx(tc.lr * (0.1 + 0.9 * 0.5))
    s.train_seconds = end
    assert trainer.finished() and lr_at(99, tc, None, trainer.time_progress()) == pytest.approx(0.1 * tc.lr)
    s.train_seconds, s.tokens_seen = 10.0, 128
    n = trainer.estimate_total_steps(1e-3)  # at 1 ms a token a 64-token step takes 64 ms
    # The steps left are as many as fit in the time left, and no more: 47.6 s / 64 ms = 743.75.
    assert (n - 2) * 0.064 <= end - 10.0 < (n - 1) * 0.064 and n == 2 + 743


class SigtermDuringFirstStep(Mixture):
    """Training data whose first batch comes with a real SIGTERM to this process, as `kill` sends it."""

    def next_batch(self, n):
        if self.next_seq == 0:
            signal.raise_signal(signal.SIGTERM)
        return super().next_batch(n)


def test_a_stop_signal_ends_the_run_with_a_checkpoint(tmp_path):
    src = PackedSource("s", 1.0, np.arange(5000, dtype=np.uint16) % 50, 16)
    val = {"s": [np.arange(17) % 50]}
    tc = TrainConfig(steps=50, batch_tokens=32, batch_tokens_start=0, eval_every=0, save_every=0, log_every=100)
    trainer = Trainer(Transformer(CFG), tc, 16, SigtermDuringFirstStep([src], 0), val,
                      torch.ones(50, dtype=torch.long), tmp_path, torch.device("cpu"), None)
    outside = []  # SIGTERMs that reach the handler in place before the run (should the run install none,
    # this one catches the signal, and the test fails on its assertions instead of pytest dying)

    def mine(signum, frame):
        outside.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        result = trainer.run(log=lambda m: None, progress=False)
        assert signal.getsignal(signal.SIGTERM) is mine  # the run put the old handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert outside == []  # the run's own handler took the signal
    assert trainer.state.step == 1 and result["s"]["tokens"] == 16
    assert (tmp_path / "checkpoints" / "step_00000001" / "state.json").is_file()
    end = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "end"]
    assert end[-1]["stopped_by_signal"] == signal.SIGTERM
