"""Data shipped with fastdecode (the Spec-Bench prompts) and loaders for workloads from PyPI packages."""

from __future__ import annotations

import json
from importlib import resources


def spec_bench_questions() -> list[dict]:
    """The 480 Spec-Bench questions in file order: question_id, category, turns."""
    text = resources.files("fastdecode.data").joinpath("spec_bench/question.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def spec_bench_subset(per_category: int) -> list[dict]:
    """The first `per_category` questions of each category, in file order."""
    seen: dict[str, int] = {}
    out = []
    for q in spec_bench_questions():
        if seen.get(q["category"], 0) < per_category:
            seen[q["category"]] = seen.get(q["category"], 0) + 1
            out.append(q)
    return out
