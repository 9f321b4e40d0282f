"""Greedy losslessness in bf16 on the CPU, bit for bit (issue 10).

Invariant: with row-invariant forwards (tests/test_row_invariance.py) every lossless method returns
exactly `ar`'s tokens in the dtype a user runs — no numeric-tie allowance: the tie rule is for comparing
different engines or machines, not our own methods on one engine (DESIGN.md). The 26 Spec-Bench prompts
of issue 2 (first two per category, first turn, chat template), 64 new tokens, SmolLM2 in bf16, which is
what `--dtype auto` picks on a CPU with AVX-512-BF16 or AMX (skipped on CPUs without: they run fp32).
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import NEW_TOKENS, prompt_text

from fastdecode.drafters import get_method, make_drafter, make_options

pytestmark = pytest.mark.slow

SMOLLM2_LAYERS = "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,29"  # layerskip without calibrating
METHODS: dict[str, tuple[str, dict[str, Any]]] = {  # variant -> (method, options)
    "pld": ("pld", {}),
    "pld-tree": ("pld", {"branches": 3}),
    "ngram": ("ngram", {}),
    "lookahead": ("lookahead", {}),
    "layerskip": ("layerskip", {"layers": SMOLLM2_LAYERS}),
    "auto": ("auto", {"arms": ("pld", "ngram", "lookahead", "ar")}),
    "sps": ("sps", {}),  # the draft model shipped for SmolLM2
    "sps-lookup": ("sps", {"lookup": 8}),
    "eagle": ("eagle", {}),  # the EAGLE drafter shipped for SmolLM2: a tree (greedy)
    "medusa": ("medusa", {}),  # the Medusa heads shipped for SmolLM2: a tree
    "hydra": ("hydra", {}),  # the Hydra heads shipped for SmolLM2: a tree drafted level by level
    "rsd": ("rsd", {}),  # the sps draft model shipped for SmolLM2, drafting a tree (3, 2, 2, 1, 1, 1)
    "_random-tree": ("_random-tree", {}),
    "_self": ("_self", {}),
}


@pytest.mark.parametrize("variant", list(METHODS))
def test_bitwise_identical_to_ar_in_bf16(variant: str, smollm2_bf16: Any, ar_refs_bf16: Any, spec_prompts: list[dict]) -> None:
    method, options = METHODS[variant]
    if method == "auto":  # a fresh bandit: every arm gets pulled on these 26 requests
        smollm2_bf16._drafters[("auto", make_options(get_method("auto"), options))] = make_drafter("auto", **options)
    differ, steps, tokens, drafted = [], 0, 0, 0
    for i, q in enumerate(spec_prompts):
        ref = ar_refs_bf16[i]
        out = smollm2_bf16.generate(prompt_text(q), method, max_new_tokens=NEW_TOKENS, **options)
        if out.token_ids != ref.token_ids:
            at = next((k for k, (a, b) in enumerate(zip(ref.token_ids, out.token_ids, strict=False)) if a != b), None)
            differ.append(f"#{i} {q['category']} (first difference at new token {at})")
        steps += out.stats.steps
        tokens += out.stats.new_tokens
        drafted += out.stats.drafted
        if method == "_self":  # the target drafting for itself: every draft accepted, bit-equal rows
            assert out.stats.accepted == out.stats.drafted, f"_self rejected a draft on prompt {i}"
    print(f"\n[{variant}] bf16 MAT {tokens / steps:.2f}, {drafted} drafted, over {len(spec_prompts)} prompts")
    assert not differ, f"{variant} in bf16 differs from ar on {len(differ)}/{len(spec_prompts)} prompts: {differ}"
    if method != "auto":
        assert drafted > 0
