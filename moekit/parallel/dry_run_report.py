"""The `--dry-run` table: each distinct rank's measured bytes and collectives (moekit/parallel/dry_run.py) beside
the planner's for the same flags (moekit/plan/shards.py `rank_bytes`, moekit/plan/comm.py `step_collectives`, what
`moekit plan train` prints), and the article's figures where it has them (SPEC sections 2-3).

    report = dry_run(cfg, dims)
    rows = compare(report)                 # [(rank, {"weights": (measured, planned), ...}, {(group, kind): ...})]
    print(format_dry_run(report, gpu="A100-80GB"))
"""

from __future__ import annotations

import re

from moekit.parallel.dry_run import DryRun, RankReport
from moekit.plan.comm import step_collectives
from moekit.plan.shards import rank_bytes

ARTICLE_FP16_GB = 30.0  # "~30 GB of FP16 weights per GPU" at 8-way tensor x 15-way pipeline (SPEC section 3)
NAMES = {"all_reduce": "all-reduce", "all_gather": "all-gather", "reduce_scatter": "reduce-scatter",
         "broadcast": "broadcast", "all_to_all": "all-to-all", "p2p": "send/recv"}


def planned(run: DryRun, r: RankReport):
    """The planner's bytes held and collectives for this rank: one micro-batch's forward and backward and the
    optimizer step, as the dry run runs them (no gradient clipping, no loss all-reduce: not run here)."""
    d = run.dims
    held = rank_bytes(run.cfg, dp=d.dp, tp=d.tp, zero=d.zero, precision="fp32", pp=d.pp, stage=r.pp_rank,
                      dp_rank=r.dp_rank, tp_rank=r.tp_rank, ep=d.ep)
    comm = step_collectives(run.cfg, dp=d.dp, tp=d.tp, zero=d.zero, precision="fp32", micro_batches=1,
                            tokens_per_micro=run.micro_batch * run.seq_len, recompute=run.recompute,
                            grad_clip=False, pp=d.pp, stage=r.pp_rank, ep=d.ep, losses=False)
    by: dict[tuple[str, str], float] = {}
    for c in comm.collectives:
        by[c.group, c.kind] = by.get((c.group, c.kind), 0.0) + c.payload
    return held, by


def measured_collectives(r: RankReport) -> dict[tuple[str, str], float]:
    out = {(g, k): v for g, kinds in r.collectives.items() for k, v in kinds.items()}
    if r.p2p_micro:
        out["pp", "p2p"] = 2 * r.p2p_micro * ((r.pp_rank > 0) + (not r.last))
    return out


def compare(run: DryRun) -> list[tuple[RankReport, dict[str, tuple[float, float]], dict]]:
    """Per rank: {state: (measured, planned)} and {(group, kind): (measured, planned)}. Under --ep the step is not
    run and the measured collectives are the planner's (dry_run.py), so only the bytes held are compared."""
    rows = []
    for r in run.ranks:
        held, comm = planned(run, r)
        states = {"weights": (r.weights, held.weights), "gradients": (r.gradients, held.gradients),
                  "optimizer": (r.optimizer, held.optimizer)}
        got = measured_collectives(r) if r.measured_step else comm
        keys = sorted(set(got) | set(comm))
        rows.append((r, states, {k: (got.get(k, 0.0), comm.get(k, 0.0)) for k in keys}))
    return rows


def relative(measured: float, plan: float) -> float:
    return 0.0 if measured == plan else abs(measured - plan) / max(abs(plan), abs(measured))


# ---- text ---------------------------------------------------------------------------------------------------------
def _b(x: float) -> str:
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} B"


def _shapes(r: RankReport) -> list[str]:
    """Each distinct parameter once: a block's tensors under `blocks.*` (every block of a stage alike)."""
    seen, out = set(), []
    for name, local, whole in r.shapes:
        key = re.sub(r"^blocks\.\d+\.", "blocks.*.", name)
        if key in seen:
            continue
        seen.add(key)
        part = "" if local == whole else f" of {tuple(whole)}"
        out.append(f"{key} {tuple(local)}{part}")
    return out


