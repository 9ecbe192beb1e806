"""The training-time model against published runs: predicted vs published throughput, and the fit of its constants.

    moekit plan calibration                           # every row: predicted vs published, fit and held-out apart
    python -m moekit.plan.calibrate_train --fit       # refit the constants on the fit rows, write train_constants.json
    from moekit.plan.calibrate_train import calibration; c = calibration(); c.median("held-out")

The rows are calibration/train.jsonl at the repository root (calibration/README.md: one published measurement per
line, with its source, layout and `split`). Every third row in file order is held out, a rule fixed before the
first fit, so held-out rows come from every source. The fit touches only the `fit` rows: a least-squares fit of
log(predicted / published) throughput (Nelder-Mead on the logs of the constants, numpy only) of the few free
constants of moekit/plan/step_time.py (`StepConstants`), stored with the date and the rows in
moekit/plan/train_constants.json, which the planner reads.

Published figures are compared as tokens/s per GPU: an iteration time gives global batch x sequence / (time x
GPUs); an MFU gives MFU x bf16 peak / (6 N + 12 L s q_dim), the PaLM convention (Chowdhery et al. 2022, appendix B)
with N the matmul parameters, as moekit counts them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.config import ModelConfig
from moekit.counts import flops_per_token
from moekit.plan.gemm import MAMF
from moekit.plan.hardware import get_gpu
from moekit.plan.step_time import CONSTANTS_PATH, StepConstants, load_constants
from moekit.plan.train import train
from moekit.util import atomic_write_text

ROWS_PATH = Path(__file__).resolve().parents[2] / "calibration" / "train.jsonl"
METRICS = ("iteration_s", "tokens_per_s_per_gpu", "mfu")
SPLITS = ("fit", "held-out")
FITTED_GENERATIONS = ("ampere", "hopper")  # the generations with rows; the others take their mean (step_time.py)


@dataclass
class Row:
    name: str
    split: str
    source: str
    published: float  # tokens/s per GPU, from the published figure
    predicted: float  # tokens/s per GPU
    figure: str  # the published figure as published

    @property
    def error(self) -> float:
        """predicted / published - 1."""
        return self.predicted / self.published - 1


@dataclass
class Calibration:
    """Rows with their errors and the constants that predicted them (training's Row/StepConstants, or serving's)."""

    rows: list[Row]
    constants: StepConstants
    path: str = ""
    notes: list[str] = field(default_factory=list)

    def split(self, which: str) -> list[Row]:
        return [r for r in self.rows if r.split == which]

    def median(self, which: str) -> float:
        """Median absolute relative error of one split's rows."""
        return statistics.median(abs(r.error) for r in self.split(which))

    def to_dict(self) -> dict:
        return {"path": self.path, "constants": self.constants.to_dict(),
                "median_abs_error": {s: self.median(s) for s in SPLITS},
                "rows": [dict(vars(r), error=r.error) for r in self.rows]}


