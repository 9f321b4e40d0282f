"""`fastdecode demo`: a short side-by-side of `ar` and another method on a few Spec-Bench prompts,
showing that the text is identical and how much faster it came. Not a benchmark (`fastdecode bench` is)."""

from __future__ import annotations

from dataclasses import dataclass

from fastdecode.api import Generator
from fastdecode.data import spec_bench_questions
from fastdecode.exactness import first_divergence

DEMO_CATEGORIES = ("summarization", "rag", "writing")


@dataclass(frozen=True)
class DemoRow:
    category: str
    new_tokens: int
    ar_tokens_per_s: float
    method_tokens_per_s: float
    mat: float
    identical: bool
    text: str
    tie: bool = False  # not identical, and the first difference is a numeric tie (only where forwards are not row-invariant)

    @property
    def speedup(self) -> float:
        return self.method_tokens_per_s / self.ar_tokens_per_s if self.ar_tokens_per_s else 0.0


def demo_prompts(categories: tuple[str, ...] = DEMO_CATEGORIES) -> list[tuple[str, str]]:
    """The first question of each category: (category, first turn)."""
    first: dict[str, str] = {}
    for q in spec_bench_questions():
        first.setdefault(q["category"], q["turns"][0])
    return [(c, first[c]) for c in categories if c in first]


def run_demo(gen: Generator, method: str, max_new_tokens: int) -> list[DemoRow]:
    gen.generate("Hello", method="ar", max_new_tokens=4)  # warm-up
    rows = []
    for category, prompt in demo_prompts():
        # top logits only where a difference would be judged by the tie rule (not row-invariant forwards)
        k = 0 if gen.row_invariant else 8
        ar = gen.generate(prompt, method="ar", max_new_tokens=max_new_tokens, top_logits=k)
        other = gen.generate(prompt, method=method, max_new_tokens=max_new_tokens, top_logits=k)
        div = first_divergence(ar.token_ids, other.token_ids, ar.stats.top_logits, other.stats.top_logits)
        rows.append(
            DemoRow(
                category,
                other.stats.new_tokens,
                ar.stats.tokens_per_s,
                other.stats.tokens_per_s,
                other.stats.mat,
                div is None,
                other.text,
                tie=div is not None and div.tie and not gen.row_invariant,
            )
        )
    return rows