def format_dry_run(run: DryRun, gpu_memory: float | None = None, gpu: str = "") -> str:
    d, cfg = run.dims, run.cfg
    lines = [f"dry run: {cfg.name} on {d.world_size:,} ranks ({d.describe()}), fake process group, one process; "
             f"{len(run.ranks)} distinct ranks in {run.seconds:.1f} s",
             f"  step: {run.microbatches} micro-batches of {run.micro_batch} x {run.seq_len:,} tokens per data rank, "
             f"recompute {run.recompute}; figures measured (planner's beside: moekit plan train, "
             f"--optimizer-precision fp32)"]
    lines += [f"  note: {n}" for n in run.notes]
    for r, states, comm in compare(run):
        ends = [w for w, on in (("embedding", r.pp_rank == 0), ("norm, lm_head, loss", r.last)) if on]
        lines.append("")
        lines.append(f"rank {r.rank:,} (pp {r.pp_rank}, dp {r.dp_rank}, tp {r.tp_rank}): {r.role}; layers "
                     f"{r.layers[0]}-{r.layers[-1]} ({len(r.layers)})" + (f" + {', '.join(ends)}" if ends else "")
                     + f"; {r.seconds:.1f} s")
        lines.append("  parameters (local shard of whole): " + "; ".join(_shapes(r)))
        for state, (got, plan) in states.items():
            extra = ""
            if state == "weights":
                extra = f"; FP16: {_b(2 * r.weight_numel)}"
            if state == "optimizer":
                extra = f" ({r.optimizer_params} tensors' AdamW state)"
            lines.append(f"  {state:<11} {_b(got):>10}   planner {_b(plan):>10} ({relative(got, plan):.2%} apart)"
                         f"{extra}")
        act = (f"{_b(r.activations_micro)} saved per micro-batch x {r.in_flight} in flight (1F1B) = "
               f"{_b(r.activations)}" if r.measured_step else "not measured (--ep: the step is not run)")
        lines.append(f"  activations {act}")
        total = r.weights + r.gradients + r.optimizer + r.activations
        fits = "" if gpu_memory is None else (f" of {gpu}'s {_b(gpu_memory)}: " +
                                               ("fits" if total <= gpu_memory else "does NOT fit"))
        lines.append(f"  total       {_b(total)}{fits}" + ("" if r.measured_step else " (without activations)"))
        source = "measured" if r.measured_step else "derived (the planner's)"
        lines.append(f"  collectives of one micro-batch's forward + backward and the optimizer step, {source}:")
        for (group, kind), (got, plan) in comm.items():
            calls = r.calls.get(group, {}).get(kind)
            what = f" ({calls} calls)" if calls and r.measured_step else ""
            how = " (derived from the stage's output: not a collective)" if kind == "p2p" and r.measured_step else ""
            lines.append(f"    {group:<4} {NAMES[kind]:<15} {_b(got):>10}{what}   planner {_b(plan):>10} "
                         f"({relative(got, plan):.2%} apart){how}")
    if run.ranks:
        top = max(run.ranks, key=lambda x: x.weight_numel)
        lines.append("")
        lines.append(f"fullest rank's FP16 weights: {_b(2 * top.weight_numel)} ({top.weight_numel / 1e9:,.2f}B "
                     f"parameters, rank {top.rank:,}); the article: ~{ARTICLE_FP16_GB:g} GB per GPU at 8 x 15 "
                     f"(SPEC section 3)")
    return "\n".join(lines)