def read_rows(path: str | Path, required: tuple[str, ...], metrics: tuple[str, ...], hint: str) -> list[dict]:
    """The rows of a calibration JSONL file, each checked for `required` fields, a known metric and split (the
    training and the serving tables share the format: calibration/README.md)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {p} does not exist: pass {hint}")
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} line {i} is not JSON: {e}") from None
        missing = [k for k in required if k not in r]
        if missing:
            raise ValueError(f"{p} line {i} lacks {', '.join(missing)}: see calibration/README.md")
        if r["metric"] not in metrics or r["split"] not in SPLITS:
            raise ValueError(f"{p} line {i}: metric must be one of {', '.join(metrics)} and split one of "
                             f"{', '.join(SPLITS)}")
        rows.append(r)
    return rows


def load_rows(path: str | Path = ROWS_PATH) -> list[dict]:
    """The training calibration rows, each checked for the fields the prediction needs."""
    return read_rows(path, ("name", "split", "source", "metric", "published", "gpu", "n_gpus", "tp", "pp", "seq_len",
                            "global_batch", "model"), METRICS, "--file calibration/train.jsonl")


def _config(r: dict) -> ModelConfig:
    return ModelConfig(**r["model"])


def published_tokens_per_s(r: dict) -> float:
    """The published figure as tokens/s per GPU (module docstring)."""
    if r["metric"] == "tokens_per_s_per_gpu":
        return float(r["published"])
    if r["metric"] == "iteration_s":
        return r["global_batch"] * r["seq_len"] / (r["published"] * r["n_gpus"])
    f = flops_per_token(_config(r), context=r["seq_len"])
    return r["published"] * get_gpu(r["gpu"]).peak_flops("bf16") / (3 * f.matmul + 3 * f.attention)


def predicted_tokens_per_s(r: dict, constants: StepConstants) -> float:
    """The step-time model's tokens/s per GPU for the row's run."""
    step_tokens = r["global_batch"] * r["seq_len"]
    p = train(_config(r), r["gpu"], r["n_gpus"], step_tokens, tp=r["tp"], pp=r["pp"], ep=r.get("ep", 1),
              zero_stage=r.get("zero", 1), batch_tokens=step_tokens, seq_len=r["seq_len"],
              micro_batch=r.get("micro_batch", 1), recompute=r.get("recompute", "none"),
              sequence_parallel=r.get("sequence_parallel", False), schedule=r.get("schedule", "1f1b"),
              stages_per_rank=r.get("stages_per_rank", 1), attention=r.get("attention", "flash"),
              constants=constants)
    return p.tokens / (p.seconds * r["n_gpus"])


def calibration(path: str | Path = ROWS_PATH, constants: StepConstants | None = None) -> Calibration:
    """Every row predicted with `constants` (default: the fitted file)."""
    k = constants or load_constants()
    rows = [Row(name=r["name"], split=r["split"], source=r["source"], published=published_tokens_per_s(r),
                predicted=predicted_tokens_per_s(r, k), figure=f"{r['published']:g} {r['metric']}")
            for r in load_rows(path)]
    return Calibration(rows=rows, constants=k, path=str(path))


def _constants(x: np.ndarray, fitted: str = "", rows: tuple = ()) -> StepConstants:
    scales = dict(zip(FITTED_GENERATIONS, np.exp(x[:2]).tolist(), strict=True))
    return StepConstants(gemm_scale=scales, memory_traffic=float(np.exp(x[2])),
                         comm_efficiency=float(min(1.0, np.exp(x[3]))), fitted=fitted, rows=rows)


def nelder_mead(f, x0: np.ndarray, step: float = 0.2, iters: int = 300, tol: float = 1e-7) -> np.ndarray:
    """Minimize f from x0 (Nelder and Mead 1965, the standard reflection/expansion/contraction/shrink steps)."""
    pts = [x0] + [x0 + step * e for e in np.eye(len(x0))]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < tol:
            break
        centre = np.mean(pts[:-1], axis=0)
        refl = centre + (centre - pts[-1])
        fr = f(refl)
        if fr < vals[0]:
            exp = centre + 2 * (centre - pts[-1])
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = centre + 0.5 * (pts[-1] - centre)
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:  # shrink towards the best point
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    return pts[int(np.argmin(vals))]


def fit(path: str | Path = ROWS_PATH, iters: int = 300) -> StepConstants:
    """Fit the constants on the `fit` rows only (module docstring); the held-out rows are never read here."""
    rows = [r for r in load_rows(path) if r["split"] == "fit"]
    pub = [published_tokens_per_s(r) for r in rows]

    def loss(x: np.ndarray) -> float:
        k = _constants(x)
        return sum(math.log(predicted_tokens_per_s(r, k) / p) ** 2 for r, p in zip(rows, pub, strict=True))

    x = nelder_mead(loss, np.log([1.0, 1.0, 1.0, 0.8]), iters=iters)
    when = datetime.date.today().isoformat()
    return _constants(x, fitted=f"{when}: {len(rows)} fit rows of {Path(path).name}",
                      rows=tuple(r["name"] for r in rows))


def write_constants(k: StepConstants, path: str | Path = CONSTANTS_PATH) -> None:
    atomic_write_text(path, json.dumps(k.to_dict(), indent=2) + "\n")
    load_constants.cache_clear()


def format_calibration(c: Calibration) -> str:
    k = c.constants
    scales = ", ".join(f"{g} {v:.3f} (x MAMF {MAMF[g].ceiling:.1%})" for g, v in k.gemm_scale.items())
    lines = [f"training-time model vs published runs ({c.path})",
             f"  constants: GEMM scale {scales}; memory traffic {k.memory_traffic:.2f}; link efficiency "
             f"{k.comm_efficiency:.2f}; fitted {k.fitted}"]
    width = max(len(r.name) for r in c.rows)
    for which in SPLITS:
        rows = c.split(which)
        lines += ["", f"{which} rows ({len(rows)}), tokens/s per GPU:",
                  f"  {'run':<{width}}  {'published':>10}  {'predicted':>10}  {'error':>7}  as published"]
        lines += [f"  {r.name:<{width}}  {r.published:>10,.0f}  {r.predicted:>10,.0f}  {r.error:>+7.1%}  {r.figure}"
                  for r in rows]
        lines.append(f"  median |error| {c.median(which):.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=str(ROWS_PATH), help="calibration rows (JSONL)")
    ap.add_argument("--fit", action="store_true", help="refit the constants on the fit rows and write them")
    args = ap.parse_args(argv)
    if args.fit:
        write_constants(fit(args.file))
    print(format_calibration(calibration(args.file)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
