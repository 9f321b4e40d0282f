"""PNG plots of a run's summary with matplotlib's Agg backend (no display needed):

- `speedup_by_category.png`: grouped bars, one group per category group (plus overall), one bar per
  method and peer, the `ar` line at 1×;
- `accepted_per_step.png`: for each method, the share of steps that accepted k draft tokens.

Only draws what the summary holds; never computes a metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastdecode.bench.metrics import OVERALL
from fastdecode.bench.runner import REFERENCE


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speedup_plot(summary: dict[str, Any], path: Path, title: str) -> Path:
    plt = _pyplot()
    columns = [*summary["groups"], OVERALL]
    methods = [m for m in summary["methods"] if m != REFERENCE]
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 1.1 * len(columns) * max(1, len(methods)) ** 0.5 + 2)), 5.0))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        values = [_speedup(summary, c, m) for c in columns]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(columns))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=m + (" (peer)" if summary[OVERALL][m]["kind"] == "peer" else ""))
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="ar = 1×")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=20, ha="right")
    ax.set_ylabel("speedup over ar (total tokens ÷ total time)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _speedup(summary: dict[str, Any], column: str, method: str) -> float | None:
    stats = summary[OVERALL] if column == OVERALL else summary["by_group"][column]
    return stats[method]["speedup"]


def accepted_plot(summary: dict[str, Any], path: Path, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    hists = {m: summary[OVERALL][m].get("accepted_per_step") or [] for m in summary["methods"] if m != REFERENCE}
    hists = {m: h for m, h in hists.items() if sum(h)}
    width = 0.8 / max(1, len(hists))
    for i, (m, hist) in enumerate(hists.items()):
        xs = [k + (i - (len(hists) - 1) / 2) * width for k in range(len(hist))]
        ax.bar(xs, [n / sum(hist) for n in hist], width, label=f"{m} (MAT {summary[OVERALL][m]['mat']:.2f})")
    ax.set_xlabel("draft tokens accepted in a step")
    ax.set_ylabel("share of steps")
    ax.set_title(title)
    if hists:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(summary: dict[str, Any], out_dir: Path, title: str) -> list[str]:
    return [
        str(speedup_plot(summary, out_dir / "speedup_by_category.png", f"Speedup by category: {title}")),
        str(accepted_plot(summary, out_dir / "accepted_per_step.png", f"Accepted draft tokens per step: {title}")),
    ]
