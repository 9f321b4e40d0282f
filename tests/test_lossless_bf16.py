"""Greedy losslessness on the CPU, bit for bit, in bf16 and fp32 (issue 10).

Invariant: with row-invariant forwards (tests/test_row_invariance.py) every lossless method returns
exactly `ar`'s tokens in the dtype a user runs — no numeric-tie allowance: the tie rule is for comparing
different engines or machines, not our own methods on one engine (DESIGN.md). SmolLM2, 64 new tokens,
first turns with the chat template. bf16 (what `--dtype auto` picks on a CPU with AVX-512-BF16 or AMX;
skipped on CPUs without): the 26 Spec-Bench prompts of issue 2 (first two per category). fp32 (what
`--dtype auto` picks on every other CPU): four of them for the trained drafters, on every CPU (the other
methods run bit-exact in fp32 in test_lossless.py, test_drafters.py and test_rsd.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import LOSSLESS_VARIANTS as METHODS
from conftest import NEW_TOKENS, prompt_text

from fastdecode.drafters import get_method, make_drafter, make_options

pytestmark = pytest.mark.slow

FP32_SUBSET = [0, 8, 18, 25]  # writing, coding, summarization, rag
# the trained drafters; the model-free ones run bit-exact in fp32 in test_lossless.py, test_drafters.py, test_rsd.py
FP32_VARIANTS = ["sps", "sps-lookup", "eagle", "medusa", "hydra"]


def _bitwise(gen: Any, refs: Any, spec_prompts: list[dict], indices: list[int], variant: str, label: str) -> None:
    method, options = METHODS[variant]
    if method == "auto":  # a fresh bandit: every arm gets pulled on these requests
        gen._drafters[("auto", make_options(get_method("auto"), options))] = make_drafter("auto", **options)
    differ, steps, tokens, drafted = [], 0, 0, 0
    for i in indices:
        q = spec_prompts[i]
        ref = refs[i]
        out = gen.generate(prompt_text(q), method, max_new_tokens=NEW_TOKENS, **options)
        if out.token_ids != ref.token_ids:
            at = next((k for k, (a, b) in enumerate(zip(ref.token_ids, out.token_ids, strict=False)) if a != b), None)
            differ.append(f"#{i} {q['category']} (first difference at new token {at})")
        steps += out.stats.steps
        tokens += out.stats.new_tokens
        drafted += out.stats.drafted
        if method == "_self":  # the target drafting for itself: every draft accepted, bit-equal rows
            assert out.stats.accepted == out.stats.drafted, f"_self rejected a draft on prompt {i}"
    print(f"\n[{variant}] {label} MAT {tokens / steps:.2f}, {drafted} drafted, over {len(indices)} prompts")
    assert not differ, f"{variant} in {label} differs from ar on {len(differ)}/{len(indices)} prompts: {differ}"
    if method != "auto":
        assert drafted > 0


@pytest.mark.parametrize("variant", list(METHODS))
def test_bitwise_identical_to_ar_in_bf16(variant: str, smollm2_bf16: Any, ar_refs_bf16: Any, spec_prompts: list[dict]) -> None:
    _bitwise(smollm2_bf16, ar_refs_bf16, spec_prompts, list(range(len(spec_prompts))), variant, "bf16")


@pytest.mark.parametrize("variant", FP32_VARIANTS)
def test_bitwise_identical_to_ar_in_fp32(variant: str, smollm2: Any, ar_refs: Any, spec_prompts: list[dict]) -> None:
    assert smollm2.row_invariant  # fp32 on any CPU: products of fixed tiles (models/llama.py)
    _bitwise(smollm2, ar_refs, spec_prompts, FP32_SUBSET, variant, "fp32")
