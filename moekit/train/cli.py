"""`moekit train`: train a preset on the embedded corpus or on your data, resume it, extend its context.

    moekit train                                         # tiny preset -> runs/tiny, ~6 minutes on 2 cores
    moekit train --preset gpt4-mini --steps 2000 --data code=./src:4 --data text=./docs:2
    moekit train --n_layer=2 --max-minutes 1 --out runs/quick   # --key=value: model overrides
    moekit train --resume runs/tiny                      # continue exactly where the last checkpoint left off
    moekit train --init-from runs/tiny --seq-len 1024    # context extension with RoPE position interpolation

Everything is checked before anything is written: a bad flag, data path or run folder prints one
line and exits with code 2, leaving files as they were. The run folder holds config.json,
train_config.json, tokenizer.json, metrics.jsonl, checkpoints/ and, at the end, model.safetensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from moekit.config import ModelConfig
from moekit.presets import get_preset
from moekit.resolve import apply_overrides, load_config, save_config
from moekit.train.checkpoint import CKPT_DIR
from moekit.train.config import TrainConfig
from moekit.train.corpus import resolve_sources
from moekit.train.setup import check_out_dir, create_out_dir, prepare_data
from moekit.train.tokenizer import load_tokenizer
from moekit.util import atomic_write, atomic_write_text

DEFAULT_MINUTES = 6.0  # `moekit train` with no arguments: 6 minutes of training, ~7 in all on 2 cores
VISION_MINUTES = 4.0  # `moekit train --init-from RUN --vision`: stage 2's default budget
RESUMABLE = {"max_minutes", "steps"}  # the only settings a --resume may change
_HELP = {
    "seq_len": "tokens per training sequence (default: the model's max_seq_len); with --init-from, a longer "
               "one extends the context with RoPE position interpolation",
    "batch_tokens": "tokens per optimizer step at the end of the batch ramp",
    "batch_tokens_start": "tokens per step at the start of the ramp (0 = no ramp; with --batch-tokens alone: "
                          "a quarter of it)",
    "batch_ramp_tokens": "tokens trained while the batch grows linearly to --batch-tokens",
    "grad_accum": "micro-batches per step (gradient accumulation)",
    "lr": "peak learning rate", "min_lr_ratio": "final learning rate as a fraction of --lr (cosine decay)",
    "warmup_steps": "linear warmup steps", "weight_decay": "AdamW weight decay (matrices only)",
    "grad_clip": "max global gradient norm (0 = off)",
    "steps": "optimizer steps (default: as many as fit in --max-minutes)",
    "max_minutes": f"training-time budget in minutes (default {DEFAULT_MINUTES:g} when --steps is not given)",
    "eval_every": "evaluate every N steps (0 = only at the end)", "eval_tokens": "validation tokens per source",
    "log_every": "log a line every N steps", "save_every": "checkpoint every N steps (0 = only at the end)",
    "keep_checkpoints": "checkpoints to keep", "val_fraction": "share of files held out for validation",
    "dtype": "auto (bf16 autocast where the hardware has bf16 matmuls), bf16 or fp32",
    "compile": "torch.compile each transformer block: fewer, fused kernels on a GPU (the first steps compile)",
}
_SPECIAL = {"data", "tokenizer", "init_from"}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model preset (default: tiny); see `moekit info`")
    p.add_argument("--out", help="run folder (default: runs/PRESET)")
    p.add_argument("--resume", metavar="RUN", help="continue a run from its newest good checkpoint")
    p.add_argument("--init-from", metavar="RUN", help="start from a run's weights with a fresh optimizer "
                   "(default --lr: a tenth of the pre-training one; no batch ramp)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--data", action="append", metavar="NAME=PATH[:EPOCHS]",
                   help="a training source (repeatable): a file or folder of .txt/.md/.py/.jsonl, or "
                        "@stdlib-text / @stdlib-code; default: text=@stdlib-text:2 code=@stdlib-code:4")
    p.add_argument("--tokenizer", metavar="PATH", help="an existing tokenizer.json (default: train a BPE)")
    p.add_argument("--sample-prompt", default="def", help="prompt of the sample printed at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, log lines only")
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SPECIAL:
            continue
        text = _HELP.get(f.name, f.name.replace("_", " "))
        if f.type == "bool":
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", default=None, dest=f.name,
                           help=f"{text} (default: off)")
            continue
        kind = {"int": int, "float": float}.get(f.type, str)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, dest=f.name,
                       help=text if "default" in text else f"{text} (default: {_default(f)})")
    add_parallel_arguments(p)
    from moekit.train.vision_stage import add_vision_arguments

    add_vision_arguments(p)
    p.epilog = ("Model overrides: --key=value with a ModelConfig field, e.g. --n_layer=2 --top_k=1 (see "
                "`moekit info tiny --json`). Training flags are written with dashes.")


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _given(args: argparse.Namespace) -> dict:
    """The TrainConfig flags the user passed (argparse defaults are None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name not in _SPECIAL and getattr(args, f.name) is not None}


