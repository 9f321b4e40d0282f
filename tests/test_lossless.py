"""Greedy losslessness on the real SmolLM2 (fp32): every lossless method returns `ar`'s tokens.

Invariant (DESIGN.md, "How we know a method is lossless", 1): on the 26 Spec-Bench prompts of issue 2
(first two per category, first turn, chat template, 64 new tokens) `pld` is token-identical to `ar`.
fp32 forwards on the CPU are row-invariant (`Generator.row_invariant`), so no divergence passes; the
numeric-tie allowance (at the first differing position, the reference's logit gap is below max |Δlogit|
between the two paths' recorded logits; both figures printed) applies only where they are not, as with
FASTDECODE_ROW_INVARIANT=0. `_self` and `_random-tree` on a subset likewise; `_self` accepts every draft.
The `ar` references are computed once per session (conftest.ar_refs).
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import NEW_TOKENS, assert_lossless, prompt_text

from fastdecode.exactness import max_logit_difference

pytestmark = pytest.mark.slow

ALL = list(range(26))
SELF_SUBSET = [0, 8, 18, 25]  # writing, coding, summarization, rag
TREE_SUBSET = [2, 12, 21]  # roleplay, stem, qa


def _run(smollm2: Any, spec_prompts: list[dict], i: int, method: str, **options: Any) -> Any:
    return smollm2.generate(prompt_text(spec_prompts[i]), method, max_new_tokens=NEW_TOKENS, top_logits=16, **options)


def test_subset_is_the_issues(spec_prompts: list[dict]) -> None:
    """26 prompts: the first two of each of the 13 Spec-Bench categories, in file order."""
    cats = [q["category"] for q in spec_prompts]
    assert len(spec_prompts) == 26 and len(set(cats)) == 13
    assert all(cats.count(c) == 2 for c in cats)


@pytest.mark.parametrize("i", ALL)
def test_pld_equals_ar(smollm2: Any, ar_refs: Any, spec_prompts: list[dict], i: int) -> None:
    """`pld` (default options) is token-identical to `ar`, or diverges first at a numeric tie."""
    ref = ar_refs[i]
    out = _run(smollm2, spec_prompts, i, "pld")
    assert_lossless(f"pld, prompt {i} ({spec_prompts[i]['category']})", ref, out, exact=smollm2.row_invariant)
    assert out.stats.new_tokens == len(out.token_ids)
    if out.token_ids == ref.token_ids:
        assert out.text == ref.text and out.finish_reason == ref.finish_reason


@pytest.mark.parametrize("i", [18, 19, 24, 25])
def test_pld_tree_equals_ar(smollm2: Any, ar_refs: Any, spec_prompts: list[dict], i: int) -> None:
    """`pld` with several matches merged into a tree (branches=3): still `ar`'s tokens."""
    out = _run(smollm2, spec_prompts, i, "pld", branches=3)
    assert_lossless(f"pld branches=3, prompt {i}", ar_refs[i], out, exact=smollm2.row_invariant)


@pytest.mark.parametrize("i", TREE_SUBSET)
def test_random_tree_equals_ar(smollm2: Any, ar_refs: Any, spec_prompts: list[dict], i: int) -> None:
    """`_random-tree` (random tree shapes, positions and compactions every step) returns `ar`'s tokens."""
    out = _run(smollm2, spec_prompts, i, "_random-tree")
    assert_lossless(f"_random-tree, prompt {i}", ar_refs[i], out, exact=smollm2.row_invariant)
    assert out.stats.drafted > 0


@pytest.mark.parametrize("i", SELF_SUBSET)
def test_self_equals_ar_and_accepts_every_draft(smollm2: Any, ar_refs: Any, spec_prompts: list[dict], i: int) -> None:
    """`_self` returns `ar`'s tokens and every draft is accepted. A rejection passes only as a numeric tie:
    at the rejected position, the verify row's top-2 gap is below max |Δlogit| between the verify row and
    `ar`'s width-1 row there (the drafter's own rows are width-1 forwards like `ar`'s)."""
    ref = ar_refs[i]
    out = _run(smollm2, spec_prompts, i, "_self")
    assert_lossless(f"_self, prompt {i}", ref, out, exact=smollm2.row_invariant)
    s = out.stats
    assert s.drafted > 0
    if s.accepted == s.drafted:
        return
    pos = 0
    for step in s.trace:
        if step.accepted < step.rows - 1:
            bonus = pos + step.accepted  # the target's own token where the draft was rejected
            ids, values = out.stats.top_logits[bonus]
            gap = values[0] - values[1]
            diff = max_logit_difference(ref.stats.top_logits[bonus], out.stats.top_logits[bonus])
            print(f"\n_self, prompt {i}: draft rejected at new token {bonus}: top-2 gap {gap:.3g} vs max |Δlogit| {diff}")
            assert not smollm2.row_invariant, f"_self rejected a draft at new token {bonus} with row-invariant forwards"
            assert diff is not None and gap < diff, f"_self rejected a draft at new token {bonus} without a numeric tie"
        pos += step.emitted
