"""`moekit plan [train|serve|wall|chart]`: the planner's command line, a thin layer over `moekit.plan`.

    moekit plan                                   # the GPT-4 report (every claim of SPEC sections 1-4)
    moekit plan --model gpt4-vision               # ... and section 5, vision, on a vision config
    moekit plan --simulate                        # ... and the serving-cost claims under real traffic (minutes)
    moekit plan vision --model gpt4-vision        # vision parameters, FLOPs per image, encoder cache, fine-tune, IO
    moekit plan train --gpu A100-80GB --gpus 25000 --tokens 13T --mfu 0.34    # the article's MFU, given
    moekit plan train --gpu H100 --gpus 512 --tp 4 --pp 8 --schedule interleaved --recompute selective  # MFU predicted
    moekit plan calibration                       # the training- and serving-time models against published figures
    moekit plan train --model tiny --gpus 2 --tp 1 --pp 1 --zero 3 --optimizer-precision fp32 \
        --batch-tokens 256 --seq-len 64 --micro-batch 2 --recompute none    # per-rank bytes, collectives
    moekit plan serve --model gpt4 --gpu H100 --weight-dtype fp8 --kv-dtype fp8 --context 6144
    moekit plan serve --model tiny --gpu local --tp 1 --pp 1 --batch 8 --json  # after moekit bench hardware
    moekit plan wall --gpu H100 --gpus 8 --tps 20 --hbm-gb-s 3000
    moekit plan chart --out charts/

Every input has a flag, `--json` prints the full result, numbers take decimal suffixes (13T, 60M, 8k = 8,000).
Model overrides (`--n_layer=60`) apply to `train`, `serve`, `vision` and the report's --model. Bad input: one
line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

from moekit.plan.hardware import DTYPE_BYTES

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def number(text: str) -> float:
    """'13T' -> 1.3e13, '60M' -> 6e7, '2.15e25' -> 2.15e25."""
    t = text.strip().replace(",", "").replace("_", "")
    scale = _SUFFIX.get(t[-1:].lower(), 1) if t and t[-1:].isalpha() else 1
    try:
        value = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 13T, 60M, 8k, 2.15e25)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def integer(text: str) -> int:
    value = number(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def _common(p: argparse.ArgumentParser, model: bool = True, default: str = "gpt4") -> None:
    if model:
        p.add_argument("--model", default=default, help=f"preset name, moekit run or HF folder (default {default}); "
                                                        "--key=value overrides its config")
    p.add_argument("--hardware", action="append", default=[], metavar="FILE",
                   help="JSON/TOML file of extra GPU entries (repeatable); see moekit/plan/hardware.py")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the GPT-4 report as JSON")
    p.add_argument("--model", dest="report_model", metavar="MODEL",
                   help="a vision model (e.g. gpt4-vision): adds the report's section 5, vision, computed on it")
    sim = p.add_argument_group("--simulate (moekit/sim/claims.py)")
    sim.add_argument("--simulate", action="store_true",
                     help="add the $ per 1k claims at the utilization real traffic allows: the Azure conversation "
                          "trace at the largest load one replica serves within the SLO, and a day's load curve, in the "
                          "simulator (a few minutes; progress on stderr)")
    sim.add_argument("--sim-slo", metavar="METRIC:MS,...",
                     help="SLOs at p90, ms, of ttft, tpot, e2el (default ttft:10000,tpot:1000)")
    sim.add_argument("--sim-window", type=number, metavar="S",
                     help="simulated seconds of arrivals per simulation (default: two long requests' lifetimes)")
    sim.add_argument("--sim-points", type=integer, metavar="N", help="hours of the day simulated (default 4)")
    sim.add_argument("--sim-iterations", type=integer, metavar="N",
                     help="bisections of the capacity bracket (default 1)")
    sim.add_argument("--sim-peak-rate", type=number, metavar="REQ_S", help="the fleet's peak requests/s (default 1000)")
    sim.add_argument("--sim-trace-duration", type=number, metavar="S",
                     help="seconds of the trace to replay, repeated as needed (default: all of it)")
    sim.add_argument("--sim-day-all", action="store_true", default=None,
                     help="the day's curve on every deployment (default: A100 only)")
    sub = p.add_subparsers(dest="plan_command", metavar="{train,serve,wall,vision,chart,calibration}")
    gpu_help = "GPU name, `local`, or a hardware file (default %(default)s)"

    t = sub.add_parser("train", help="FLOPs, days or MFU, dollars, memory per GPU, pipeline bubble")
    _common(t)
    t.add_argument("--gpu", default="A100-80GB", help=gpu_help)
    t.add_argument("--gpus", type=integer, default=25_000, help="number of GPUs (default 25,000)")
    t.add_argument("--tokens", type=number, default=13e12, help="training tokens (default 13T)")
    when = t.add_mutually_exclusive_group()
    when.add_argument("--mfu", type=float,
                      help="model FLOPs utilization, 0-1: gives the time (default: both predicted from the step's "
                           "parts, moekit/plan/step_time.py; the article's is 0.34)")
    when.add_argument("--days", type=float, help="wall-clock days: gives the MFU")
    t.add_argument("--tp", type=integer, default=8, help="tensor-parallel degree (default 8)")
    t.add_argument("--pp", type=integer, default=15, help="pipeline-parallel degree (default 15)")
    t.add_argument("--ep", type=integer, default=1,
                   help="expert-parallel degree, carved out of data parallelism (default 1)")
    t.add_argument("--zero", type=integer, default=1, help="ZeRO stage 0-3 (default 1)")
    t.add_argument("--batch-tokens", type=number, default=60e6, help="tokens per step (default 60M)")
    t.add_argument("--seq-len", type=integer, help="training sequence length (default: the model's)")
    t.add_argument("--micro-batch", type=integer, default=1, help="sequences per micro-batch (default 1)")
    t.add_argument("--recompute", default="full", choices=["none", "selective", "full"],
                   help="activation recomputation (default full; selective: Korthikanti et al. 2022)")
    t.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved", "interleaved-1f1b",
                                                          "zero-bubble"], help="pipeline schedule (default 1f1b)")
    t.add_argument("--stages-per-rank", type=integer, default=1,
                   help="pipeline stages per rank (interleaved: 2 or more, default 2; zero-bubble: 2)")
    t.add_argument("--attention", default="flash", choices=["flash", "unfused"],
                   help="attention kernel: FlashAttention (default) or softmax over stored scores (Megatron 2021)")
    t.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false",
                   help="keep d_model-sized activations whole on every tensor-parallel GPU")
    t.add_argument("--dtype", default="bf16", help="the matmuls' dtype: the peak MFU is measured against and the "
                   "rate the step is predicted at (default bf16; fp32 for a run without autocast)")
    t.add_argument("--optimizer-precision", default="mixed", choices=["mixed", "fp32"],
                   help="bytes per parameter: mixed = the article's bf16 weights and grads + 12 B of fp32 Adam "
                        "(2+2+12, default); fp32 = moekit's fp32 weights, grads and AdamW (4+4+8)")
    t.add_argument("--price-per-hour", type=float, help="$ per GPU-hour (default: the hardware table's)")
    t.add_argument("--include-attention", action="store_true",
                   help="count attention FLOPs (PaLM appendix B) in the time and MFU")

    s = sub.add_parser("serve", help="memory, largest batch, tokens/s per user and cluster, MFU, $ per 1k")
    _common(s)
    s.add_argument("--gpu", default="H100", help=gpu_help)
    s.add_argument("--gpus", type=integer,
                   help="GPUs in all, a multiple of tp x pp x ep (default: one replica)")
    s.add_argument("--tp", type=integer, default=8, help="tensor-parallel degree (default 8)")
    s.add_argument("--pp", type=integer, default=16, help="pipeline-parallel degree (default 16)")
    s.add_argument("--ep", type=integer, default=1, help="expert-parallel degree (default 1)")
    s.add_argument("--weight-dtype", default="bf16", choices=list(DTYPE_BYTES), help="weight precision")
    s.add_argument("--kv-dtype", default="bf16", choices=list(DTYPE_BYTES), help="KV-cache precision")
    s.add_argument("--compute-dtype", choices=list(DTYPE_BYTES),
                   help="matmul precision (default: fp8 for fp8 weights where supported, else bf16)")
    s.add_argument("--context", type=integer,
                   help="KV-cache tokens per sequence, mean over those in flight (default: the window)")
    s.add_argument("--prompt-len", type=integer,
                   help="prompt tokens, for the prefill cost and time to first token (default: --context)")
    pick = s.add_mutually_exclusive_group()
    pick.add_argument("--batch", type=integer,
                      help="sequences per micro-batch (default: the largest that fits)")
    pick.add_argument("--target-tps", type=float, help="tokens/s per user to meet with the largest batch")
    s.add_argument("--micro-batches", type=integer, help="micro-batches in flight (default pp)")
    s.add_argument("--price-per-hour", type=float, help="$ per GPU-hour (default: the hardware table's)")
    s.add_argument("--utilization", type=float, default=1.0,
                   help="busy fraction of the cluster's time (default 1)")
    s.add_argument("--memory-fraction", type=float, default=0.9, help="usable fraction of HBM (default 0.9)")
    s.add_argument("--prefill-chunk", type=integer, default=2048,
                   help="prefill tokens per step (default 2048): a chunk of one prompt, or short prompts packed")
    s.add_argument("--roofline", action="store_true",
                   help="plan a datasheet GPU as the article does: flat kernel efficiencies, no launch/dispatch floors")
    # An opt-in flag rather than a section printed whenever --tp/--pp are given: the default model is GPT-4 at
    # 8 x 16 (16 more lines), and the figures are moekit's own processes, not the GPU deployment modelled above.
    s.add_argument("--workers", action="store_true",
                   help="also what each of `moekit serve --tp --pp --ep`'s worker processes holds (weights, KV blocks) "
                        "and moves in a decode step of --batch tokens (default 16) and a prefill of --prompt-len, "
                        "in --weight-dtype (fp32, bf16 or fp16: the workers' one dtype, KV cache included)")
    s.add_argument("--kv-cache-gb", type=number, default=1.0, help="with --workers: each worker's KV budget (1)")
    s.add_argument("--block-size", type=integer, default=16, help="with --workers: tokens per KV block (16)")

    w = sub.add_parser("wall", help="the largest model a system decodes at a tokens/s-per-user target")
    _common(w, model=False)
    w.add_argument("--gpu", default="H100", help=gpu_help)
    w.add_argument("--gpus", type=integer, default=8, help="number of GPUs (default 8)")
    w.add_argument("--tps", type=float, default=20.0, help="tokens/s per user (default 20)")
    w.add_argument("--weight-dtype", default="bf16", choices=list(DTYPE_BYTES), help="weight precision")
    w.add_argument("--overhead", type=float, default=2.0,
                   help="bytes moved per byte of weights (default 2: the article's overheads = weight reads)")
    w.add_argument("--hbm-gb-s", type=float, help="override the GPU's bandwidth, GB/s (the article: 3000)")

    v = sub.add_parser("vision", help="a vision model's parameters, FLOPs per image, encoder cache, fine-tune, IO")
    _common(v, default="gpt4-vision")
    v.add_argument("--tokens", type=number, default=2e12, help="fine-tuning text tokens (default 2T, SPEC 5)")
    v.add_argument("--images-per-token", type=float, default=5 / 256,
                   help="images per text token in the fine-tune (default 5/256: Flamingo's M3W sequences)")
    v.add_argument("--gpu", default="A100-80GB", help=gpu_help)
    v.add_argument("--gpus", type=integer, default=25_000, help="GPUs for the fine-tune's days (default 25,000)")
    v.add_argument("--mfu", type=float, default=0.34, help="MFU for the fine-tune's days (default 0.34)")
    v.add_argument("--cache-dtype", default="bf16", choices=list(DTYPE_BYTES), help="encoder cache precision")

    c = sub.add_parser("chart", help="write the planner's PNG charts")
    c.add_argument("--out", default="moekit-charts", help="directory for the PNGs (default ./moekit-charts)")

    k = sub.add_parser("calibration", help="the training- and serving-time models' predictions vs published "
                                           "measurements, and their fits")
    k.add_argument("--file", help="calibration rows, JSONL (default calibration/train.jsonl of the repository)")
    k.add_argument("--serve-file", help="serving rows, JSONL (default calibration/serve.jsonl of the repository)")
    k.add_argument("--json", action="store_true", help="print the full result as JSON")


def _count(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:,.4g}{suffix}"
    return f"{x:,.0f}"


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB"


def _bytes(x: float) -> str:
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(x) >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x:,.0f} B"


def _seconds(x: float) -> str:
    return f"{x:,.1f} s" if x >= 1 else f"{x * 1e3:,.2f} ms"


def _money(x: float | None, digits: int = 2) -> str:
    return "n/a (pass --price-per-hour)" if x is None else f"${x:,.{digits}f}"


def format_train(p) -> str:
    m = p.memory
    experts = f" (experts {p.ep}-way)" if p.ep > 1 else ""
    attention = "included" if p.include_attention else "would add"
    lines = [
        f"training {p.model} on {p.n_gpus:,} x {p.gpu}: tensor {p.tp} x pipeline {p.pp} x data {p.dp}"
        f"{experts}, ZeRO-{p.zero_stage}, {_count(p.tokens)} tokens",
        f"  FLOPs                {p.flops:.3g}   ({p.flops_per_token / 1e9:,.1f} GFLOP per token = 6 x "
        f"active; attention {attention} {p.attention_flops_per_token / 1e9:,.1f})",
        f"  MFU                  {p.mfu:.1%} of {p.peak_flops / 1e12:,.0f} TFLOP/s {p.dtype} "
        f"({_MFU_SOURCE[p.mfu_source]})",
        f"  time                 {p.days:,.1f} days",
        *_step_lines(p),
        f"  GPU-hours            {p.gpu_hours:,.0f}",
        f"  cost                 {_money(p.cost, 0)}",
        f"  memory per GPU       {_gb(m.total)} of {_gb(m.capacity)} (stage {m.stage}: weights "
        f"{_gb(m.weights)}, grads {_gb(m.gradients)}, Adam {_gb(m.optimizer)}, activations "
        f"{_gb(m.activations)}, recompute {p.recompute})",
        f"  pipeline             {p.micro_batches} micro-batches of {p.micro_batch} x {p.seq_len:,} tokens "
        f"per step, bubble {p.bubble:.1%}; layers per stage {sorted(set(p.layers_per_stage))}",
        f"  tokens per expert    {_count(p.tokens_per_expert)} per {_count(p.batch_tokens)}-token batch",
    ]
    return "\n".join(lines + _rank_lines(p) + [f"  note: {n}" for n in p.notes])


_MFU_SOURCE = {"predicted": "predicted from the step's parts", "given": "given by --mfu", "days": "from --days"}
_PART_NAMES = {"matmul": "matmul", "attention": "attention", "memory_bound": "memory-bound ops", "overhead": "overhead",
               "recompute": "recompute", "bubble": "bubble", "tp_comm": "TP comm", "ep_comm": "EP comm",
               "pp_comm": "PP comm", "dp_comm": "DP comm", "optimizer": "optimizer"}


def _step_lines(p) -> list[str]:
    """The predicted step and the share of each of its parts (moekit/plan/step_time.py)."""
    st = p.step
    if st is None:
        return []
    shares = st.shares()
    parts = ", ".join(f"{_PART_NAMES[k]} {v:.1%}" + (f" (GEMMs at {st.gemm_efficiency:.0%} of peak)" if k == "matmul"
                                                     else "") for k, v in shares.items() if v >= 0.0005)
    sched = p.schedule + (f" x {p.stages_per_rank} stages per rank" if p.stages_per_rank > 1 else "")
    return [f"  step                 {_seconds(st.seconds)} ({sched}, recompute {p.recompute}, {p.attention} "
            f"attention): {parts}"]


def _rank_lines(p) -> list[str]:
    """What one rank holds and what one step's collectives carry, as moekit shards and communicates."""
    out = []
    r = p.ranks
    if r is not None:
        extra = "".join([f", FSDP2 gathers {_bytes(r.gathered)} in the step" if r.gathered else "",
                         f", DDP buckets {_bytes(r.buckets)}" if r.buckets else ""])
        out.append(f"  per rank (moekit)    weights {_bytes(r.weights)}, grads {_bytes(r.gradients)}, optimizer "
                   f"{_bytes(r.optimizer)} ({p.optimizer_precision}){extra}; total {_bytes(r.total)}")
        spread = r.optimizer_per_dp_rank
        if p.zero_stage == 1 and len(spread) > 1:
            even = sum(spread) / len(spread)
            out.append(f"  ZeRO-1 partition     optimizer {_bytes(min(spread))} to {_bytes(max(spread))} per rank "
                       f"over {len(spread)} ranks (whole parameters; an even split is {_bytes(even)})")
    c = p.collectives
    if c is not None:
        names = {"all_reduce": "all-reduce", "all_gather": "all-gather", "reduce_scatter": "reduce-scatter",
                 "broadcast": "broadcast", "all_to_all": "all-to-all", "p2p": "send/recv"}
        calls: dict[str, int | None] = {}
        for x in c.collectives:  # None: DDP's buckets, whose number depends on its bucket cap
            calls[x.kind] = None if x.calls is None or calls.get(x.kind, 0) is None else calls.get(x.kind, 0) + x.calls
        kinds = ", ".join(f"{names[k]} {_bytes(v)}" + (f" ({calls[k]:,} calls)" if calls[k] else "")
                          for k, v in c.payload_by_kind().items()) or "none"
        seconds = "" if p.comm_seconds is None else f", {_seconds(p.comm_seconds)} over {p.gpu}'s links"
        out.append(f"  collectives / step   {kinds}; ring traffic per rank {_bytes(c.wire)}{seconds}")
    return out


