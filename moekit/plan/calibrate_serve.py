"""The serving-time model against published inference measurements: predicted vs published, and the fit of its
constants.

    moekit plan calibration                          # the training table, then this one
    python -m moekit.plan.calibrate_serve --fit      # refit on the fit rows, write moekit/plan/serve_constants.json
    from moekit.plan.calibrate_serve import serve_calibration; c = serve_calibration(); c.median("held-out")

The rows are calibration/serve.jsonl (calibration/README.md): one published figure per line with its source, model,
GPU, tensor-parallel degree, dtypes, batch, prompt and output lengths and `split`. Every third row in file order is
held out, a rule fixed before the first fit. The fit reads only the `fit` rows: least squares of
log(predicted / published) over the constants of moekit/plan/serve_time.py (`ServeConstants`), Nelder-Mead on their
logs (numpy only, calibrate_train.py's), efficiencies capped at 1.

Metrics, each predicted through `serve()` on the row's deployment (one replica of tp GPUs, no pipeline):
- `decode_tps_user`: batch-1 (or batch-B) output tokens/s per sequence at the mean context prompt + output / 2;
- `ttft_ms`: one prompt's prefill, alone (time to first token);
- `static_throughput`: output tokens/s per GPU of a static batch (TensorRT-LLM's gptSessionBenchmark): B prompts'
  prefill at the batched-prefill rate, then `output_len` decode steps of batch B at the mean context.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekit.config import ModelConfig
from moekit.plan.calibrate_train import Calibration, nelder_mead, read_rows
from moekit.plan.serve import serve
from moekit.plan.serve_time import CONSTANTS_PATH, ServeConstants, load_serve_constants
from moekit.util import atomic_write_text

ROWS_PATH = Path(__file__).resolve().parents[2] / "calibration" / "serve.jsonl"
METRICS = {"decode_tps_user": "tok/s/user", "ttft_ms": "ms", "static_throughput": "tok/s/GPU"}
SPLITS = ("fit", "held-out")
PREFILL_TOKENS = 8192  # tokens per batched-prefill step for static batches (TensorRT-LLM's max_num_tokens default)
MEMORY_FRACTION = 0.95  # TensorRT-LLM's static engines preallocate nearly all of HBM
# Shares of a peak are at most 1; decode GEMV at most 90% of HBM bandwidth (hardware.py: well-tuned kernels reach
# 80-90% on A100/H100), else the fit trades bandwidth for the launch floor past what a kernel can stream.
CAPS = {"bandwidth": 0.9, "attention": 1.0, "int8_gemv": 1.0, "int4_gemv": 1.0, "fp8": 1.0}
STARTS = {"bandwidth": 0.8, "attention": 0.7, "int8_gemv": 0.75, "int4_gemv": 0.5, "fp8": 0.7, "launch_us": 20.0,
          "expert_us": 5.0, "allreduce_us": 8.0, "step_us": 100.0}


@dataclass
class ServeRow:
    name: str
    split: str
    source: str
    metric: str
    published: float
    predicted: float

    @property
    def error(self) -> float:
        """predicted / published - 1 (latency rows compare latencies, throughput rows throughputs)."""
        return self.predicted / self.published - 1


# The same container as training's: rows with `split` and `error`, the constants, their medians.
ServeCalibration = Calibration


def load_rows(path: str | Path = ROWS_PATH) -> list[dict]:
    """The serving calibration rows, each checked for the fields the prediction needs."""
    return read_rows(path, ("name", "split", "source", "metric", "published", "gpu", "tp", "batch", "input_len",
                            "output_len", "weight_dtype", "kv_dtype", "model"), METRICS, "calibration/serve.jsonl")


def _model(r: dict) -> ModelConfig | str:
    return r["model"] if isinstance(r["model"], str) else ModelConfig(**r["model"])


def predict(r: dict, k: ServeConstants) -> float:
    """The row's figure as the serving model predicts it, in the row's unit (module docstring)."""
    isl, osl, b, tp = r["input_len"], r["output_len"], r["batch"], r["tp"]
    kw = dict(n_gpus=tp, tp=tp, pp=1, weight_dtype=r["weight_dtype"], kv_dtype=r["kv_dtype"],
              memory_fraction=MEMORY_FRACTION, serve_constants=k)
    if r["metric"] == "ttft_ms":
        p = serve(_model(r), r["gpu"], batch=1, context=isl, prompt_len=isl, prefill_chunk=isl, **kw)
        return p.time_to_first_token * 1e3
    p = serve(_model(r), r["gpu"], batch=b, context=isl + osl // 2, prompt_len=isl,
              prefill_chunk=max(isl, PREFILL_TOKENS), **kw)
    if r["metric"] == "decode_tps_user":
        return p.tokens_per_s_per_user
    prefill_s = b * isl / p.input_tokens_per_s
    return b * osl / (prefill_s + osl * p.token_seconds) / tp


def serve_calibration(path: str | Path = ROWS_PATH, constants: ServeConstants | None = None) -> ServeCalibration:
    """Every row predicted with `constants` (default: the fitted file)."""
    k = constants or load_serve_constants()
    rows = [ServeRow(name=r["name"], split=r["split"], source=r["source"], metric=r["metric"],
                     published=float(r["published"]), predicted=predict(r, k)) for r in load_rows(path)]
    return ServeCalibration(rows=rows, constants=k, path=str(path))


def _constants(x: np.ndarray, fitted: str = "", rows: tuple = ()) -> ServeConstants:
    values = {name: float(np.exp(v)) for name, v in zip(ServeConstants.FREE, x, strict=True)}
    values = {n: min(CAPS[n], v) if n in CAPS else v for n, v in values.items()}
    return ServeConstants(**values, fitted=fitted, rows=rows)


def fit(path: str | Path = ROWS_PATH, iters: int = 600) -> ServeConstants:
    """Fit the constants on the `fit` rows only; the held-out rows are never read here."""
    rows = [r for r in load_rows(path) if r["split"] == "fit"]

    def loss(x: np.ndarray) -> float:
        k = _constants(x)
        return sum(math.log(predict(r, k) / r["published"]) ** 2 for r in rows)

    x = nelder_mead(loss, np.log([STARTS[n] for n in ServeConstants.FREE]), step=0.3, iters=iters)
    when = datetime.date.today().isoformat()
    return _constants(x, fitted=f"{when}: {len(rows)} fit rows of {Path(path).name}",
                      rows=tuple(r["name"] for r in rows))


def write_constants(k: ServeConstants, path: str | Path = CONSTANTS_PATH) -> None:
    atomic_write_text(path, json.dumps(k.to_dict(), indent=2) + "\n")
    load_serve_constants.cache_clear()


def format_serve_calibration(c: ServeCalibration) -> str:
    k = c.constants
    lines = [f"serving-time model vs published inference measurements ({c.path})",
             f"  constants: bandwidth {k.bandwidth:.2f}, attention {k.attention:.2f}, int8 GEMV {k.int8_gemv:.2f}, "
             f"int4 GEMV {k.int4_gemv:.2f}, fp8 {k.fp8:.2f} (of the FP8 peak, relative); launch {k.launch_us:.1f} us "
             f"per layer, expert dispatch {k.expert_us:.1f} us, all-reduce {k.allreduce_us:.1f} us x (1 + log2 tp), "
             f"step {k.step_us:.0f} us; fitted {k.fitted}"]
    width = max(len(r.name) for r in c.rows)
    for which in SPLITS:
        rows = c.split(which)
        lines += ["", f"{which} rows ({len(rows)}):",
                  f"  {'measurement':<{width}}  {'published':>10}  {'predicted':>10}  {'error':>7}  unit"]
        lines += [f"  {r.name:<{width}}  {r.published:>10,.1f}  {r.predicted:>10,.1f}  {r.error:>+7.1%}  "
                  f"{METRICS[r.metric]}" for r in rows]
        lines.append(f"  median |error| {c.median(which):.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=str(ROWS_PATH), help="calibration rows (JSONL)")
    ap.add_argument("--fit", action="store_true", help="refit the constants on the fit rows and write them")
    args = ap.parse_args(argv)
    if args.fit:
        write_constants(fit(args.file))
    print(format_serve_calibration(serve_calibration(args.file)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
