"""The target's sampling distribution and the seeded noise that makes sampling drafter-invariant.

One function (`target_probs`) turns logits into the distribution every path samples from: AR decoding,
the verifier and the drafters that report `q`. It must never sample by itself.

What a seed means (decided once): the noise that picks a token is a function of (seed, absolute position)
only — Gumbel-max with a counter-based hash — so for a fixed seed every lossless method returns the same
text as AR sampling, whatever it drafted (`sampler="gumbel"`, the default). Classic speculative sampling
(`sampler="rejection"`) draws from a `torch.Generator` seeded once per generation instead; it keeps the
target's distribution but not the text, and it can accept more drafts from a sampling drafter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLERS = ("gumbel", "rejection")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    sampler: str = "gumbel"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def rejection(self) -> bool:
        """Whether tokens are drawn by the rejection sampler (speculative sampling), not by argmax or Gumbel-max."""
        return not self.greedy and self.sampler == "rejection"

    def validate(self) -> SamplingParams:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        return self


def target_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., V) -> log-probabilities after temperature, top-k, top-p (filtered tokens are -inf)."""
    x = logits.float() / params.temperature
    V = x.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p; the first token always stays
        drop_sorted = (cum - sorted_x.softmax(-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x.log_softmax(-1)


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., V) -> the target's sampling distribution (fp32); greedy gives a one-hot at the argmax."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return target_logprobs(logits, params).exp()


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32  # the product wraps in int64; its low 32 bits are exact
    return x ^ (x >> 16)


def gumbel_noise(seed: int, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape (*positions.shape, V), a pure function of (seed, position, token id)."""
    dev = positions.device
    base = _hash32(torch.tensor(seed & _MASK32, dtype=torch.int64, device=dev) ^ 0x5BD1E995)
    row = _hash32((positions.to(torch.int64) * 0x9E3779B1 + base) & _MASK32)  # (...,)
    col = torch.arange(vocab_size, dtype=torch.int64, device=dev) * 0x85EBCA77 & _MASK32  # (V,)
    h = _hash32(row[..., None] ^ col)  # (..., V)
    u = ((h >> 8).double() + 0.5) / float(1 << 24)  # uniform in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u)).float()


def choose_tokens(logits: torch.Tensor, positions: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The target's own token for each row: argmax (greedy) or Gumbel-max on (seed, position).

    logits (..., V), positions (...) -> token ids (...). This is what AR decoding emits, and what a
    greedy or gumbel verifier compares drafts against.
    """
    if params.greedy:
        return logits.argmax(-1)
    noise = gumbel_noise(params.seed, positions, logits.shape[-1])
    return (target_logprobs(logits, params) + noise).argmax(-1)