def format_serve(p) -> str:
    m, d = p.memory, p.decode
    lines = [
        f"serving {p.model} on {p.n_gpus} x {p.gpu}: {p.replicas} replica(s) of tensor {p.tp} x pipeline "
        f"{p.pp} x expert {p.ep}; weights {p.weight_dtype}, KV {p.kv_dtype}, matmuls {p.compute_dtype}; "
        f"{p.context:,} tokens of context",
        f"  batch                {p.batch} per micro-batch x {p.micro_batches} in flight (largest that "
        f"fits: {p.max_batch})",
        f"  memory per GPU       {_gb(m.total)} of {_gb(m.usable)} usable (stage {m.stage}: weights "
        f"{_gb(m.weights)}, KV cache {_gb(m.kv_cache)}, workspace {_gb(m.workspace)})",
        f"  decode step          {d.seconds * 1e3:.2f} ms per stage (compute {d.compute_s * 1e3:.2f}, "
        f"memory {d.memory_s * 1e3:.2f}, communication {d.comm_s * 1e3:.2f}, hop {d.hop_s * 1e3:.2f}"
        + (f", overhead {d.overhead_s * 1e3:.2f}" if d.overhead_s else "") + ")",
        f"  tokens/s per user    {p.tokens_per_s_per_user:,.2f}",
        f"  tokens/s (cluster)   {p.tokens_per_s:,.0f} output, {p.input_tokens_per_s:,.0f} input (prefill)",
        f"  utilization          MFU {p.mfu:.1%}, memory bandwidth {p.mbu:.1%}",
    ]
    if p.experts_touched:
        lines.append(f"  experts touched      {p.experts_touched:.1f} per MoE layer per decode step")
    lines.append(f"  time to first token  {p.time_to_first_token:.3f} s for {p.prompt_len:,} prompt tokens")
    if p.cost_per_hour is not None:
        lines.append(f"  $ per 1k tokens      output {_money(p.cost_per_1k_output, 5)}, input "
                     f"{_money(p.cost_per_1k_input, 5)} ({_money(p.cost_per_hour)} per hour, "
                     f"{p.utilization:.0%} busy)")
    return "\n".join(lines + [f"  note: {n}" for n in p.notes])


