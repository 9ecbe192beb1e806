"""The `moekit` command: `moekit info|plan|train|sample|...`; `moekit COMMAND --help` for each.

Each command lives in its own module, which defines `add_arguments(parser)` and `run(args) -> int`;
`COMMANDS` maps the command name to that module, imported only when the command runs.
User errors (ValueError, FileNotFoundError) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from moekit.resolve import split_overrides

COMMANDS = {
    "info": ("moekit.info", "the model card of a preset, a run or a Hugging Face directory"),
    "train": ("moekit.train.cli", "train a preset (tiny by default) on the embedded corpus or --data; --resume"),
    "sample": ("moekit.train.sample", "sample text from a run: moekit sample RUN \"prompt\""),
    "generate": ("moekit.infer.cli", "stream a completion: moekit generate --model RUN|HF_DIR \"prompt\""),
    "serve": ("moekit.serve.cli", "OpenAI-compatible HTTP server: moekit serve --model RUN|HF_DIR [--port 8000]"),
    "plan": ("moekit.plan.cli", "cost of training and serving: the GPT-4 report, train, serve, wall, chart"),
    "sim": ("moekit.sim.cli", "simulate serving at cluster scale with the real scheduler: moekit sim --rate 4"),
    "bench": ("moekit.bench_cmd", "measure this machine: `moekit bench hardware` writes its hardware entry"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage block too)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (to add its arguments), so startup stays fast."""
    parser = Parser(prog="moekit", description=__doc__.splitlines()[0],
                                     epilog="Model config overrides: --key=value, e.g. --n_layer=2 --top_k=1.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_overrides(argv)
        parser = build_parser(next((a for a in rest if a in COMMANDS), None))
        args = parser.parse_args(rest)
        if args.command is None:
            parser.print_help()
            return 2
        args.overrides = overrides
        args.argv = argv  # as given: `moekit train --nproc N` hands it on to its workers
        return importlib.import_module(args._module).run(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        print(f"moekit: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `moekit plan ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
