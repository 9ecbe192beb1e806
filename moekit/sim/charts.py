"""Charts of simulated runs (matplotlib, written atomically like moekit/plan/charts.py).

- `load_chart`: TTFT and TPOT p50/p90 and $ per 1k output tokens against the offered rate (a `--rate` sweep):
  where the latency knee is and how the price falls as utilization rises.
- `timeline_chart`: one run over time: offered load (output tokens/s), the pipeline's busy share and KV
  occupancy (a daily curve shows the idle night that doubles the price).
"""

from __future__ import annotations

from pathlib import Path

from moekit.plan.charts import _pyplot
from moekit.util import atomic_write


def _save(fig, path) -> None:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    _pyplot().close(fig)


def load_chart(runs: list[dict], path) -> None:
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rates = [r["offered_rate"] for r in runs]
    for key, style in (("median_ttft_ms", "o-"), ("p90_ttft_ms", "o--"), ("median_tpot_ms", "s-"),
                       ("p90_tpot_ms", "s--")):
        ax.plot(rates, [r[key] for r in runs], style, label=key.replace("_ms", "").replace("median", "p50"))
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("ms")
    ax.set_title("latency against load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    cost = [r["sim"].get("cost_per_1k_output") for r in runs]
    if all(c is not None for c in cost):
        ax2.plot(rates, cost, "o-", color="C3", label="$ per 1k output tokens")
        ax2.set_ylabel("$ per 1k output tokens")
    ax3 = ax2.twinx()
    ax3.plot(rates, [r["sim"]["busy"] for r in runs], "^--", color="C2", label="busy share")
    ax3.set_ylim(0, 1.05)
    ax3.set_ylabel("busy share of the stages")
    ax2.set_xlabel("offered load (requests/s)")
    ax2.set_title("cost and utilization against load")
    ax2.grid(True, alpha=0.3)
    fig.legend(loc="lower right")
    _save(fig, path)


def timeline_chart(runs: list[dict], path) -> None:
    plt = _pyplot()
    tl = runs[0]["sim"]["timeline"]
    hours = [t / 3600 for t in tl["t"]]
    span = tl["t"][-1] if tl["t"] else 0
    x, unit = (hours, "hours") if span > 3 * 3600 else ([t / 60 for t in tl["t"]], "minutes")
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(x, tl["output_tokens_per_s"], color="C0", label="output tokens/s")
    ax.set_xlabel(unit)
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(x, tl["busy"], color="C2", label="busy share")
    ax2.plot(x, tl["kv_occupancy"], color="C1", linestyle="--", label="KV occupancy (peak)")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("share")
    s = runs[0]["sim"]
    cost = f", ${s['cost_per_1k_output']:.4f} per 1k output" if "cost_per_1k_output" in s else ""
    ax.set_title(f"{s['gpus']} GPUs, busy {s['busy']:.0%} on average{cost}")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="upper right")
    _save(fig, path)