def format_wall(w) -> str:
    return "\n".join([
        f"the brick wall: {w.n_gpus} x {w.gpu} ({w.bandwidth / w.n_gpus / 1e9:,.0f} GB/s each) at "
        f"{w.tokens_per_s:g} tokens/s per user, batch 1, {w.weight_dtype}, overhead x{w.overhead:g}",
        f"  largest model        {w.max_params / 1e9:,.0f}B parameters read per token (MoE: active ones)",
        f"  fits in memory       {w.max_params_memory / 1e9:,.0f}B parameters",
        f"  FLOPS utilization    {w.flops_utilization:.2%} of the bf16 peak at the wall",
    ])


def run(args: argparse.Namespace) -> int:
    from moekit import plan
    from moekit.resolve import apply_overrides

    cmd = args.plan_command
    report_model = getattr(args, "report_model", None)
    if report_model and cmd is not None:
        raise ValueError(f"--model before `{cmd}` is the report's (section 5, vision); give it after the command: "
                         f"moekit plan {cmd} --model {report_model}")
    if args.overrides and cmd not in ("train", "serve", "vision") and not (cmd is None and report_model):
        raise ValueError(f"model overrides ({', '.join('--' + k for k in args.overrides)}) apply only to "
                         "`moekit plan train`, `serve` and `vision`, and to the report's --model")
    sim_opts = {k: v for k, v in vars(args).items() if k.startswith("sim_") and v is not None}
    if (args.simulate or sim_opts) and cmd is not None:
        raise ValueError(f"--simulate belongs to the report: `moekit plan --simulate`, not with `{cmd}`")
    if sim_opts and not args.simulate:
        raise ValueError(f"--{next(iter(sim_opts)).replace('_', '-')} applies only with --simulate: add --simulate")
    if cmd is None:
        model = apply_overrides(plan.as_config(report_model), args.overrides) if report_model else None
        r = plan.gpt4_report(model)
        sim = _simulate(sim_opts) if args.simulate else None
        if args.json:
            print(json.dumps(r.to_dict() | ({"simulated": sim.to_dict()} if sim else {}), indent=2))
        else:
            print(plan.format_report(r) + ("\n" + _sim_claims().format_claims(sim, len(r.claims) + 1) if sim else ""))
        return 0
    if cmd == "vision":
        from moekit.plan.vision import format_vision, vision_plan

        cfg = apply_overrides(plan.as_config(args.model), args.overrides)
        vp = vision_plan(cfg, finetune_tokens=args.tokens, images_per_token=args.images_per_token, gpu=args.gpu,
                         n_gpus=args.gpus, mfu=args.mfu, cache_dtype=args.cache_dtype,
                         hardware_files=tuple(args.hardware))
        print(json.dumps(vp.to_dict(), indent=2) if args.json else format_vision(vp))
        return 0
    if cmd == "chart":
        for path in plan.write_charts(args.out):
            print(path)
        return 0
    if cmd == "calibration":
        from moekit.plan.calibrate_serve import ROWS_PATH as SERVE_ROWS
        from moekit.plan.calibrate_serve import format_serve_calibration, serve_calibration
        from moekit.plan.calibrate_train import ROWS_PATH, calibration, format_calibration

        c, sc = calibration(args.file or ROWS_PATH), serve_calibration(args.serve_file or SERVE_ROWS)
        print(json.dumps(c.to_dict() | {"serve": sc.to_dict()}, indent=2) if args.json
              else format_calibration(c) + "\n\n" + format_serve_calibration(sc))
        return 0
    files = tuple(args.hardware)
    if cmd == "wall":
        result = plan.wall(args.gpu, args.gpus, args.tps, weight_dtype=args.weight_dtype,
                           overhead=args.overhead, hbm_gb_s=args.hbm_gb_s, hardware_files=files)
        text = format_wall
    else:
        cfg = apply_overrides(plan.as_config(args.model), args.overrides)
        if cmd == "train":
            result = plan.train(cfg, args.gpu, args.gpus, args.tokens, mfu=args.mfu, days=args.days,
                                tp=args.tp, pp=args.pp, ep=args.ep, zero_stage=args.zero,
                                batch_tokens=args.batch_tokens,
                                seq_len=args.seq_len, micro_batch=args.micro_batch, recompute=args.recompute,
                                sequence_parallel=args.sequence_parallel, dtype=args.dtype,
                                price_per_hour=args.price_per_hour, include_attention=args.include_attention,
                                hardware_files=files, optimizer_precision=args.optimizer_precision,
                                schedule=args.schedule, stages_per_rank=args.stages_per_rank, attention=args.attention)
            text = format_train
        else:
            result = plan.serve(cfg, args.gpu, n_gpus=args.gpus, tp=args.tp, pp=args.pp, ep=args.ep,
                                weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype,
                                compute_dtype=args.compute_dtype, context=args.context,
                                prompt_len=args.prompt_len, batch=args.batch, target_tps=args.target_tps,
                                micro_batches=args.micro_batches,
                                price_per_hour=args.price_per_hour, utilization=args.utilization,
                                memory_fraction=args.memory_fraction, prefill_chunk=args.prefill_chunk,
                                hardware_files=files, roofline=args.roofline)
            text = format_serve
            if args.workers:  # moekit's own worker processes, exactly (moekit/plan/serve_workers.py)
                return _print_workers(args, cfg, result)
    print(json.dumps(result.to_dict(), indent=2) if args.json else text(result))
    return 0


