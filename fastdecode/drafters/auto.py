"""`auto`: per request, the drafter expected to be fastest from what this process has seen (UCB1).

Arms are lossless drafters (and `ar`, the fallback when nothing helps). Each request is one pull. An
arm's value is its decode speed over all its pulls — total tokens ÷ total step time (drafting +
verification, as the engine measured it; prefill excluded) — divided by the best arm's, so values lie in
[0, 1] whatever the machine. (Dividing each request's speed by the best *single* request instead lets one
copy-heavy outlier squash every arm's value together, and the bandit then explores for ever: measured on
the H200, that `auto` ran at 1.04x `ar` where `pld` alone ran at 2.4x.) The choice is UCB1: value plus
`exploration * sqrt(2 ln n / n_arm)`; every arm is tried once first, in the order given.
Lossless because every arm is (checked when the options are made).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdecode.drafters.base import DraftContext, Drafter, Proposal, StepResult, get_method, make_drafter, register


@dataclass(frozen=True)
class AutoOptions:
    # layerskip is not a default arm: its calibration keeps every layer of small models like SmolLM2, and its
    # partial forwards run outside CUDA graphs; add it with arms=... where it helps
    arms: tuple[str, ...] = ("pld", "ngram", "lookahead", "ar")
    exploration: float = 0.3  # UCB1 bonus weight (values are speeds relative to the best arm's)

    def validate(self) -> None:
        if not self.arms:
            raise ValueError("auto: give at least one arm")
        for arm in self.arms:
            if arm == "auto":
                raise ValueError("auto: an arm cannot be auto itself")
            if not get_method(arm).lossless:
                raise ValueError(f"auto: arm {arm!r} is lossy; auto takes lossless arms only")
        if self.exploration < 0:
            raise ValueError("auto: exploration must be >= 0")


@register
class Auto(Drafter):
    name = "auto"
    description = "picks, per request, the drafter that has been fastest so far in this process (UCB1 bandit)"
    lossless = True
    Options = AutoOptions

    def __init__(self, options: AutoOptions):
        super().__init__(options)
        self.arms: dict[str, Drafter] = {name: make_drafter(name) for name in options.arms}
        self.features = any(arm.features for arm in self.arms.values())  # type: ignore[misc]  # prefill goes to such an arm
        self.pulls = {name: 0 for name in options.arms}
        self.tokens = {name: 0 for name in options.arms}  # over all of the arm's requests
        self.seconds = {name: 0.0 for name in options.arms}
        self.current: str | None = None
        self._tokens = 0
        self._seconds = 0.0

    # ------------------------------------------------------------ the bandit

    def _close_request(self) -> None:
        if self.current is not None and self._seconds > 0 and self._tokens > 0:
            self.pulls[self.current] += 1
            self.tokens[self.current] += self._tokens
            self.seconds[self.current] += self._seconds
        self.current, self._tokens, self._seconds = None, 0, 0.0

    def choose(self) -> str:
        untried = [a for a in self.options.arms if self.pulls[a] == 0]
        if untried:
            return untried[0]
        speeds = self.mean_speeds()
        best = max(speeds.values())
        total = sum(self.pulls.values())

        def ucb(arm: str) -> float:
            return speeds[arm] / best + self.options.exploration * math.sqrt(2 * math.log(total) / self.pulls[arm])

        return max(self.options.arms, key=ucb)

    def mean_speeds(self) -> dict[str, float]:
        """Tokens per second of step time over each pulled arm's requests."""
        return {a: self.tokens[a] / self.seconds[a] for a in self.options.arms if self.pulls[a]}

    # ------------------------------------------------------------ the drafter protocol

    def reset(self, prompt_tokens: list[int]) -> None:
        self._close_request()  # the previous request ended: its speed is the arm's reward
        self.current = self.choose()
        self.arms[self.current].reset(prompt_tokens)

    def prefill(self, hidden: torch.Tensor) -> None:
        assert self.current is not None
        if self.arms[self.current].features:
            self.arms[self.current].prefill(hidden)

    def propose(self, ctx: DraftContext) -> Proposal:
        assert self.current is not None
        return self.arms[self.current].draft(ctx)

    def observe(self, result: StepResult) -> None:
        assert self.current is not None
        self.arms[self.current].learn(result)
        self._tokens += len(result.verdict.new_tokens)
        self._seconds += result.step_seconds
