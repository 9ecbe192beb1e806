"""Checkpoints: round trip, SHA-256 verification with fallback, keep-last-K, and SIGKILL at every point of a save."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg

from moekit.model.transformer import Transformer
from moekit.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_dir,
)
from moekit.train.config import TrainConfig
from moekit.train.optim import build_optimizer

# The tiny config at 16 wide (2 heads of 8, one KV head), 64 tokens, a GELU MoE in both layers, tied embeddings.
CFG = tiny_cfg(vocab_size=64, d_model=16, n_head=2, n_kv_head=1, d_ff=32, moe_every=1, mlp="gelu", max_seq_len=16,
               tie_embeddings=True)


def model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = Transformer(CFG)
    opt = build_optimizer(model, TrainConfig(steps=10))
    return model, opt


def train(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, CFG.vocab_size, (2, 8), generator=gen)
        loss = model(x, x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_round_trip_continues_training_identically(tmp_path):
    model, opt = model_and_opt()
    train(model, opt, 3)
    save_checkpoint(tmp_path, 3, model, opt, {"note": "x"})
    expected = train(model, opt, 3, seed=2)

    model2, opt2 = model_and_opt(seed=5)  # different init: everything must come from the checkpoint
    state = load_checkpoint(step_dir(tmp_path, 3), model2, opt2)
    assert state["step"] == 3 and state["note"] == "x"
    assert train(model2, opt2, 3, seed=2) == expected  # same weights and Adam moments, bit for bit
    assert model2.lm_head.weight is model2.tok_emb.weight  # tied weights stay tied after loading


def test_rng_states_round_trip_through_json():
    import random

    import numpy as np

    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = json.loads(json.dumps(rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    set_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_keeps_the_newest_k(tmp_path):
    model, opt = model_and_opt()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "state"])
def test_corruption_is_detected_and_the_previous_checkpoint_used(tmp_path, damage):
    model, opt = model_and_opt()
    train(model, opt, 1)
    save_checkpoint(tmp_path, 1, model, opt, {})
    good = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, 1)
    newest = save_checkpoint(tmp_path, 2, model, opt, {})
    target = newest / ("state.json" if damage == "state" else "model.safetensors")
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage in ("truncate", "state"):
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match=str(target)):
        load_checkpoint(newest, model)
    messages = []
    fresh, fresh_opt = model_and_opt(seed=7)
    path, state = load_latest(tmp_path, fresh, fresh_opt, log=messages.append)
    assert state["step"] == 1 and path.name == "step_00000001"
    assert str(target) in messages[0]  # the warning names the damaged file
    assert all(torch.equal(fresh.state_dict()[k], good[k]) for k in good)
    # With no good checkpoint left, a clear error naming the file.
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path, fresh, fresh_opt, log=messages.append)


KILLER = r"""
import json, os, shutil, signal, sys
import torch
torch.set_num_threads(1)
from moekit.config import ModelConfig
from moekit.model.transformer import Transformer
from moekit.train import checkpoint as ck

cfg = ModelConfig(**json.loads(sys.argv[2]))
root = sys.argv[1]
model = Transformer(cfg)
opt = torch.optim.AdamW(model.parameters())
model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).loss.backward()
opt.step()
ck.save_checkpoint(os.path.join(root, "base"), 1, model, opt, {}, keep=1)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
real = {"fsync": os.fsync, "rename": os.rename, "rmtree": shutil.rmtree}
results = []
for kill_at in range(1, 100):
    run = os.path.join(root, f"k{kill_at}")
    shutil.copytree(os.path.join(root, "base"), run)
    pid = os.fork()
    if pid == 0:  # the child saves step 2 and is SIGKILLed at its kill_at-th durable operation
        calls = [0]
        def hook(name):
            def f(*a, **k):
                calls[0] += 1
                if calls[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real[name](*a, **k)
            return f
        os.fsync, os.rename, shutil.rmtree = hook("fsync"), hook("rename"), hook("rmtree")
        ck.save_checkpoint(run, 2, model, opt, {}, keep=1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    results.append({"run": run, "killed": killed})
    if not killed:
        break
print(json.dumps(results))
"""


@pytest.mark.slow
def test_sigkill_at_any_point_of_a_save_leaves_a_loadable_checkpoint(tmp_path):
    small = CFG.replace(n_layer=1)
    out = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path), json.dumps(small.to_dict())],
                         capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert len(results) >= 6 and [r["killed"] for r in results] == [True] * (len(results) - 1) + [False]
    steps = []
    for r in results:
        model = Transformer(small)
        opt = torch.optim.AdamW(model.parameters())
        _, state = load_latest(r["run"], model, opt, log=lambda m: None)  # never fails
        steps.append(state["step"])
        # A new save cleans up whatever the killed one left behind.
        save_checkpoint(r["run"], 3, model, opt, {}, keep=1)
        assert [p.name for p in (Path(r["run"]) / "checkpoints").iterdir()] == ["step_00000003"]
    # Killed before the rename: the old checkpoint; after it: the new one. Never a broken one.
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 2
