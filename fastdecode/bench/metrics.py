"""From result rows to summaries: per method × category (and group, and overall) as DESIGN.md defines them.

- tokens/s = total new tokens ÷ total generation time over the prompts counted: wall time with prefill
  included, less the one-time CUDA-graph capture and compilation that fell inside it (`capture_s`, which
  is summed and reported separately, as issue 5 asks);
- speedup = that figure ÷ `ar`'s over the *same* prompts (both without error), plus the median of the
  per-prompt ratios;
- MAT = new tokens ÷ steps; acceptance rate = accepted ÷ drafted; exact-match rate over the compared rows;
- `fails`: rows of a lossless method that diverge from `ar` for a reason other than a numeric tie;
- quality against `ar` (what a lossy method costs): token agreement (the share of `ar`'s tokens the method has
  at the same position) and ROUGE-L F1 over token ids, each a mean over prompts.

Pure arithmetic on rows (plain dicts, as results.jsonl holds them): nothing here runs or times anything.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from fastdecode.bench.runner import REFERENCE
from fastdecode.bench.workloads import MULTI_TURN

OVERALL = "overall"

Row = dict[str, Any]


def _ok(row: Row) -> bool:
    return row.get("error") is None and bool(row.get("wall_s"))


def gen_seconds(row: Row) -> float:
    """The time a row's generation took: its wall time less one-time graph capture inside it."""
    return float(row["wall_s"]) - float(row.get("capture_s") or 0.0)


def _rate(num: float, den: float, digits: int = 4) -> float | None:
    return round(num / den, digits) if den else None


def method_stats(rows: Sequence[Row], reference: dict[str, Row]) -> dict[str, Any]:
    """The figures of one method over some prompts; `reference` maps prompt id -> `ar`'s row."""
    ok = [r for r in rows if _ok(r)]
    paired = [(r, reference[r["prompt_id"]]) for r in ok if r["prompt_id"] in reference and _ok(reference[r["prompt_id"]])]
    new = sum(r["new_tokens"] for r in ok)
    wall = sum(gen_seconds(r) for r in ok)
    steps = sum(r.get("steps") or 0 for r in ok)
    drafted = sum(r.get("drafted") or 0 for r in ok)
    compared = [r for r in ok if r.get("exact") is not None]
    ties = [r for r in compared if r["divergence"] and r["divergence"].get("tie")]
    kind = rows[0]["kind"] if rows else "method"
    return {
        "kind": kind,
        "lossless": bool(rows and rows[0].get("lossless")),
        "prompts": len(rows),
        "errors": len(rows) - len(ok),
        "new_tokens": new,
        "wall_s": round(wall, 4),
        "tokens_per_s": _rate(new, wall, 3),
        "capture_s": round(sum(r.get("capture_s") or 0.0 for r in ok), 4),
        "prefill_s_mean": _rate(sum(r.get("prefill_s") or 0.0 for r in ok), len(ok), 6) if kind == "method" else None,
        "speedup": speedup(paired),
        "median_speedup": median_speedup(paired),
        "mat": _rate(new, steps) if kind == "method" else None,
        "acceptance_rate": _rate(sum(r.get("accepted") or 0 for r in ok), drafted) if kind == "method" else None,
        "exact_match": _rate(sum(1 for r in compared if r["exact"]), len(compared)),
        # the quality cost of a lossy method (1.0 for an exact one): means over prompts, against `ar`'s tokens
        "token_agreement": _mean([token_agreement(_ids(a), _ids(r)) for r, a in paired]),
        "rouge_l": _mean([rouge_l(_ids(a), _ids(r)) for r, a in paired]),
        "ties": len(ties),
        "fails": sum(1 for r in compared if r.get("flag")),
    }


def _ids(row: Row) -> list[int]:
    return [t for turn in row.get("token_ids") or [] for t in turn]


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> float:
    """The share of the reference's tokens that `other` has at the same position."""
    if not reference:
        return 1.0 if not other else 0.0
    return sum(1 for a, b in zip(reference, other, strict=False) if a == b) / len(reference)