def _sim_claims():
    # Lazily, only for --simulate, and by name as moekit/cli.py dispatches the commands: the planner's modules are
    # pure functions over config and the hardware table (tests/test_imports.py holds moekit.plan off moekit.infer),
    # while the simulator drives the engine's own scheduler. This command line is the one place that joins them.
    import importlib

    return importlib.import_module("moekit.sim.claims")


def _simulate(opts: dict):
    """The simulated claims with the --sim-* options given (the rest: SimClaimsConfig's defaults)."""
    claims = _sim_claims()
    kw = {k.removeprefix("sim_"): v for k, v in opts.items()}
    if "slo" in kw:
        kw["slo"] = claims.parse_slo(kw["slo"])
    return claims.simulated_claims(claims.SimClaimsConfig(**kw), progress=claims.stderr_progress)


def _print_workers(args: argparse.Namespace, cfg, result) -> int:
    from moekit.plan.serve_workers import format_workers, prompt_comm, step_comm, worker_layout

    if args.weight_dtype not in ("fp32", "bf16", "fp16"):  # the workers run one torch dtype, unquantized
        raise ValueError(f"--workers describes unquantized workers: --weight-dtype fp32, bf16 or fp16, "
                         f"not {args.weight_dtype}")
    nbytes = int(DTYPE_BYTES[args.weight_dtype])
    layout = worker_layout(cfg, args.tp, args.pp, args.ep, dtype_bytes=nbytes, kv_cache_gb=args.kv_cache_gb,
                           block_size=args.block_size)
    tokens = args.batch or 16  # a decode step: one token and one logit row per sequence
    decode = step_comm(cfg, args.tp, args.pp, args.ep, tokens=tokens, logit_rows=tokens, dtype_bytes=nbytes)
    prefill = prompt_comm(cfg, args.tp, args.pp, args.ep, prompt_len=result.prompt_len, chunk=args.prefill_chunk,
                          dtype_bytes=nbytes)
    if args.json:
        d = result.to_dict()
        d["workers"] = {**layout.to_dict(),
                        "decode_step": {"tokens": tokens, "logit_rows": tokens, "stages": [asdict(c) for c in decode]},
                        "prefill": {"prompt_len": result.prompt_len, "chunk": args.prefill_chunk,
                                    "stages": [asdict(c) for c in prefill]}}
        print(json.dumps(d, indent=2))
    else:
        print(format_serve(result) + "\n\n" + format_workers(layout, decode, tokens, prefill, result.prompt_len))
    return 0