def extend_context(cfg: ModelConfig, seq_len: int) -> ModelConfig:
    """Linear RoPE position interpolation (Chen et al. 2023) to a longer context; GPT-4: 8k -> 32k."""
    rs = cfg.rope_scaling
    if rs is not None and rs.get("rope_type") != "linear":
        raise ValueError(f"--seq-len: context extension needs linear RoPE scaling; the run uses {rs['rope_type']}")
    factor = (float(rs["factor"]) if rs else 1.0) * seq_len / cfg.max_seq_len
    return cfg.replace(max_seq_len=seq_len, rope_scaling={"rope_type": "linear", "factor": factor})


# ---- data ------------------------------------------------------------------------------------------
# ---- the command -----------------------------------------------------------------------------------------
def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel (moekit/parallel/; README, Distributed training)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N local processes (starts torchrun's elastic agent; default 1)")
    g.add_argument("--dp", type=int, default=0, help="data-parallel ranks (default: the processes --tp leaves)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, sequence parallel and a "
                   "vocabulary-parallel loss (must divide the query heads; default 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages: each rank holds n_layer / pp consecutive "
                   "layers, the first also the embedding, the last the norm, head and loss (default 1)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel ranks, carved out of the data-parallel ones: "
                   "each holds n_expert / ep experts of every MoE layer, tokens travel to them by all-to-all "
                   "(must divide --dp and n_expert; default 1)")
    g.add_argument("--schedule", default="1f1b", help="pipeline schedule with --pp: gpipe, 1f1b, interleaved-1f1b "
                   "(--stages-per-rank 2+), zero-bubble (ZB-V, --stages-per-rank 2) (default 1f1b)")
    g.add_argument("--microbatches", type=int, default=None, metavar="M", help="micro-batches per step through the "
                   "pipeline: the same setting as --grad-accum (one process accumulating over the same M)")
    g.add_argument("--stages-per-rank", type=int, default=1, metavar="V", help="pipeline stages each --pp rank "
                   "holds (interleaving: --pp x V equal stages; default 1)")
    g.add_argument("--zero", type=int, default=0, help="how data-parallel ranks share the training state: "
                   "0 DDP, 1 ZeRO-1 (sharded optimizer state), 2 FSDP2 ZeRO-2, 3 FSDP2 ZeRO-3 (default 0)")
    g.add_argument("--collective-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a collective that waits longer fails the job instead of hanging it; it also bounds the "
                        "start-up wait while rank 0 prepares the data (default 600)")
    g.add_argument("--dry-run", action="store_true", help="build the layout at full size on torch's fake process "
                   "group in this process and print what each distinct rank holds and sends, beside the planner's "
                   "figures; trains nothing, writes nothing (--tp x --pp x --dp is the world; moekit/parallel/"
                   "dry_run.py)")
    g.add_argument("--gpu", default="A100-80GB", help="with --dry-run: the GPU whose memory each rank must fit "
                   "(the planner's hardware table; default A100-80GB)")


def _layout_flags(args: argparse.Namespace, world: int, cfg: ModelConfig):
    from moekit.parallel.mesh import ParallelDims

    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: the number of processes must be >= 1 (1 = this process)")
    dims = ParallelDims.from_flags(world, dp=args.dp, tp=args.tp, pp=args.pp, ep=args.ep, zero=args.zero, cfg=cfg)
    pipeline = _pipeline_flags(args)
    if dims.pp > 1:
        pipeline.check(dims.pp, cfg)
    elif args.stages_per_rank != 1:
        raise ValueError(f"--stages-per-rank {args.stages_per_rank} interleaves pipeline stages: it needs --pp 2 "
                         "or more")
    return dims


def _pipeline_flags(args: argparse.Namespace):
    from moekit.parallel.stages import PipelineConfig

    return PipelineConfig(args.schedule, args.microbatches or 1, args.stages_per_rank)


def _microbatches(args: argparse.Namespace, tc: TrainConfig) -> TrainConfig:
    """--microbatches M is --grad-accum M (the trainer's micro-batches); afterwards args carry the step's count."""
    if args.microbatches is not None and args.microbatches != tc.grad_accum:
        if args.grad_accum is not None or args.resume:
            raise ValueError(f"--microbatches {args.microbatches} and --grad-accum {tc.grad_accum} name the same "
                             "setting (micro-batches per step)" + (": a resumed run keeps its own" if args.resume
                                                                   else ": give one"))
        tc = tc.replace(grad_accum=args.microbatches)
    args.microbatches = tc.grad_accum
    return tc


def _in_job() -> bool:
    """Is this process a worker of a torchrun job (of more than one process)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class _Job:
    """This process's place in the run: the layout, and the barrier around what only the main rank writes."""

    def __init__(self, args: argparse.Namespace, cfg: ModelConfig, device_choice: str):
        from moekit.parallel.mesh import init_distributed
        from moekit.parallel.parallelize import Layout

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.nproc not in (None, 1, world) and _in_job():
            raise ValueError(f"--nproc {args.nproc} under torchrun's {world} processes: drop --nproc")
        dims = _layout_flags(args, world, cfg)  # every rank checks the same flags: all fail alike, none waits
        self.env = init_distributed(device_choice, timeout=args.collective_timeout)
        if self.env.device.type == "cpu":
            _set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.layout = Layout.from_env(dims, self.env, **({"pipeline": _pipeline_flags(args)} if dims.pp > 1 else {}))
        self.is_main = self.env.is_main

    def barrier(self) -> None:
        if self.layout.mesh is not None:
            torch.distributed.barrier()

    def finish(self, code: int) -> int:
        """Every rank leaves together (the main one exports and samples last): a rank that tore down its process
        group while a peer still ran once aborted in gloo's threads ("terminate called without an active
        exception")."""
        self.barrier()
        return code

    def close(self) -> None:
        from moekit.parallel.mesh import destroy_distributed

        destroy_distributed()


def _set_threads(local_processes: int) -> None:
    """torch's intra-op threads on a CPU: OMP_NUM_THREADS when set, else this process's share of the cores it may
    use (moekit/cpu.py: torch's default counts the machine's cores, not the affinity mask of a container or
    `taskset`). Not the cores other work leaves free, as serving takes: that changes with the load, and with it the
    matmuls' summation order, and a resumed run would no longer match an uninterrupted one bit for bit. A busy
    machine gets a warning instead."""
    from moekit import cpu

    n = cpu.process_threads(local_processes)
    if n is not None:
        torch.set_num_threads(n)
    n = torch.get_num_threads()
    why = cpu.oversubscribed(n * local_processes, busy=cpu.busy_cores(0.2))
    if why:
        tqdm.write(f"warning: the CPU is oversubscribed: {why}")


def _maybe_launch(args: argparse.Namespace, cfg: ModelConfig) -> int | None:
    """`--nproc N` outside a torchrun job: check the layout here, then start the N workers; None = train here."""
    if args.nproc in (None, 1) or _in_job():
        return None
    _layout_flags(args, args.nproc, cfg)  # before any process starts work
    from moekit.train.launch import launch

    argv = list(args.argv)
    return launch(args.nproc, argv[argv.index("train") + 1:])


def run(args: argparse.Namespace) -> int:
    log = tqdm.write
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    misnamed = sorted(k for k in args.overrides if k in train_fields)
    if misnamed:
        raise ValueError(f"--{misnamed[0]} is a training flag: write it with dashes, "
                         f"--{misnamed[0].replace('_', '-')}")
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: the number of processes must be >= 1 (1 = this process)")
    given = _given(args)
    if getattr(args, "vision", False):  # stage 2: a text run + vision (moekit/train/vision_stage.py)
        from moekit.train.vision_stage import run_vision

        if args.data:
            given["data"] = [f"{s.name}={s.path}:{s.epochs:g}" for s in resolve_sources(args.data)]
        given.setdefault("lr", _default(_FIELDS["lr"]) / 10)
        given.setdefault("batch_tokens", 2048)  # more, smaller steps: the gates open step by step
        if "steps" not in given and "max_minutes" not in given:
            given["max_minutes"] = VISION_MINUTES
        return run_vision(args, given, log)
    if args.dry_run:
        from moekit.parallel.dry_run_report import dry_run_command

        return dry_run_command(args, given, get_preset(args.preset or "tiny"))
    if args.resume:
        return resume(args, given, log)
    if args.data:
        given["data"] = [f"{s.name}={s.path}:{s.epochs:g}" for s in resolve_sources(args.data)]
    if "steps" not in given and "max_minutes" not in given:
        given["max_minutes"] = DEFAULT_MINUTES
    if args.init_from:
        # Continued training starts from trained weights: no batch ramp, and a tenth of the pre-training
        # learning rate unless told otherwise (position interpolation, Chen et al. 2023, fine-tuned
        # LLaMA at 2e-5 after pre-training at 3e-4; a full learning rate undoes what was learned).
        given.setdefault("lr", _default(_FIELDS["lr"]) / 10)
        given.setdefault("batch_tokens_start", 0)
    if "batch_tokens" in given and "batch_tokens_start" not in given:  # keep the default ramp's 1/4 start
        given["batch_tokens_start"] = given["batch_tokens"] // 4
    tc = _microbatches(args, TrainConfig(**given))

    if args.init_from:
        init = Path(args.init_from)
        if not (init / "config.json").is_file() or not (init / CKPT_DIR).is_dir():
            raise ValueError(f"--init-from {init} is not a moekit run with checkpoints")
        if args.preset:
            raise ValueError("--init-from takes the model from the run: drop --preset")
        cfg = apply_overrides(load_config(init / "config.json"), args.overrides)
        base_len = cfg.max_seq_len
        tokenizer_path = args.tokenizer or str(init / "tokenizer.json")
    else:
        cfg = apply_overrides(get_preset(args.preset or "tiny"), args.overrides)
        tokenizer_path = args.tokenizer
    seq_len = tc.seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        cfg = extend_context(cfg, seq_len) if args.init_from else cfg.replace(max_seq_len=seq_len)
    tc = tc.replace(seq_len=seq_len, tokenizer=tokenizer_path or "", init_from=args.init_from or "")
    suffix = ("-ft" if seq_len == base_len else f"-{seq_len}") if args.init_from else ""
    out = Path(args.out or f"runs/{cfg.name}{suffix}")
    check_out_dir(out, args.overwrite)
    launched = _maybe_launch(args, cfg)
    if launched is not None:
        return launched
    job = _Job(args, cfg, tc.device)
    try:
        return job.finish(_train_new(args, job, tc, cfg, out, tokenizer_path, seq_len, log))
    finally:
        job.close()


def _train_new(args, job: _Job, tc: TrainConfig, cfg: ModelConfig, out: Path, tokenizer_path, seq_len: int,
               log) -> int:
    from moekit.model.transformer import Transformer
    from moekit.train.loop import Trainer, amp_dtype, seed_everything
    from moekit.train.metrics import peak_flops

    device = job.env.device
    if not job.is_main:
        log = _quiet
        job.barrier()  # the main rank trains the tokenizer and fills the token caches first; then read them
    data = prepare_data(tc, seq_len, cfg.vocab_size, tokenizer_path, log)
    if job.is_main:
        job.barrier()
    n_vocab = data.tokenizer.get_vocab_size()
    if n_vocab > cfg.vocab_size:
        if "vocab_size" in args.overrides or args.init_from:
            raise ValueError(f"the tokenizer has {n_vocab:,} tokens, more than the model's vocab_size "
                             f"{cfg.vocab_size:,}")
        log(f"vocab_size {cfg.vocab_size:,} -> {n_vocab:,} to fit the tokenizer")
        cfg = cfg.replace(vocab_size=n_vocab)

    seed_everything(tc.seed)  # the same seed on every rank: identical initial weights, whatever the layout
    model = Transformer(cfg).to(device)
    dtype = amp_dtype(tc.dtype, device)
    trainer = Trainer(model, tc, seq_len, data.mixture, data.val, data.token_bytes_V, out, device, None,
                      {"fingerprints": data.fingerprints}, layout=job.layout)
    if args.init_from:  # before the run folder exists: a bad checkpoint leaves nothing behind
        path, _ = trainer.load_latest(args.init_from, with_optimizer=False, log=log)
        log(f"weights from {path}" + (f"; context {seq_len:,} with RoPE interpolation x"
                                      f"{cfg.rope_scaling['factor']:g}" if cfg.rope_scaling else ""))
    peak, peak_src = None, ""
    if job.is_main:
        create_out_dir(out, args.overwrite)
        save_config(cfg, out / "config.json")
        tc.save(out / "train_config.json")
        atomic_write_text(out / "tokenizer.json", data.tokenizer_json)
        peak, peak_src = peak_flops(dtype or torch.float32, device)
        trainer.peak = peak
        trainer.metrics.write({"event": "start", "model": cfg.to_dict(), "train": tc.to_dict(),
                               "device": str(device), "dtype": str(dtype or torch.float32), "peak_flops": peak,
                               "peak_source": peak_src, "flops_per_token": trainer.flops_per_token,
                               "layout": _layout_record(job)})
    job.barrier()
    return _train_and_report(trainer, out, args, log, peak, peak_src)


def _layout_record(job: _Job) -> dict:
    d = job.layout.dims
    return {"world_size": d.world_size, "dp": d.dp, "tp": d.tp, "pp": d.pp, "ep": d.ep, "zero": d.zero,
            "describe": d.describe()}


def _quiet(line: str) -> None:
    pass


def resume(args: argparse.Namespace, given: dict, log) -> int:
    from moekit.model.transformer import Transformer
    from moekit.train.loop import Trainer, amp_dtype
    from moekit.train.metrics import peak_flops

    run_dir = Path(args.resume)
    if not (run_dir / "train_config.json").is_file() or not (run_dir / "config.json").is_file():
        raise ValueError(f"--resume {run_dir} is not a moekit run (no train_config.json and config.json); "
                         "start one with `moekit train --out DIR`")
    fixed = sorted(set(given) - RESUMABLE)
    extra = [f for f, v in (("--data", args.data), ("--tokenizer", args.tokenizer), ("--init-from", args.init_from),
                            ("--preset", args.preset), ("--out", args.out)) if v]
    if fixed or extra or args.overrides:
        bad = [f"--{n.replace('_', '-')}" for n in fixed] + extra + [f"--{k}" for k in args.overrides]
        raise ValueError(f"--resume continues a run with its saved settings; only --max-minutes and --steps (and "
                         f"the layout: --nproc, --dp, --tp, --pp, --ep, --zero) may change (got {', '.join(bad)})")
    tc = _microbatches(args, TrainConfig.load(run_dir / "train_config.json").replace(**given))
    cfg = load_config(run_dir / "config.json")
    launched = _maybe_launch(args, cfg)
    if launched is not None:
        return launched
    job = _Job(args, cfg, tc.device)
    try:
        device = job.env.device
        if not job.is_main:
            log = _quiet
        data = prepare_data(tc, tc.seq_len, cfg.vocab_size, str(run_dir / "tokenizer.json"), log)
        model = Transformer(cfg).to(device)
        trainer = Trainer(model, tc, tc.seq_len, data.mixture, data.val, data.token_bytes_V, run_dir, device, None,
                          {"fingerprints": data.fingerprints}, layout=job.layout)
        path, ckpt = trainer.load_latest(run_dir, log=log)  # saved by any layout: each rank keeps its part
        trainer.restore(ckpt)
        log(f"resumed {run_dir} from {path.name}: step {ckpt['step']}, {ckpt['tokens_seen']:,} tokens"
            + ("" if job.layout.mesh is None else f" on {job.layout.describe()}"))
        if trainer.finished():
            log(f"the run is complete at step {trainer.state.step}; pass --steps N (more) or --max-minutes M "
                "to train further")
            return job.finish(0)
        changed = sorted(n for n, fp in data.fingerprints.items() if ckpt.get("fingerprints", {}).get(n) != fp)
        if changed:
            log(f"warning: data source(s) {', '.join(changed)} changed since the checkpoint: the resumed run "
                "will not repeat the original one exactly")
        peak_src = ""
        if job.is_main:
            if given:
                tc.save(run_dir / "train_config.json")
            trainer.peak, peak_src = peak_flops(amp_dtype(tc.dtype, device) or torch.float32, device)
            trainer.metrics.write({"event": "resume", "step": ckpt["step"], "checkpoint": str(path),
                                   "peak_flops": trainer.peak, "peak_source": peak_src,
                                   "layout": _layout_record(job)})
        job.barrier()
        return job.finish(_train_and_report(trainer, run_dir, args, log, trainer.peak, peak_src))
    finally:
        job.close()


def _train_and_report(trainer, out: Path, args: argparse.Namespace, log, peak: float | None, peak_src: str) -> int:
    from moekit.model.transformer import Transformer
    from moekit.train.dist_checkpoint import gather_tensors
    from moekit.train.loop import fmt
    from moekit.train.sample import complete

    c, main = trainer.raw.cfg, trainer.layout.is_main
    n_params = _count(trainer)
    layout = "" if trainer.layout.mesh is None else f" x {trainer.layout.dims.world_size} ({trainer.layout.describe()})"
    if main:
        log(f"training {c.name} ({n_params:,} parameters) on {trainer.device}{layout}, "
            f"{str(trainer.dtype or torch.float32).removeprefix('torch.')}, seq {trainer.seq_len}; "
            f"MFU against {(peak or 0) / 1e9:,.0f} GFLOP/s per process ({peak_src})")
    t0 = time.perf_counter()
    result = trainer.run(log=log, progress=not args.no_progress)
    weights = gather_tensors(trainer, with_optimizer=False)  # every rank takes part; the main one gets them
    if not main:
        return 0
    weights = weights["model.safetensors"]
    atomic_write(out / "model.safetensors", lambda tmp: save_file(
        weights, tmp, metadata={"format": "pt", "step": str(trainer.state.step)}))
    s = trainer.state
    log(f"done: {s.step} steps, {s.tokens_seen:,} tokens in {time.perf_counter() - t0:.0f}s "
        f"(this session); tokens per source {json.dumps(trainer.mixture.tokens_seen())}")
    per_source = ", ".join(f"{k} {fmt(v['bpb'])}" for k, v in result.items() if k != "all")
    print(f"validation: loss {result['all']['loss']:.3f}, {fmt(result['all']['bpb'])} bits per byte ({per_source})")
    # The sample runs on one process: the trainer's own model, or (distributed) the gathered weights.
    model = trainer.raw if trainer.layout.mesh is None else Transformer.from_tensors(c, weights,
                                                                                      device=trainer.device)
    model.eval()
    sample = complete(model, _tokenizer(out), args.sample_prompt, max_new_tokens=120, seed=0)
    print(f"sample:\n{args.sample_prompt}{sample}\n")
    print(f"next:\n  moekit sample {out} \"def\"\n  moekit generate --model {out} \"import\"\n"
          f"  moekit serve --model {out}\n  moekit train --resume {out} --steps {s.step + 100}   # train longer")
    return 0


def _count(trainer) -> int:
    """Parameters of the whole model (not of one rank's shards)."""
    from moekit.counts import count_params

    return count_params(trainer.raw.cfg).total


def _tokenizer(out: Path):
    return load_tokenizer(out / "tokenizer.json")
