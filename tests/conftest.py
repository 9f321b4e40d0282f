"""Shared fixtures and helpers for the test suite.

Two kinds of model:
- tiny random Llama models built from a `ModelConfig` (no checkpoint): shapes, masks, the cache, the
  verifier and the sampling distributions. Fast; run on one thread (they are too small to gain from two).
- the embedded SmolLM2 (fp32), loaded once per session, for end-to-end behaviour and greedy
  losslessness. Tests that use it are marked `slow`; the `ar` references are computed once per session.

The numeric-tie rule of DESIGN.md lives in `fastdecode.exactness`; `report_divergence` prints both of its
figures so that a passing tie is visible in the test log (`pytest -s` or `-rP`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from fastdecode.drafters import make_drafter
from fastdecode.engine import Engine, GenerationStats, StopConditions
from fastdecode.exactness import Divergence, first_divergence
from fastdecode.models.llama import LlamaModel, ModelConfig
from fastdecode.sampling import SamplingParams, target_probs

NEW_TOKENS = 64  # new tokens per prompt in the greedy losslessness tests (issue 2)

SMOLLM2_LAYERS = "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,29"  # layerskip without calibrating
# every lossless method and option set the bit-exactness tests run: variant -> (method, options)
LOSSLESS_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
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


# ------------------------------------------------------------------ threads


@pytest.fixture(autouse=True)
def _threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models run on one thread: a second thread only adds synchronisation (and suffers most when
    the machine is shared). Tests on the real model keep torch's default."""
    before = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ tiny random models


def tiny_config(**overrides: Any) -> ModelConfig:
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 kv heads) and a small vocabulary."""
    base: dict[str, Any] = dict(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position=256,
    )
    base.update(overrides)
    return ModelConfig(**base)


def make_tiny_model(cfg: ModelConfig | None = None, seed: int = 0, logit_scale: float = 4.0) -> LlamaModel:
    """Random weights (torch's default init), fp32. `logit_scale` multiplies lm_head so that the next-token
    distributions are peaked (max probability often 0.3-0.9 with a vocabulary of 16): peaked enough that
    drafts get accepted, spread enough that every step is a real sampling decision."""
    torch.manual_seed(seed)
    model = LlamaModel(cfg or tiny_config()).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> LlamaModel:
    return make_tiny_model()


def forward_logits(model: LlamaModel, ids: Sequence[int]) -> torch.Tensor:
    """Logits (T, V) of one plain causal forward over `ids` from an empty cache."""
    cache = model.new_cache(batch=1, length=len(ids))
    with torch.inference_mode():
        logits, _ = model(torch.tensor([list(ids)]), torch.arange(len(ids))[None], cache)
    return logits[0]


def exact_joint(model: LlamaModel, prompt: Sequence[int], depth: int, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """The target's exact probability of every continuation of `depth` tokens (after temperature / top-k /
    top-p), from one full forward per prefix. Continuations of probability 0 are left out."""
    out: dict[tuple[int, ...], float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped fixtures call this before the per-test thread setting

    def walk(prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == depth:
            out[prefix] = prob
            return
        p = target_probs(forward_logits(model, [*prompt, *prefix])[-1], params).double()
        for tok in torch.nonzero(p > 0).flatten().tolist():
            walk((*prefix, tok), prob * float(p[tok]))

    try:
        walk((), 1.0)
    finally:
        torch.set_num_threads(threads)
    return out


def run_engine(
    model: LlamaModel,
    prompt: Sequence[int],
    method: str,
    params: SamplingParams,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode: Any = None,
    engine: Engine | None = None,
    drafter: Any = None,
    **options: Any,
) -> tuple[list[int], GenerationStats]:
    """Run `Engine.generate` directly (no tokenizer): returns the emitted token ids and the stats."""
    engine = engine or Engine(model)
    drafter = drafter or make_drafter(method, **options)
    cond = StopConditions(max_new_tokens, frozenset(eos_ids), tuple(stop_strings), decode)
    stats = GenerationStats()
    out: list[int] = []
    for piece in engine.generate(list(prompt), drafter, params, cond, stats):
        out.extend(piece)
    return out, stats


def recording(cls: type) -> type:
    """A subclass of the drafter class `cls` whose `seen` lists, per step that drafted, the committed tokens
    followed by the first drafted token."""

    class Recording(cls):  # type: ignore[misc,valid-type]
        name = f"_{cls.name}_recording"

        def __init__(self, options: Any):
            super().__init__(options)
            self.seen: list[list[int]] = []

        def propose(self, ctx: Any) -> Any:
            p = super().propose(ctx)
            if p.tokens:
                self.seen.append([*ctx.tokens, p.tokens[0]])
            return p

    return Recording


def sample_joint(model: LlamaModel, prompt: Sequence[int], method: str, drafter: Any, depth: int = 4, runs: int = 1500,
                 ) -> tuple[float, int, int]:
    """Rejection sampling (temperature 1, top-k 4) of the first `depth` tokens after `prompt`, over `runs` seeds
    with one drafter, against the target's exact joint: (chi-square p-value, draft nodes, accepted)."""
    base = SamplingParams(temperature=1.0, top_k=4, sampler="rejection")
    exact = exact_joint(model, prompt, depth, base)
    engine = Engine(model)
    counts: Counter[tuple[int, ...]] = Counter()
    drafted = accepted = 0
    for seed in range(runs):
        out, stats = run_engine(model, prompt, method, replace(base, seed=seed), depth, engine=engine, drafter=drafter)
        counts[tuple(out)] += 1
        drafted += stats.drafted
        accepted += stats.accepted
    stat, p, cells = pooled_chisquare(counts, exact)
    print(f"\n[{method}] chi-square {stat:.1f} over {cells} cells, p = {p:.3g}, {drafted / runs:.2f} draft nodes and "
          f"{accepted / runs:.2f} accepted per run")
    return p, drafted, accepted


