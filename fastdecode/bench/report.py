"""Render a run's summary: summary.json, report.md and the table printed in the terminal.

report.md holds the method × group table of speedup, MAT and exact-match, per-method and per-category
tables, every divergence with the figures the tie rule used, errors, the machine line and the command.
A lossless method that diverges for a reason other than a numeric tie is marked **FAIL** here and red in
the terminal. This module only formats numbers it is given; it never computes a metric (metrics.py does).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from fastdecode.bench.metrics import OVERALL, capture_seconds, failing_methods

RED, BOLD, RESET = "\033[31m", "\033[1m", "\033[0m"


def _num(x: float | None, fmt: str = "{:.2f}", suffix: str = "") -> str:
    return "–" if x is None else fmt.format(x) + suffix


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _exact(s: dict[str, Any]) -> str:
    text = _pct(s["exact_match"])
    if s["ties"]:
        text += f" ({s['ties']} tie{'s' if s['ties'] > 1 else ''})"
    if s["fails"]:
        text += f" **FAIL** ×{s['fails']}"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def machine_line(provenance: dict[str, Any], date: str) -> str:
    p = provenance
    return (
        f"{p.get('machine')} ({p.get('device')}, {p.get('threads')} threads), dtype {p.get('dtype')}, torch {p.get('torch')}, "
        f"fastdecode {p.get('fastdecode')} @ {p.get('commit')}, {date}"
        + (f", row-invariant forwards: {p['row_invariant']}" if "row_invariant" in p else "")
    )


def group_table(summary: dict[str, Any]) -> list[str]:
    """Spec-Bench's layout: speedup per group, then MAT and exact-match overall."""
    groups = summary["groups"]
    header = ["method", *groups, OVERALL, "median per prompt", "MAT", "exact match"]
    rows = []
    for m in summary["methods"]:
        o = summary[OVERALL][m]
        cells = [_num(summary["by_group"][g][m]["speedup"], suffix="×") for g in groups]
        overall = [_num(o["speedup"], suffix="×"), _num(o["median_speedup"], suffix="×"), _num(o["mat"]), _exact(o)]
        rows.append([_label(m, o), *cells, *overall])
    return _table(header, rows)


def _label(method: str, s: dict[str, Any]) -> str:
    tags = [] if s["kind"] == "method" else ["peer"]
    if s["kind"] == "method":
        tags.append("lossless" if s["lossless"] else "lossy")
    return f"{method} ({', '.join(tags)})"


def method_table(summary: dict[str, Any]) -> list[str]:
    header = ["method", "prompts", "tokens/s", "speedup", "median", "MAT", "acceptance", "prefill ms", "exact match",
              "token agreement", "ROUGE-L", "errors"]
    rows = []
    for m in summary["methods"]:
        s = summary[OVERALL][m]
        rows.append([
            _label(m, s), str(s["prompts"]), _num(s["tokens_per_s"], "{:.1f}"), _num(s["speedup"], suffix="×"),
            _num(s["median_speedup"], suffix="×"), _num(s["mat"]), _pct(s["acceptance_rate"]),
            _num(None if s["prefill_s_mean"] is None else 1e3 * s["prefill_s_mean"], "{:.0f}"), _exact(s),
            _pct(s.get("token_agreement")), _num(s.get("rouge_l"), "{:.3f}"), str(s["errors"]),
        ])
    return _table(header, rows)


def category_table(summary: dict[str, Any]) -> list[str]:
    header = ["category", "method", "prompts", "tokens/s", "speedup", "median", "MAT", "acceptance", "exact match"]
    rows = []
    for c in summary["categories"]:
        for m in summary["methods"]:
            s = summary["by_category"][c][m]
            if not s["prompts"]:
                continue
            rows.append([
                c, m, str(s["prompts"]), _num(s["tokens_per_s"], "{:.1f}"), _num(s["speedup"], suffix="×"),
                _num(s["median_speedup"], suffix="×"), _num(s["mat"]), _pct(s["acceptance_rate"]), _exact(s),
            ])
    return _table(header, rows)


def divergence_table(summary: dict[str, Any]) -> list[str]:
    header = ["prompt", "method", "turn", "position", "tokens (ar / method)", "top-2 gap", "gap", "max |Δlogit|", "verdict"]
    rows = []
    for d in summary["divergences"]:
        verdict = _verdict(d)
        rows.append([
            str(d["prompt_id"]), d["method"], str(d.get("turn", "–")), str(d.get("position", "–")),
            f"{d.get('reference_token')} / {d.get('other_token')}", _num(d.get("top2_gap"), "{:.3g}"), _num(d.get("gap"), "{:.3g}"),
            _num(d.get("logit_diff"), "{:.3g}"), verdict,
        ])
    return _table(header, rows)


