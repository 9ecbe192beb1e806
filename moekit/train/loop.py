"""The training loop: AdamW, warmup + cosine, a batch-size ramp, grad accumulation, bf16 autocast, eval.

GPT-4's recipe at any scale (SPEC section 3): the batch grows linearly in tokens per step from
`batch_tokens_start` to `batch_tokens` over the first `batch_ramp_tokens` tokens (GPT-4 ramped to
60M over days; GPT-3, Brown et al. 2020 appendix B, over its first 4-12B tokens). Every quantity
that shapes a step (learning rate, batch size, the data drawn) is a pure function of the state a
checkpoint records, so `--resume` reproduces the uninterrupted run's losses bit for bit (the optimizer and
those schedules are moekit/train/optim.py; a pipeline's step is moekit/train/pipelined.py).

- AdamW with decoupled weight decay on matrices only: norms, biases and other 1-D tensors are not
  decayed (nanoGPT `configure_optimizers`, torchtitan). Master weights stay fp32; matmuls run in
  bf16 under autocast where the hardware has bf16 units.
- The loss is `ModelOutput.loss`: cross-entropy + the MoE load-balancing and router z-losses.
- Without `--steps`, the run's length is `--max-minutes` and the cosine runs over time: its progress
  is the share of the post-warmup time budget spent, so the learning rate reaches its floor at the
  deadline even when the machine's speed changes. Such a run depends on timing; bit-exact resume
  is a property of runs with `--steps` (a timed run resumes with its elapsed time and schedule).

Shape legend: B sequences, T tokens per sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moekit.parallel.data import clip_grad_norm, gradient_sync, shard_optimizer, unwrap
from moekit.parallel.mesh import data_rank
from moekit.parallel.parallelize import Layout, parallelize
from moekit.train.checkpoint import rng_state
from moekit.train.config import TrainConfig
from moekit.train.data import Mixture
from moekit.train.metrics import MetricsLog, RoutingStats, bits_per_byte, format_log_line, mfu, train_flops_per_token
from moekit.train.optim import build_optimizer, lr_at, micro_sizes, sequences_at, steps_that_fit
from moekit.util import cpu_has_bf16

CALIBRATION_STEPS = 3  # steps timed before a --max-minutes run estimates its step count


# ---- numerics and seeding ---------------------------------------------------------------------------
def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32) for --dtype auto|bf16|fp32."""
    if choice == "fp32":
        return None
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    if choice == "bf16" or supported:
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, val: dict[str, list[np.ndarray]], token_bytes_V: torch.Tensor,
             batch: int, device: torch.device, dtype: torch.dtype | None, rank: int = 0, world: int = 1,
             group=None, multiple_of: int = 1) -> dict:
    """Validation loss (nats per token) and bits per byte for each source and for all together.

    With `world` data-parallel ranks, rank r evaluates the batches r, r + world, ... and the sums are
    all-reduced over `group`. Every rank runs the same number of forward passes (a rank short of a batch
    repeats one and drops it): sharded models and the MoE's global statistics need every rank in each.
    `multiple_of`: sequence parallelism needs a length divisible by --tp; a shorter last window is padded at
    its end and the padding's logits dropped (attention is causal, so the real positions are unchanged).
    """
    was_training = model.training
    model.eval()
    names = list(val)
    sums = torch.zeros(len(names), 3, dtype=torch.float64)  # nats, tokens, bytes per source
    batches = []
    for k, name in enumerate(names):
        windows, i = val[name], 0
        while i < len(windows):
            j = i + 1  # a batch of windows of equal length (only the last one of a stream can be shorter)
            while j < len(windows) and j - i < batch and len(windows[j]) == len(windows[i]):
                j += 1
            batches.append((k, windows[i:j]))
            i = j
    rounds = -(-len(batches) // world)
    for b in range(rounds):
        index = b * world + rank
        k, windows = batches[min(index, len(batches) - 1)]
        xy_BT = torch.from_numpy(np.stack(windows)).to(device)
        x_BT, y_BT = xy_BT[:, :-1], xy_BT[:, 1:]
        T, pad = x_BT.shape[1], -x_BT.shape[1] % multiple_of
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits_BTV = model(F.pad(x_BT, (0, pad)) if pad else x_BT).logits
        if index >= len(batches):  # this rank's padding pass: every rank ran one, nothing is counted
            continue
        if hasattr(logits_BTV, "full_tensor"):  # vocabulary-sharded logits of a tensor-parallel model
            logits_BTV = logits_BTV.full_tensor()
        logits = logits_BTV[:, :T].flatten(0, 1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, never narrower
        sums[k, 0] += F.cross_entropy(logits, y_BT.flatten(), reduction="sum").item()
        sums[k, 1] += y_BT.numel()
        sums[k, 2] += int(token_bytes_V[y_BT.cpu()].sum())
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    out = {}
    for k, name in enumerate(names):
        nats, n_tok, n_bytes = sums[k].tolist()
        out[name] = {"loss": nats / max(1, n_tok), "bpb": bits_per_byte(nats, int(n_bytes)) if n_bytes else None,
                     "tokens": int(n_tok), "bytes": int(n_bytes)}
    nats, n_tok, n_bytes = sums.sum(0).tolist()
    out["all"] = {"loss": nats / max(1, n_tok), "bpb": bits_per_byte(nats, int(n_bytes)) if n_bytes else None,
                  "tokens": int(n_tok), "bytes": int(n_bytes)}
    model.train(was_training)
    return out


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _quiet(line: str) -> None:  # the log of every rank but the main one
    pass


# ---- the loop --------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What a checkpoint records beyond tensors; with them it determines the rest of the run."""

    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    total_steps: int | None = None  # --steps; for a --max-minutes run, an estimate (progress bar, logs)
    train_seconds: float = 0.0  # wall time spent in the loop, over all resumes
    warmup_seconds: float | None = None  # train_seconds when warmup ended (the time schedule's origin)
    last_eval: dict = field(default_factory=dict)


class Trainer:
    """One training run, on one process or as one rank of a `layout` (moekit/parallel/).

    Every rank runs the same loop on the same data stream: rank r of D data-parallel ranks computes the
    r-th contiguous slice of every micro-batch (tensor-parallel ranks of one data rank see the same
    slice), so the global batch, its ramp and the token mixture are exactly one process's. Losses and
    routing statistics are summed over the data-parallel ranks; only the main rank logs and writes.
    `model` is the built, unparallelized Transformer: the trainer applies the layout (`parallelize`:
    tensor parallel -> recomputation -> compile -> data parallel), then builds the optimizer on it.
    """

    def __init__(self, model: torch.nn.Module, tc: TrainConfig, seq_len: int, mixture: Mixture,
                 val: dict[str, list[np.ndarray]], token_bytes_V: torch.Tensor, run_dir: Path,
                 device: torch.device, peak_flops: float | None, extra_state: dict | None = None,
                 layout: Layout | None = None):
        self.tc, self.seq_len, self.mixture, self.val = tc, seq_len, mixture, val
        self.token_bytes_V, self.run_dir, self.device = token_bytes_V, Path(run_dir), device
        self.layout = layout or Layout.single(device)
        self.dtype = amp_dtype(tc.dtype, device)
        self.dp_rank, self.dp_size = data_rank(self.layout.mesh)
        smallest = sequences_at(0, tc, seq_len) // tc.grad_accum
        if smallest < self.dp_size:
            raise ValueError(f"the first steps' micro-batches hold {smallest} sequences, fewer than the {self.dp_size} "
                             "data-parallel ranks: raise --batch-tokens-start (or --batch-tokens), lower "
                             "--grad-accum, or use fewer data-parallel ranks")
        self.pipe = None  # with --pp: this rank's stages and their schedule (moekit/parallel/pipeline.py)
        if self.layout.dims.pp > 1:  # split first, then parallelize each stage (torchtitan's pipeline_llm)
            from moekit.parallel.pipeline import PipelineModel, build_pipeline
            from moekit.train.pipelined import check_pipeline_batch

            check_pipeline_batch(tc, seq_len, self.dp_size, sequences_at(0, tc, seq_len))
            self.pipe = build_pipeline(model, self.layout, self.layout.pipeline.replace(microbatches=tc.grad_accum))
            self.pipe.attach([parallelize(p, self.layout, recompute=tc.recompute, compile=tc.compile)
                              for p in self.pipe.parts])
            self.model, self.raw = PipelineModel(self.pipe), self.pipe.raw
        else:
            self.model = parallelize(model, self.layout, recompute=tc.recompute, compile=tc.compile)
            self.raw = unwrap(self.model)  # the Transformer itself (cfg, blocks, state dict names)
        self.opt = shard_optimizer(build_optimizer(self.raw, tc), self.layout.dims, self.layout.mesh)
        self.state = TrainState(total_steps=tc.steps or None)
        self.timed = not tc.steps  # the length of the run is a time budget (see the module docstring)
        self.eval_seconds: float | None = None  # how long the last evaluation took
        self.flops_per_token = train_flops_per_token(self.raw.cfg, seq_len)
        self.peak = peak_flops  # of one rank's device; MFU divides by the whole world's
        self.extra_state = extra_state or {}  # recorded in checkpoints (data fingerprints, ...)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.layout.is_main)
        self.routing = RoutingStats()
        self._stop_signal: int | None = None

    # -- state ----------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        s = self.state
        return {"tokens_seen": s.tokens_seen, "total_steps": s.total_steps, "train_seconds": s.train_seconds,
                "warmup_seconds": s.warmup_seconds, "last_eval": s.last_eval, "data": self.mixture.state_dict(),
                "rng": rng_state(),
                **self.extra_state}

    def restore(self, ckpt: dict) -> None:
        """Take up a checkpoint's state (its tensors are already loaded into model and optimizer)."""
        from moekit.train.checkpoint import set_rng_state

        self.state = TrainState(step=ckpt["step"], tokens_seen=ckpt["tokens_seen"], total_steps=ckpt["total_steps"],
                                train_seconds=ckpt["train_seconds"], warmup_seconds=ckpt.get("warmup_seconds"),
                                last_eval=ckpt.get("last_eval", {}))
        if self.tc.steps:  # --steps given again on resume wins (a longer run changes the schedule's end)
            self.state.total_steps = self.tc.steps
        self.mixture.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])

    def save(self) -> Path:
        from moekit.train.dist_checkpoint import save_trainer

        return save_trainer(self)

    def load_latest(self, run_dir: str | Path, with_optimizer: bool = True, log=print) -> tuple[Path, dict]:
        """Load the newest checkpoint of `run_dir` that verifies into this trainer's (sharded) model and, unless
        `with_optimizer` is False (--init-from), its optimizer; (path, the state.json record)."""
        from moekit.train.dist_checkpoint import load_trainer

        return load_trainer(self, run_dir, with_optimizer, log)

    # -- one optimizer step --------------------------------------------------------------------------------
    def train_step(self) -> dict:
        if self.pipe is not None:
            from moekit.train.pipelined import pipeline_train_step

            n_seqs = sequences_at(self.state.tokens_seen, self.tc, self.seq_len)
            lr = lr_at(self.state.step, self.tc, self.state.total_steps, self.time_progress())
            return pipeline_train_step(self, n_seqs, lr, micro_sizes(n_seqs, self.tc.grad_accum))
        tc, s = self.tc, self.state
        n_seqs = sequences_at(s.tokens_seen, tc, self.seq_len)
        lr = lr_at(s.step, tc, s.total_steps, self.time_progress())
        for g in self.opt.param_groups:
            g["lr"] = lr
        keys = ("loss", "ce_loss", "aux_loss", "z_loss")
        sums = torch.zeros(len(keys), dtype=torch.float64, device=self.device)  # summed on the device, read once
        present = [False] * len(keys)
        micro = micro_sizes(n_seqs, tc.grad_accum)
        for i, m in enumerate(micro):
            x_BT, y_BT, _ = self.mixture.next_batch(m)  # every rank draws the whole micro-batch, keeps its slice
            lo, hi = self.dp_rank * m // self.dp_size, (self.dp_rank + 1) * m // self.dp_size
            x_BT, y_BT = x_BT[lo:hi].to(self.device, non_blocking=True), y_BT[lo:hi].to(self.device, non_blocking=True)
            # This slice's mean loss weighted by its share of the step: the step's gradient is the gradient of
            # the mean over all its tokens, however the sequences are split into micro-batches and ranks. Data
            # parallelism averages the D ranks' gradients, hence the factor D.
            share = (hi - lo) / n_seqs
            with gradient_sync(self.model, i == len(micro) - 1), self._loss_context():
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                    enabled=self.dtype is not None):
                    out = self.model(x_BT, y_BT)
                (out.loss * (share * self.dp_size)).backward()
            for k, key in enumerate(keys):
                value = getattr(out, key)
                if value is not None:
                    sums[k] += value.detach().to(torch.float64) * share
                    present[k] = True
            self.routing.add(out.routing)
        group = self.layout.dp_group
        if group is not None:  # the step's losses over the whole global batch
            torch.distributed.all_reduce(sums, group=group)
        grad_norm = clip_grad_norm(self.model.parameters(), tc.grad_clip).item() if tc.grad_clip > 0 else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        s.step += 1
        s.tokens_seen += n_seqs * self.seq_len
        values = sums.tolist()
        losses = {key: (values[k] if present[k] else None) for k, key in enumerate(keys)}
        return {**losses, "lr": lr, "grad_norm": grad_norm, "batch_tokens": n_seqs * self.seq_len}

    def _loss_context(self):
        """Tensor parallelism's vocabulary-parallel loss (forward and backward inside it); else nothing."""
        if self.layout.dims.tp > 1 and self.layout.loss_parallel:
            from moekit.parallel.tensor import loss_context

            return loss_context(True)
        return contextlib.nullcontext()

    # -- evaluation ------------------------------------------------------------------------------------
    def eval_batch(self) -> int:
        return max(1, self.tc.batch_tokens // self.seq_len // self.tc.grad_accum)

    def run_eval(self) -> dict:
        result = evaluate(self.model, self.val, self.token_bytes_V, self.eval_batch(), self.device, self.dtype,
                          self.dp_rank, self.dp_size, self.layout.dp_group,
                          multiple_of=self.layout.dims.tp if self.layout.sequence_parallel else 1)
        if self.pipe is not None:  # computed on the last stage's ranks
            result = self.pipe.broadcast_from_last(result)
        self.state.last_eval = {"step": self.state.step, **result}
        self.metrics.write({"step": self.state.step, "tokens": self.state.tokens_seen, "eval": result})
        return result

    # -- the run ---------------------------------------------------------------------------------------
    def end_seconds(self) -> float:
        """When a --max-minutes run stops training: the budget less a margin and the final evaluation."""
        budget = self.tc.max_minutes * 60
        final_eval = self.eval_seconds if self.eval_seconds is not None else 0.02 * budget
        return 0.98 * budget - final_eval

    def finished(self) -> bool:
        s = self.state
        return s.train_seconds >= self.end_seconds() if self.timed else s.step >= s.total_steps

    def time_progress(self) -> float | None:
        """The cosine's progress in a --max-minutes run: the share of the post-warmup time spent.

        Measured in time, not steps, so the learning rate reaches its floor at the deadline whatever
        the machine's speed does on the way (other jobs on a shared CPU can halve it).
        """
        s = self.state
        if not self.timed or s.step < self.tc.warmup_steps:
            return None
        if s.warmup_seconds is None:
            s.warmup_seconds = s.train_seconds
        return (s.train_seconds - s.warmup_seconds) / max(1e-9, self.end_seconds() - s.warmup_seconds)

    def estimate_total_steps(self, seconds_per_token: float) -> int:
        """Steps a --max-minutes run will take at the measured speed (for the progress bar and logs)."""
        s = self.state
        budget = max(0.0, self.end_seconds() - s.train_seconds) / seconds_per_token
        return max(s.step + 1, steps_that_fit(s.step, s.tokens_seen, budget, self.tc, self.seq_len))

    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            self._stop_signal = signum

        old = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no graceful stop
            pass
        return old

    def run(self, log=tqdm.write, progress: bool = True) -> dict:
        """Train until the horizon (or the time budget), evaluating and checkpointing on the way.

        `log` prints a line (tqdm.write keeps the progress bar intact).
        """
        tc, s = self.tc, self.state
        deadline = tc.max_minutes * 60 if tc.max_minutes else math.inf
        bar = tqdm(total=s.total_steps, initial=s.step, unit="step", dynamic_ncols=True,
                   disable=not progress or not self.layout.is_main or None, desc="train")
        if not self.layout.is_main:  # only the main rank prints
            log = _quiet
        # SIGINT/SIGTERM: save and stop, on one process. A distributed rank just dies: a signal from the elastic
        # agent means a peer has failed, and saving would wait forever in a collective with it.
        old_handlers = self._install_signal_handlers() if self.layout.mesh is None else {}
        session_start = (s.train_seconds, s.tokens_seen)
        interval = self._new_interval()
        first_step = s.step
        self.model.train()
        try:
            while s.train_seconds < deadline and not self.finished():
                counter = self._comm_counter((s.step + 1) % tc.log_every == 0)
                t0 = time.perf_counter()
                with counter or contextlib.nullcontext():
                    rec = self.train_step()
                dt = time.perf_counter() - t0
                if counter is not None:  # the interval's measured step: its time in collectives, and its own time
                    interval["comm"] = (counter.seconds, dt)
                s.train_seconds += dt
                interval["t"] += dt
                interval["tokens"] += rec["batch_tokens"]
                interval["n"] += 1
                interval["loss"] += rec["loss"]
                interval["ce_loss"] += rec["ce_loss"]
                interval["pp_idle"] += rec.get("pp_idle", 0.0)
                if self.timed and s.step - first_step >= CALIBRATION_STEPS and s.step % tc.log_every == 0:
                    spt = (s.train_seconds - session_start[0]) / (s.tokens_seen - session_start[1])
                    if s.total_steps is None:
                        log(f"time budget {tc.max_minutes:g} min: about "
                            f"{self.estimate_total_steps(spt)} steps at {1 / spt:,.0f} tok/s")
                    s.total_steps = self.estimate_total_steps(spt)
                if bar.total != s.total_steps:
                    bar.total = s.total_steps
                    bar.refresh()
                bar.update(1)
                if s.step % tc.log_every == 0:
                    self._log_interval(interval, rec, bar, log)
                    interval = self._new_interval()
                done = s.step == s.total_steps and not self.timed
                if tc.eval_every and s.step % tc.eval_every == 0 and not done:
                    t0 = time.perf_counter()
                    result = self.run_eval()
                    self.eval_seconds = time.perf_counter() - t0
                    s.train_seconds += self.eval_seconds
                    log(f"step {s.step} | val loss {result['all']['loss']:.3f} | val bpb {fmt(result['all']['bpb'])}")
                if tc.save_every and s.step % tc.save_every == 0 and not done:
                    t0 = time.perf_counter()
                    self.save()
                    s.train_seconds += time.perf_counter() - t0
                if self._stop_signal is not None:
                    log(f"signal {self._stop_signal}: saving step {s.step} and stopping")
                    break
        finally:
            bar.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        if interval["n"]:  # the last steps since a log line
            self._log_interval(interval, rec, bar, log)
        result = self.run_eval()
        path = self.save()
        self.metrics.write({"event": "end", "step": s.step, "tokens": s.tokens_seen,
                            "train_seconds": s.train_seconds, "checkpoint": str(path),
                            "tokens_per_source": self.mixture.tokens_seen(),
                            "epochs_per_source": self.mixture.epochs_seen(), "stopped_by_signal": self._stop_signal})
        return result

    @staticmethod
    def _new_interval() -> dict:
        return {"t": 0.0, "tokens": 0, "n": 0, "loss": 0.0, "ce_loss": 0.0, "comm": None, "pp_idle": 0.0}

    def _comm_counter(self, measure: bool):
        """A collective counter for the last step of each log interval of a distributed run (else None).

        The log line's `comm` is the time that step spent in collectives, each waited on as it is issued
        (moekit/parallel/collectives.py): an upper bound on the exposed communication, since it removes the
        overlap of DDP's bucketed all-reduces and FSDP2's prefetch with computation (which gloo on a CPU barely
        has; on NCCL the overlap is real and the share is what the step would cost without it). One step in
        log_every: the dispatch mode sees every operator, which costs Python time per op, and waiting changes no
        value, so the run's numbers are the same with or without it. Not under --compile: a dispatch mode over
        compiled blocks would make dynamo trace them again with the mode in place."""
        if not measure or self.layout.mesh is None or self.tc.compile:
            return None
        from moekit.parallel.collectives import CollectiveCounter

        return CollectiveCounter()

    def _expert_exchange(self, steps: int) -> dict | None:
        """Rows (token-expert assignments) each expert-parallel rank sent and received per step over the interval,
        summed over the MoE layers, for every rank of the world (an all-gather); None without --ep."""
        from moekit.parallel.expert import take_exchange_counts

        counts = take_exchange_counts(self.raw)
        if counts is None:
            return None
        import torch.distributed as dist

        mine = torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts)], dtype=torch.float64,
                            device=self.device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        sent, received = torch.stack(every).div(max(steps, 1)).t().tolist()
        return {"sent": sent, "received": received}

    def _log_interval(self, interval: dict, rec: dict, bar, log) -> None:
        s = self.state
        tok_s = interval["tokens"] / max(interval["t"], 1e-9)  # the whole world's tokens
        util = mfu(tok_s, self.flops_per_token, self.peak * self.layout.dims.world_size) if self.peak else None
        if self.layout.dp_group is not None:
            self.routing.all_reduce(self.layout.dp_group)
        idle = None
        if self.pipe is not None:  # the whole model's layers, and each stage's idle share of its steps
            self.pipe.gather_routing(self.routing)
            idle = self.pipe.gather_idle(interval["pp_idle"] / interval["n"])
        routing = self.routing.summary()
        self.routing.reset()
        exchange = self._expert_exchange(interval["n"])
        imbalance = max(routing["imbalance"]) if routing else None
        loss = interval["loss"] / interval["n"]
        comm = interval["comm"]  # (seconds in collectives, seconds) of the interval's measured step, or None
        record = {"step": s.step, "loss": loss, "ce_loss": interval["ce_loss"] / interval["n"],
                  "aux_loss": rec["aux_loss"], "z_loss": rec["z_loss"], "lr": rec["lr"],
                  "grad_norm": rec["grad_norm"], "batch_tokens": rec["batch_tokens"], "tokens": s.tokens_seen,
                  "total_steps": s.total_steps,
                  "tok_s": tok_s, "mfu": util, "train_seconds": s.train_seconds, "routing": routing,
                  "comm_s": comm[0] if comm else None, "comm_share": comm[0] / comm[1] if comm else None,
                  "pp_idle": idle, "ep_rows": exchange,
                  "tokens_per_source": self.mixture.tokens_seen(), "epochs_per_source": self.mixture.epochs_seen()}
        self.metrics.write(record)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * util:.1f}%" if util else "-")
        log(format_log_line(s.step, loss, rec["lr"], tok_s, util, imbalance,
                            None if self.layout.dims.world_size == 1 else self.layout.describe(),
                            comm_share=record["comm_share"], ep_received=exchange["received"] if exchange else None,
                            bubble=max(idle) if idle else None))
