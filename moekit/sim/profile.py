"""A measured step-time profile: a linear model of one engine step on this machine, fitted by `moekit sim calibrate`.

    step seconds = intercept + seqs x a + tokens x b + kv_tokens x c + attn x d + logits x e + experts x f  (all >= 0)
    gap seconds  = intercept + outputs x f + added x g      (the serving loop's own time between two steps)

Features of a micro-batch (`batch_features`): seqs scheduled; tokens computed; kv_tokens, the K/V every
attention reads (context before + new tokens, summed); attn, the causal query x key pairs; logits, rows sampled;
experts, the expert weight matrices the step reads (`experts_touched`: a decode of one token reads top_k experts
per MoE layer, a large batch all of them, and on a CPU, as on a GPU, small-batch decode is bound by those reads).
The step fit is non-negative least squares on relative error (Lawson & Hanson 1974, the active-set NNLS), since
steps range from a sub-millisecond decode to a long prefill chunk and each should be predicted in proportion; the
gap fit is plain NNLS (its mean is what the server's throughput pays). Torch-free: the simulator imports it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

STEP_TERMS = ("intercept", "seqs", "tokens", "kv_tokens", "attn", "logits", "experts")
GAP_TERMS = ("intercept", "outputs", "added")
KIND = "moekit-step-profile"


def batch_features(scheduled) -> tuple[int, int, float, float, int]:
    """(seqs, tokens, kv_tokens, attn, logits) of (request id, tokens, computed before, n_spec, num_logits) rows."""
    seqs = tokens = logits = 0
    kv = attn = 0.0
    for _, n, c, _spec, n_logits in scheduled:
        seqs += 1
        tokens += n
        kv += c + n
        attn += n * (c + (n + 1) / 2)
        logits += n_logits
    return seqs, tokens, kv, attn, logits


def experts_touched(tokens: int, moe: dict) -> float:
    """Distinct experts a step of `tokens` tokens reads, summed over the MoE layers: E (1 - (1 - k / E)^tokens) per
    layer, the expectation when each token picks its top-k of E experts uniformly (a trained router is skewed and
    touches fewer; the fitted coefficient absorbs that). moe: {"n_expert", "top_k", "layers"}; {} (dense): 0."""
    if not moe:
        return 0.0
    e, k = moe["n_expert"], moe["top_k"]
    return moe["layers"] * e * (1 - (1 - k / e) ** tokens)


def step_row(features: tuple, moe: dict) -> tuple:
    """batch_features + the experts feature: one row of the step fit, in STEP_TERMS order (less the intercept)."""
    return (*features, experts_touched(features[1], moe))


def nnls(A: np.ndarray, b: np.ndarray, iters: int = 200) -> np.ndarray:
    """argmin ||Ax - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    n = A.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(iters):
        w = A.T @ (b - A @ x)
        if passive.all() or (w[~passive] <= 1e-12 * max(1.0, np.abs(w).max())).all():
            break
        j = np.argmax(np.where(passive, -np.inf, w))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x


def fit(rows: list[tuple], seconds: list[float], terms: tuple[str, ...], *, relative: bool = True,
        trim: float = 0.05) -> tuple[dict, dict]:
    """Coefficients (by term) and fit statistics of seconds ~ [1, rows...], all coefficients >= 0.

    relative: weight each row by 1 / seconds (a sub-millisecond decode counts as much as a long prefill), else plain
    least squares (the conditional mean: right for the server's gaps, whose sum is what throughput pays). trim: the
    share of worst-fitting samples dropped before a second fit (a garbage collection or a neighbour on a shared
    machine makes a 10x step that no batch shape explains). The statistics are over every sample."""
    if len(seconds) < len(terms):
        raise ValueError(f"{len(seconds)} samples are too few to fit {len(terms)} terms: run a longer calibration")
    X = np.column_stack([np.ones(len(rows)), np.asarray(rows, dtype=float).reshape(len(rows), -1)])
    y = np.asarray(seconds, dtype=float)
    if X.shape[1] != len(terms):
        raise ValueError(f"{X.shape[1]} columns for {len(terms)} terms ({', '.join(terms)})")
    scale = X.max(0)
    scale[scale == 0] = 1
    wts = 1 / np.maximum(y, 1e-9) if relative else np.ones_like(y)
    A, b = (X / scale) * wts[:, None], y * wts
    coef = nnls(A, b) / scale
    if trim > 0 and len(y) * (1 - trim) >= len(terms):
        err = np.abs(X @ coef - y) * wts
        keep = err <= np.quantile(err, 1 - trim)
        coef = nnls(A[keep], b[keep]) / scale
    pred = X @ coef
    rel = np.abs(pred - y) / np.maximum(y, 1e-9)
    ss = ((y - y.mean()) ** 2).sum()
    stats = {"samples": len(y), "median_rel_err": float(np.median(rel)), "p90_rel_err": float(np.percentile(rel, 90)),
             "r2": float(1 - ((y - pred) ** 2).sum() / ss) if ss > 0 else 1.0}
    return dict(zip(terms, map(float, coef), strict=True)), stats


JITTER_QUANTILES, JITTER_BINS = 128, 4


