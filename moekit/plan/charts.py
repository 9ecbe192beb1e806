"""PNG charts of the planner: `moekit plan chart --out DIR` writes three files (matplotlib, Agg backend).

- brick_wall.png: the article's chart, tokens/s per user against model size for 1, 2, 4 and 8 H100
  at batch 1, with the 8.33 and 33.33 tokens/s reading speeds (SPEC section 1);
- cost_vs_batch.png: $ per 1k output tokens against batch size for GPT-4 on 128 A100 and 128 H100,
  the report's serving scenario, with the article's $0.0049 and $0.0021 (SPEC section 4);
- expert_coverage.png: experts a batch touches per layer, E x (1 - (1 - k/E)^B), for GPT-4's 16
  experts top-2 and other shapes: why batch 8 reads far more expert weights than batch 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moekit.counts import count_params
from moekit.plan.report import SERVE_A100, SERVE_H100
from moekit.plan.serve import expert_coverage, serve
from moekit.plan.wall import ARTICLE_OVERHEAD, READING_SPEEDS, article_h100, max_tokens_per_s
from moekit.presets import get_preset
from moekit.util import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to files only
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, legend_loc: str = "best") -> None:
    """Grid, legend, write the PNG atomically, free the figure: the same for every chart."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc=legend_loc)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    _pyplot().close(fig)


def brick_wall_chart(path: Path) -> None:
    plt = _pyplot()
    hw = article_h100()
    params = np.logspace(10, 12.5, 200)  # 10B to ~3T
    gpt4 = count_params(get_preset("gpt4"))
    fig, ax = plt.subplots(figsize=(8, 5))
    for n in (1, 2, 4, 8):
        tps = [max_tokens_per_s(p, hw, n, 2, ARTICLE_OVERHEAD) for p in params]
        ax.plot(params / 1e9, tps, label=f"{n}x H100")
    for name, tps in READING_SPEEDS.items():
        ax.axhline(tps, color="gray", ls="--", lw=1)
        ax.text(params[0] / 1e9 * 1.05, tps * 1.06, f"{tps:.2f} tokens/s ({name})", color="gray", fontsize=8)
    for value, label in ((gpt4.active, "GPT-4 active (280B)"), (gpt4.total, "GPT-4 total (1.8T)")):
        ax.axvline(value / 1e9, color="tab:red", ls=":", lw=1)
        ax.text(value / 1e9 * 1.04, 1500, label, color="tab:red", fontsize=8, rotation=90, va="top")
    wall_params = 8 * hw.bandwidth / (ARTICLE_OVERHEAD * 2 * 20)
    ax.plot(wall_params / 1e9, 20, "ko", ms=4)
    ax.annotate(f"the wall: {wall_params / 1e9:.0f}B at 20 tokens/s on 8x H100", (wall_params / 1e9, 20),
                textcoords="offset points", xytext=(6, -14), fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="model parameters read per token (billions)",
           ylabel="tokens/s per user (batch 1)", ylim=(1, 2000),
           title="The brick wall: decode speed at batch 1 is memory bandwidth / bytes read\n"
                 "H100 at the article's 3 TB/s, bf16 weights, overheads = weight reads (x2)")
    _finish(fig, ax, path)


def cost_vs_batch_chart(path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for setup, article, color in ((SERVE_A100, 0.0049, "tab:blue"), (SERVE_H100, 0.0021, "tab:orange")):
        top = serve(**setup).max_batch
        batches = sorted({int(b) for b in np.unique(np.geomspace(1, top, 40).round())})
        costs = [serve(**setup, batch=b).cost_per_1k_output for b in batches]
        label = f"128 x {setup['gpu']} ({setup['weight_dtype']} weights, {setup['kv_dtype']} cache)"
        ax.plot(batches, costs, color=color, label=label)
        ax.plot(batches[-1], costs[-1], "o", color=color)
        ax.annotate(f"memory full: batch {top}", (batches[-1], costs[-1]), textcoords="offset points",
                    xytext=(-110, 12), fontsize=8, color=color)
        ax.axhline(article, color=color, ls="--", lw=1)
        ax.text(1.1, article * 1.08, f"article: \\${article} per 1k", color=color, fontsize=8)
    ax.set(xscale="log", yscale="log",
           xlabel="batch size (sequences per micro-batch; 16 micro-batches in flight)",
           ylabel="$ per 1k output tokens",
           title="GPT-4 decode cost on 128 GPUs (tensor 8 x pipeline 16), busy 100% of the time\n"
                 "4k prompt + 4k output (mean KV cache 6,144 tokens), \\$1/A100-hour, \\$2/H100-hour")
    _finish(fig, ax, path)


def coverage_chart(path: Path) -> None:
    plt = _pyplot()
    batch = np.unique(np.geomspace(1, 4096, 200).round())
    fig, ax = plt.subplots(figsize=(8, 5))
    for e, k, label in ((16, 2, "GPT-4: 16 experts, top-2"), (8, 2, "Mixtral: 8 experts, top-2"),
                        (256, 8, "DeepSeek-V3: 256 routed experts, top-8"),
                        (128, 1, "Switch: 128 experts, top-1")):
        ax.plot(batch, [expert_coverage(e, k, b) / e for b in batch], label=label)
    for b in (1, 8):
        frac = expert_coverage(16, 2, b) / 16
        ax.plot(b, frac, "ko", ms=4)
        ax.annotate(f"batch {b}: {expert_coverage(16, 2, b):.1f} of 16", (b, frac),
                    textcoords="offset points", xytext=(8, -4), fontsize=8)
    ax.set(xscale="log", ylim=(0, 1.02), xlabel="tokens in the batch (one decode step)",
           ylabel="fraction of a layer's experts read",
           title="MoE expert coverage: E x (1 - (1 - k/E)^B) distinct experts touched per layer\n"
                 "(uniform random routing): at batch 8 GPT-4 already reads 65% of its expert weights")
    _finish(fig, ax, path, legend_loc="lower right")


CHARTS = {"brick_wall.png": brick_wall_chart, "cost_vs_batch.png": cost_vs_batch_chart,
          "expert_coverage.png": coverage_chart}


def write_charts(out: str | Path) -> list[Path]:
    """Render every chart into `out` (created if needed); returns the paths written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a directory for the charts")
    paths = []
    for name, draw in CHARTS.items():
        draw(out / name)
        paths.append(out / name)
    return paths


__all__ = ["CHARTS", "write_charts"]