def _verdict(d: dict[str, Any]) -> str:
    if d.get("flag"):
        return "**FAIL**"
    if d.get("tie"):
        return "numeric tie"
    return "differs (peer)" if d["kind"] == "peer" else "differs"


def render_markdown(summary: dict[str, Any], meta: dict[str, Any], plots: Sequence[str]) -> str:
    setup = meta["setup"]
    sampler = f", sampler {setup['sampler']}" if setup.get("sampler") else ""  # recorded when not the default (gumbel)
    lines = [
        f"# fastdecode bench: {setup.get('workload')}",
        "",
        f"- machine: {machine_line(meta['provenance'], meta['date'])}",
        f"- command: `{meta['command']}`",
        *([f"- summarized from its rows by: `{meta['report_command']}`"] if meta.get("report_command") else []),
        f"- model {setup.get('model')}, prompts: {meta['prompts']}, max_new_tokens {setup.get('max_new_tokens')}, "
        f"temperature {setup.get('temperature')}{sampler}, warm-up {meta.get('warmup', '?')} generation(s) per method",
        "- speedup = (total new tokens ÷ total wall time, prefill included, one-time graph capture excluded) ÷ the same for "
        "`ar` over the same prompts; "
        "methods interleaved per prompt. CPU figures are ratios; absolute times are trusted from the GPU only.",
    ]
    rejection = setup.get("sampler") == "rejection"
    if rejection:
        lines += ["- sampler rejection: speculative sampling keeps the target's distribution, not its draws, so the texts "
                  "differ from `ar`'s by design; exact match is no test of losslessness here (the chi-square tests are)"]
    captured = capture_seconds(summary)
    if captured:
        lines += [f"- {captured:.1f} s of one-time CUDA-graph capture fell inside generations: not counted as their time"]
    fails = failing_methods(summary)
    if fails:
        lines += ["", f"**FAIL**: lossless method(s) diverging from `ar` beyond a numeric tie: {', '.join(fails)}"]
    lines += ["", "## Speedup over `ar` by category group", "", *group_table(summary)]
    lines += ["", "## Per method (all prompts)", "", *method_table(summary)]
    lines += ["", "## Per category", "", *category_table(summary)]
    if summary["divergences"] and not rejection:
        lines += [
            "", "## Divergences from `ar`", "",
            "A lossless method's divergence is a numeric tie only where the reference's gap between the two tokens "
            "is smaller than the largest logit difference between the two paths at that position (DESIGN.md).", "",
            *divergence_table(summary),
        ]
    if summary["errors"]:
        errors = [[e["prompt_id"], e["method"], e["error"]] for e in summary["errors"]]
        lines += ["", "## Errors", "", *_table(["prompt", "method", "error"], errors)]
    if plots:
        lines += ["", "## Plots", "", *[f"![{Path(p).stem}]({Path(p).name})" for p in plots]]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, summary: dict[str, Any], meta: dict[str, Any], plots: Sequence[str]) -> None:
    (out_dir / "summary.json").write_text(json.dumps({"meta": meta, **summary}, indent=1) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(summary, meta, plots), encoding="utf-8")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def print_table(summary: dict[str, Any], stream: TextIO = sys.stdout) -> None:
    """The per-method summary in the terminal; a failing lossless method in red (when the terminal has colour)."""
    colour = stream.isatty()
    groups = summary["groups"]
    lossy = any(not summary[OVERALL][m]["lossless"] and summary[OVERALL][m]["kind"] == "method" for m in summary["methods"])
    header = ["method", *groups, OVERALL, "MAT", "exact", *(["agreement", "ROUGE-L"] if lossy else [])]
    rows = []
    for m in summary["methods"]:
        o = summary[OVERALL][m]
        exact = _exact(o).replace("**", "")
        cells = [_num(summary["by_group"][g][m]["speedup"], suffix="x") for g in groups]
        quality = [_pct(o.get("token_agreement")), _num(o.get("rouge_l"), "{:.3f}")] if lossy else []
        rows.append([m, *cells, _num(o["speedup"], suffix="x"), _num(o["mat"]), exact, *quality])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    print(fmt(header), file=stream)
    for m, row in zip(summary["methods"], rows, strict=True):
        line = fmt(row)
        if summary[OVERALL][m]["fails"]:
            line = f"{RED}{BOLD}{line}{RESET}" if colour else line + "  <- FAIL"
        print(line, file=stream)
