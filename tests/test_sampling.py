"""The target's sampling distribution (temperature -> top-k -> top-p, one function for every path) and the
seeded Gumbel noise that makes sampling drafter-invariant (a pure function of seed, position and token)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import pooled_chisquare

from fastdecode.sampling import SamplingParams, choose_tokens, gumbel_noise, target_logprobs, target_probs

# probabilities 0.5, 0.3, 0.15, 0.05 as logits (log-probabilities), in a scrambled order
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])
LOGITS = PROBS.log()


def sp(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> SamplingParams:
    return SamplingParams(temperature, top_k, top_p, seed).validate()


# ------------------------------------------------------------------ target_probs


def test_temperature_scales_logits() -> None:
    """Temperature T: softmax(logits / T); T = 1 returns the model's own distribution."""
    torch.testing.assert_close(target_probs(LOGITS, sp(1.0)), PROBS)
    for t in (0.5, 2.0):
        torch.testing.assert_close(target_probs(LOGITS, sp(t)), (LOGITS / t).softmax(-1))


def test_temperature_zero_is_greedy_one_hot() -> None:
    """Temperature 0 means greedy: a one-hot at the argmax."""
    p = target_probs(LOGITS, sp(0.0))
    assert p.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_top_k_keeps_the_k_most_likely() -> None:
    """top-k keeps the k largest logits and renormalises them in proportion; 0 and k >= V are off."""
    p = target_probs(LOGITS, sp(top_k=2))
    torch.testing.assert_close(p, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))
    torch.testing.assert_close(target_probs(LOGITS, sp(top_k=0)), PROBS)
    torch.testing.assert_close(target_probs(LOGITS, sp(top_k=4)), PROBS)
    torch.testing.assert_close(target_probs(LOGITS, sp(top_k=10)), PROBS)
    assert int((target_probs(LOGITS, sp(top_k=1)) > 0).sum()) == 1


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.1, [1]), (0.5, [1]), (0.75, [1, 3]), (0.85, [1, 3, 0]), (0.97, [1, 3, 0, 2]), (1.0, [1, 3, 0, 2])],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p: float, kept: list[int]) -> None:
    """top-p keeps the most likely tokens until their mass reaches top_p (the first token always stays),
    renormalised in proportion."""
    p = target_probs(LOGITS, sp(top_p=top_p))
    assert sorted(torch.nonzero(p).flatten().tolist()) == sorted(kept)
    expected = torch.zeros(4)
    expected[kept] = PROBS[kept] / PROBS[kept].sum()
    torch.testing.assert_close(p, expected)


def test_order_is_temperature_then_top_k_then_top_p() -> None:
    """top-p sees the distribution after top-k: with top-k 2 the top two are renormalised to 0.625 / 0.375,
    so top-p 0.6 keeps one token (on the full distribution it would keep two). And temperature comes
    first: a high temperature flattens the distribution, so the same top-p keeps more tokens."""
    assert int((target_probs(LOGITS, sp(top_k=2, top_p=0.6)) > 0).sum()) == 1
    assert int((target_probs(LOGITS, sp(top_p=0.6)) > 0).sum()) == 2
    assert int((target_probs(LOGITS, sp(temperature=10.0, top_p=0.6)) > 0).sum()) == 3