# ------------------------------------------------------------------ statistics


def pooled_chisquare(counts: dict[Any, int], probs: dict[Any, float], min_expected: float = 5.0) -> tuple[float, float, int]:
    """Chi-square goodness of fit of observed `counts` against exact `probs` (which sum to 1).

    Cells whose expected count is below `min_expected` are pooled into one cell (and that pool, if still
    too small, into the smallest regular cell). An observation outside the support of `probs` is an
    impossible outcome: the p-value is 0. Returns (statistic, p-value, number of cells).
    """
    from scipy.stats import chisquare

    n = sum(counts.values())
    if any(k not in probs or probs[k] <= 0 for k, c in counts.items() if c > 0):
        return float("inf"), 0.0, 0
    keys = sorted(probs, key=lambda k: -probs[k])
    obs, exp = [], []
    pool_o, pool_e = 0.0, 0.0
    for k in keys:
        e = probs[k] * n
        if e >= min_expected:
            obs.append(counts.get(k, 0))
            exp.append(e)
        else:
            pool_o += counts.get(k, 0)
            pool_e += e
    if pool_e > 0:
        if pool_e >= min_expected or not exp:
            obs.append(pool_o)
            exp.append(pool_e)
        else:
            obs[-1] += pool_o
            exp[-1] += pool_e
    if len(obs) < 2:
        return 0.0, 1.0, len(obs)
    exp_arr = np.array(exp) * (n / sum(exp))  # exact probabilities may miss 1 by rounding
    stat, p = chisquare(np.array(obs, dtype=float), exp_arr)
    return float(stat), float(p), len(obs)


# ------------------------------------------------------------------ the real model


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The embedded SmolLM2-135M-Instruct in fp32 on the CPU, loaded once per session."""
    import fastdecode

    return fastdecode.load("smollm2", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def spec_prompts() -> list[dict]:
    """The 26 Spec-Bench prompts of issue 2: the first two of each category in file order."""
    from fastdecode.data import spec_bench_subset

    return spec_bench_subset(2)


def prompt_text(question: dict) -> str:
    return question["turns"][0]


class References:
    """Greedy `ar` outputs (64 new tokens, top-16 logits per token), computed on first use, once per session."""

    def __init__(self, gen: Any, questions: list[dict]):
        self.gen, self.questions = gen, questions
        self._done: dict[int, Any] = {}

    def __getitem__(self, i: int) -> Any:
        if i not in self._done:
            self._done[i] = self.gen.generate(prompt_text(self.questions[i]), "ar", max_new_tokens=NEW_TOKENS, top_logits=16)
        return self._done[i]


@pytest.fixture(scope="session")
def ar_refs(smollm2: Any, spec_prompts: list[dict]) -> References:
    return References(smollm2, spec_prompts)


@pytest.fixture(scope="session")
def smollm2_bf16() -> Any:
    """The embedded SmolLM2 in bf16 on the CPU: what `--dtype auto` runs where the CPU multiplies bf16
    natively. Skipped elsewhere: there bf16 is emulated, slow, and not what a user runs."""
    import fastdecode
    from fastdecode.api import cpu_has_fast_bf16

    if not cpu_has_fast_bf16():
        pytest.skip("this CPU has no AVX-512-BF16/AMX: --dtype auto runs fp32 here (tested bit for bit in fp32)")
    return fastdecode.load("smollm2", device="cpu", dtype="bf16")


@pytest.fixture(scope="session")
def ar_refs_bf16(smollm2_bf16: Any, spec_prompts: list[dict]) -> References:
    return References(smollm2_bf16, spec_prompts)


def report_divergence(label: str, reference: Any, other: Any) -> Divergence | None:
    """Compare two greedy Generations of one prompt; print the first divergence with DESIGN.md's two
    figures (the reference's logit gap between the two choices, and the max |Δlogit| between the paths).
    Returns None when the token ids are identical."""
    div = first_divergence(reference.token_ids, other.token_ids, reference.stats.top_logits, other.stats.top_logits)
    if div is None:
        return None
    print(
        f"\n[{label}] first divergence at new token {div.position}: reference {div.reference_token} vs {div.other_token}; "
        f"reference gap {div.gap} (top-2 gap {div.top2_gap}) vs max |Δlogit| {div.logit_diff} -> "
        f"{'numeric tie' if div.tie else 'NOT a tie'}"
    )
    return div


def assert_lossless(label: str, reference: Any, other: Any, exact: bool = False) -> None:
    """Token-identical, or (where the forwards are not row-invariant: not `exact`) the first divergence is a
    numeric tie by DESIGN.md's rule."""
    div = report_divergence(label, reference, other)
    assert div is None or (div.tie and not exact), (
        f"{label}: differs from ar at new token {div.position} ({div.reference_token} vs {div.other_token}) "
        f"and it is not a numeric tie: gap {div.gap} >= max |Δlogit| {div.logit_diff}"
    )