def jitter_quantiles(predicted, measured, n: int = JITTER_QUANTILES, bins: int = JITTER_BINS) -> dict:
    """What a fitted step misses, from a shared core's noise to a garbage-collection pause, for the simulator to
    draw from: the distribution of measured / predicted step time as n evenly spaced quantiles (the midpoints), in
    `bins` bins of predicted time with equally many steps each (a 300 ms pause is a 60x ratio on a 5 ms decode and
    a 3x one on a 100 ms prefill chunk: one ratio distribution for all steps would stretch long steps by short
    steps' stalls). {"edges": the predicted seconds between bins, "quantiles": per bin}; {} without steps."""
    pred = np.maximum(np.asarray(predicted, dtype=float), 1e-12)
    ratio = np.asarray(measured, dtype=float) / pred
    if not len(ratio):
        return {}
    bins = max(1, min(bins, len(ratio) // 32))  # a few dozen steps per bin at least
    edges = np.quantile(pred, np.arange(1, bins) / bins) if bins > 1 else np.array([])
    which = np.searchsorted(edges, pred, side="right")
    mid = (np.arange(n) + 0.5) / n
    quantiles = [np.quantile(ratio[which == b], mid) if (which == b).any() else np.ones(n) for b in range(bins)]
    return {"edges": [float(e) for e in edges], "quantiles": [[float(x) for x in q] for q in quantiles]}


def draw_jitter(jitter: dict, predicted: float, u: float) -> float:
    """The ratio for a step predicted at `predicted` seconds, at uniform draw u in [0, 1)."""
    import bisect

    q = jitter["quantiles"][bisect.bisect_right(jitter["edges"], predicted)]
    return q[int(u * len(q))]


@dataclass
class StepProfile:
    step: dict[str, float]
    gap: dict[str, float] = field(default_factory=lambda: dict.fromkeys(GAP_TERMS, 0.0))
    model: str = ""
    device: str = "cpu"
    threads: int = 0
    source: str = ""
    engine: dict = field(default_factory=dict)  # the engine settings measured: num_blocks, block_size, ...
    moe: dict = field(default_factory=dict)  # the model's n_expert, top_k, MoE layers (experts_touched); {}: dense
    fit: dict = field(default_factory=dict)
    # Seconds a request spends outside the engine, as the client sees it (HTTP, tokenizing, streaming back):
    # calibrate --client-detail measures it; the simulator delays each arrival by it.
    latency_s: float = 0.0
    # Quantiles of measured / predicted step time by predicted size (`jitter_quantiles`); {} for none. The simulator
    # multiplies each predicted step by a draw from them: the measured steps' mean and spread, not the fit's median.
    jitter: dict = field(default_factory=dict)

    def step_seconds(self, seqs: int, tokens: int, kv_tokens: float, attn: float, logits: int) -> float:
        c = self.step
        return (c["intercept"] + c["seqs"] * seqs + c["tokens"] * tokens + c["kv_tokens"] * kv_tokens
                + c["attn"] * attn + c["logits"] * logits + c["experts"] * experts_touched(tokens, self.moe))

    def gap_seconds(self, outputs: int, added: int) -> float:
        g = self.gap
        return g["intercept"] + g["outputs"] * outputs + g["added"] * added

    def save(self, path) -> None:
        from moekit.util import atomic_write_text

        atomic_write_text(path, json.dumps({"kind": KIND, "version": 1, **asdict(self)}, indent=1) + "\n")

    @classmethod
    def load(cls, path) -> StepProfile:
        path = Path(path)
        hint = "make one with `moekit sim calibrate --model RUN --out FILE`"
        if not path.is_file():
            raise FileNotFoundError(f"--profile {path}: no such file; {hint}")
        try:
            d = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"--profile {path} is not JSON; {hint}") from None
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise ValueError(f"--profile {path} is not a moekit step profile; {hint}")
        d.pop("kind"), d.pop("version", None)
        step, gap = d.get("step") or {}, d.get("gap") or {}
        missing = [t for t in STEP_TERMS if not isinstance(step.get(t), int | float)] + \
                  [f"gap.{t}" for t in GAP_TERMS if not isinstance(gap.get(t), int | float)]
        if missing:
            raise ValueError(f"--profile {path} lacks coefficients {', '.join(missing)}; {hint}")
        lat = d.get("latency_s", 0.0)
        if not isinstance(lat, int | float) or not 0 <= lat < 60:
            raise ValueError(f"--profile {path}: latency_s must be seconds in [0, 60), got {lat!r}; {hint}")
        jit = d.get("jitter") or {}
        edges, qs = jit.get("edges", []), jit.get("quantiles", []) if isinstance(jit, dict) else (None, None)
        if jit and not (isinstance(edges, list) and isinstance(qs, list) and len(qs) == len(edges) + 1
                        and all(isinstance(q, list) and q and all(isinstance(x, int | float) and x >= 0 for x in q)
                                for q in qs)):
            raise ValueError(f"--profile {path}: jitter must hold edges and one list of ratios more; {hint}")
        moe = d.get("moe") or {}
        if moe and not (all(isinstance(moe.get(x), int) for x in ("n_expert", "top_k", "layers"))
                        and 0 < moe["top_k"] <= moe["n_expert"]):
            raise ValueError(f"--profile {path}: moe must give integers n_expert, top_k <= n_expert, layers; {hint}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"--profile {path}: {e}; {hint}") from None
