"""`moekit bench BENCHMARK`: measurements of this machine that other commands consume.

    moekit bench hardware [--device cpu|cuda] [--out FILE] [--quick]

Each benchmark is a module with `add_arguments(parser)` and `run(args) -> int`, listed in
`BENCHMARKS` and imported only when it runs (the same contract as `moekit.cli.COMMANDS`).
Benchmarks of moekit's own code against baselines live in `bench/` as scripts.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "hardware": ("moekit.bench_hardware", "memory read, GEMV and GEMM speed of this machine (hardware entry)"),
    "serve": ("moekit.serve.bench", "latency and throughput of an OpenAI-compatible server (vLLM bench serve)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (module, help_text) in BENCHMARKS.items():
        b = sub.add_parser(name, help=help_text, description=help_text)
        b.set_defaults(_bench_module=module)
        importlib.import_module(module).add_arguments(b)


def run(args: argparse.Namespace) -> int:
    if args.benchmark is None:
        names = ",".join(BENCHMARKS)
        raise ValueError(f"choose a benchmark: moekit bench {{{names}}} (see moekit bench --help)")
    if args.overrides:
        raise ValueError(f"model overrides ({', '.join('--' + k for k in args.overrides)}) do not apply to "
                         f"`moekit bench {args.benchmark}`")
    return importlib.import_module(args._bench_module).run(args)