def rouge_l(reference: Sequence[int], other: Sequence[int]) -> float:
    """ROUGE-L F1 over token ids: the longest common subsequence against both lengths (Lin, 2004)."""
    if not reference or not other:
        return float(list(reference) == list(other))
    prev = [0] * (len(other) + 1)
    for a in reference:
        cur = [0]
        for j, b in enumerate(other):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    precision, recall = lcs / len(other), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def speedup(paired: Sequence[tuple[Row, Row]]) -> float | None:
    """(Σ tokens ÷ Σ time) of the method over (Σ tokens ÷ Σ time) of ar, on the same prompts."""
    new = sum(r["new_tokens"] for r, _ in paired)
    wall = sum(gen_seconds(r) for r, _ in paired)
    ref_new = sum(a["new_tokens"] for _, a in paired)
    ref_wall = sum(gen_seconds(a) for _, a in paired)
    if not (new and wall and ref_new and ref_wall):
        return None
    return round((new / wall) / (ref_new / ref_wall), 4)


def median_speedup(paired: Sequence[tuple[Row, Row]]) -> float | None:
    ratios = [
        (r["new_tokens"] / gen_seconds(r)) / (a["new_tokens"] / gen_seconds(a))
        for r, a in paired
        if r["new_tokens"] and a["new_tokens"] and gen_seconds(r) > 0 and gen_seconds(a) > 0
    ]
    return round(statistics.median(ratios), 4) if ratios else None


def accepted_distribution(rows: Iterable[Row]) -> list[int]:
    """Steps that accepted k draft tokens, summed over rows (index k)."""
    total: list[int] = []
    for r in rows:
        for k, n in enumerate(r.get("accepted_hist") or []):
            while len(total) <= k:
                total.append(0)
            total[k] += n
    return total


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """Summary of a run: per method overall, per group (Spec-Bench's columns) and per category."""
    methods = _ordered(r["method"] for r in rows)
    reference = {r["prompt_id"]: r for r in rows if r["method"] == REFERENCE}
    groups = _ordered(r["group"] for r in rows)
    categories = _ordered(r["category"] for r in rows)

    def table(key: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {
            name: {m: method_stats([r for r in rows if r[key] == name and r["method"] == m], reference) for m in methods}
            for name in names
        }

    overall = {m: method_stats([r for r in rows if r["method"] == m], reference) for m in methods}
    for m in methods:
        overall[m]["accepted_per_step"] = accepted_distribution(r for r in rows if r["method"] == m and _ok(r))
    return {
        "methods": methods,
        "groups": groups,
        "categories": categories,
        "multi_turn_group": MULTI_TURN if MULTI_TURN in groups else None,
        OVERALL: overall,
        "by_group": table("group", groups),
        "by_category": table("category", categories),
        "divergences": divergences(rows),
        "errors": [{"prompt_id": r["prompt_id"], "method": r["method"], "error": r["error"]} for r in rows if r.get("error")],
    }


def divergences(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """Every row that differs from ar, with the figures the tie rule used."""
    out = []
    for r in rows:
        if r.get("exact") is False:
            d = r["divergence"] or {}
            out.append({"prompt_id": r["prompt_id"], "method": r["method"], "kind": r["kind"], "flag": r.get("flag", False), **d})
    return out


def capture_seconds(summary: dict[str, Any]) -> float:
    """CUDA-graph capture that happened inside timed generations (a longer warm-up would move it out)."""
    return round(sum(s.get("capture_s") or 0.0 for s in summary[OVERALL].values()), 4)


def failing_methods(summary: dict[str, Any]) -> list[str]:
    """Lossless methods with at least one non-tie divergence."""
    return [m for m, s in summary[OVERALL].items() if s["fails"]]