def format_alternatives(cfg, dims, gpu: str) -> str:
    """The article's alternatives, planned (SPEC section 3): FSDP on 40 GB A100s, the H100 run, --ep 16."""
    from moekit.plan.train import train

    gpus = dims.world_size
    lines = ["", "the article's alternatives (planner; run each with --dry-run to measure it):"]
    fsdp = train(cfg, "A100-40GB", gpus, tp=dims.tp, pp=dims.pp, zero_stage=3, mfu=0.34)
    m = fsdp.memory
    lines.append(f"  FSDP (--zero 3) on A100-40GB: {_b(m.total)} per GPU on stage {m.stage} (weights {_b(m.weights)}, "
                 f"grads {_b(m.gradients)}, Adam {_b(m.optimizer)}, activations {_b(m.activations)}): "
                 + ("fits 40 GB" if m.fits else "does NOT fit 40 GB")
                 + "; the article: 'likely ZeRO stage 1 or block-level FSDP'")
    h100 = train(cfg, "H100", 8192, tp=dims.tp, pp=dims.pp, zero_stage=1, mfu=0.34)
    lines.append(f"  H100: 8,192 GPUs at 34% MFU: {h100.days:,.1f} days, "
                 + (f"${h100.cost / 1e6:,.1f}M" if h100.cost else "no price")
                 + f", {_b(h100.memory.total)} per GPU; the article: ~8,192 H100s, ~55 days, ~$21.5M at $2/hour")
    if cfg.n_expert % 16 == 0 and dims.dp % 16 == 0:
        ep = rank_bytes(cfg, dp=dims.dp, tp=dims.tp, zero=0, precision="mixed", pp=dims.pp, stage=0, ep=16)
        lines.append(f"  --ep 16 (--zero 0; ZeRO-1 is refused with --ep): {_b(ep.weights)} of weights per GPU in "
                     f"bf16 (each rank 1 expert of 16 per layer); the article: experts not split across nodes in "
                     f"inference, training layout 8 x 15 without expert parallelism")
    return "\n".join(lines) + ("\n" if gpu else "")


__all__ = ["ARTICLE_FP16_GB", "compare", "format_alternatives", "format_dry_run", "planned", "relative"]


def dry_run_command(args, given: dict, preset) -> int:
    """`moekit train ... --dry-run` (moekit/train/cli.py): check the flags, measure, print; nothing is written.
    Raises ValueError (one line, exit 2) for input that names no full-size layout."""
    from moekit.parallel.dry_run import dry_run
    from moekit.parallel.mesh import ParallelDims
    from moekit.plan.hardware import get_gpu
    from moekit.resolve import apply_overrides

    for flag, bad in (("--nproc", args.nproc is not None), ("--resume", args.resume), ("--init-from", args.init_from),
                      ("--out", args.out), ("--overwrite", args.overwrite)):
        if bad:
            raise ValueError(f"--dry-run runs nothing and writes nothing, in one process: drop {flag} (the world is "
                             "--tp x --pp x --dp)")
    if not args.dp:
        raise ValueError("--dry-run needs the whole layout: give --dp (the world is --tp x --pp x --dp), e.g. "
                         "--tp 8 --pp 15 --dp 208 for GPT-4's 24,960 GPUs")
    cfg = apply_overrides(preset, args.overrides)
    world = args.dp * args.tp * args.pp
    dims = ParallelDims.from_flags(world, dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep, zero=args.zero, cfg=cfg)
    if world == 1:
        raise ValueError("--dry-run of a world of one: nothing is sharded; give --tp, --pp or --dp > 1")
    gpu = get_gpu(args.gpu)
    batch = given.get("batch_tokens", 60e6)  # the article's 60M-token batch unless --batch-tokens (SPEC section 3)
    run = dry_run(cfg, dims, seq_len=given.get("seq_len") or None, batch_tokens=batch,
                  recompute=given.get("recompute", "none"))
    print(format_dry_run(run, gpu.memory_bytes, gpu.name))
    if cfg.name == "gpt4":
        print(format_alternatives(cfg, dims, gpu.name), end="")
    return 0