def test_target_probs_rows_are_independent_and_normalised() -> None:
    """Batched logits (..., V): each row is processed alone and sums to 1; filtered log-probs are -inf."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3
    params = sp(temperature=0.7, top_k=20, top_p=0.9)
    p = target_probs(logits, params)
    assert p.shape == logits.shape and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 5))
    torch.testing.assert_close(p[1, 2], target_probs(logits[1, 2], params))
    lp = target_logprobs(logits, params)
    assert torch.equal(torch.isinf(lp), p == 0)


def test_target_probs_accepts_low_precision_logits() -> None:
    """bf16 logits give an fp32 distribution."""
    p = target_probs(LOGITS.bfloat16(), sp(top_k=3))
    assert p.dtype == torch.float32
    assert abs(float(p.sum()) - 1) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"sampler": "nope"}, "sampler"),
    ],
)
def test_sampling_params_refuse_bad_values(kwargs: dict, message: str) -> None:
    """Out-of-range sampling settings raise ValueError naming the setting."""
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).validate()


# ------------------------------------------------------------------ Gumbel noise and choose_tokens


def test_gumbel_noise_is_a_pure_function_of_seed_position_token() -> None:
    """Same (seed, position) -> the same noise row, whatever other positions are asked with it; a
    different seed or position -> a different row."""
    pos = torch.tensor([0, 5, 6, 1000])
    a = gumbel_noise(7, pos, 300)
    assert a.shape == (4, 300) and a.dtype == torch.float32
    assert torch.equal(a, gumbel_noise(7, pos, 300))
    assert torch.equal(a[1], gumbel_noise(7, torch.tensor([5]), 300)[0])
    assert torch.equal(a[2:], gumbel_noise(7, torch.tensor([[6, 1000]]), 300)[0])  # any leading shape
    assert torch.equal(a[:, :100], gumbel_noise(7, pos, 100))  # token t's noise does not depend on V
    assert not torch.equal(a, gumbel_noise(8, pos, 300))
    assert not torch.equal(a[1], a[2])


def test_gumbel_noise_range_and_moments() -> None:
    """Finite Gumbel(0, 1) draws: uniforms strictly inside (0, 1) on a 2**-24 grid bound the noise to
    [-log(-log(2**-25)), -log(-log(1 - 2**-25))]; mean ~ Euler's gamma, variance ~ pi^2 / 6."""
    x = gumbel_noise(123, torch.arange(2000), 500).double()
    lo = -math.log(-math.log(0.5 / 2**24))
    hi = -math.log(-math.log1p(-0.5 / 2**24))
    assert torch.isfinite(x).all()
    assert float(x.min()) >= lo - 1e-4 and float(x.max()) <= hi + 1e-4
    assert abs(float(x.mean()) - 0.5772156649) < 0.01
    assert abs(float(x.var()) - math.pi**2 / 6) < 0.02


def test_choose_tokens_greedy_is_argmax() -> None:
    """Greedy: the target's own token is the argmax, whatever the seed and positions."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(choose_tokens(logits, torch.arange(6), sp(0.0, seed=3)), logits.argmax(-1))


def test_gumbel_max_samples_the_target_distribution() -> None:
    """Gumbel-max over (seed, position) noise draws from target_probs: over many positions (one seed) and
    over many seeds (one position) the counts fit the exact distribution; top-k / top-p are respected."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=g) * 1.5
    params = sp(temperature=0.8, top_k=8, top_p=0.95, seed=11)
    exact = {i: float(v) for i, v in enumerate(target_probs(logits, params)) if v > 0}
    n = 20_000
    over_positions = choose_tokens(logits.expand(n, -1), torch.arange(n), params)
    counts = Counter(over_positions.tolist())
    _, p_pos, _ = pooled_chisquare(counts, exact)
    over_seeds = Counter(int(choose_tokens(logits, torch.tensor(17), SamplingParams(0.8, 8, 0.95, seed))) for seed in range(3000))
    _, p_seed, _ = pooled_chisquare(over_seeds, exact)
    print(f"\ngumbel-max: over positions p={p_pos:.3g}, over seeds p={p_seed:.3g}")
    assert set(counts) <= set(exact) and set(over_seeds) <= set(exact)
    assert p_pos > 1e-3 and p_seed > 1e-3
    # and the test has power: the untempered, unfiltered distribution is rejected
    wrong = {i: float(v) for i, v in enumerate(logits.softmax(-1))}
    assert pooled_chisquare(Counter(over_positions.tolist()), wrong)[1] < 1e-6


def test_choose_tokens_rows_use_their_own_positions() -> None:
    """Each row's noise comes from its own position: choosing rows together or one by one agrees."""
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([9, 10, 11, 12, 13])
    params = sp(temperature=1.0, seed=5)
    together = choose_tokens(logits, pos, params)
    alone = torch.stack([choose_tokens(logits[i], pos[i], params) for i in range(5)])
    assert torch.equal(together, alone)
