"""`bild`: Big Little Decoder (Kim et al. 2023) — lossy by design.

The draft model (the same artifact as `sps`) writes on while it is confident; when its top probability
falls below `fallback` the target takes over (that token is the target's: it is not proposed). The target
then scores the drafted tokens in one forward and rolls back at the first one whose negative
log-likelihood under the target exceeds `rollback` (verify.verify_tolerant), where its own token is taken.
A token the target would not have chosen can thus be kept: the output may differ from `ar`'s, and the
bench reports by how much (token agreement and ROUGE-L against `ar`). `rollback < 0` accepts only the
target's own tokens (then it is `sps` with a confidence stop). Greedy and the Gumbel sampler take the
tolerant rule; the rejection sampler verifies losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdecode.drafters.base import DraftContext, Proposal, Verdict, register
from fastdecode.drafters.sps import SpeculativeSampling, check_draft
from fastdecode.sampling import SamplingParams, target_logprobs
from fastdecode.verify import verify_tolerant


@dataclass(frozen=True)
class BildOptions:
    draft: str = ""  # the draft model's folder (default: the one shipped for the embedded model)
    num_draft: int = 10  # the longest run the draft writes before the target checks it
    fallback: float = 0.5  # the target takes over when the draft's top probability is below this
    rollback: float = 2.0  # largest negative log-likelihood (nats) under the target of a kept draft token
    adaptive: bool = False

    def validate(self) -> None:
        if self.num_draft < 1:
            raise ValueError("bild: num_draft must be >= 1")
        if not 0 <= self.fallback < 1:
            raise ValueError("bild: fallback must be in [0, 1)")
        check_draft(self.draft)


@register
class BigLittleDecoder(SpeculativeSampling):
    name = "bild"
    description = "Big Little Decoder: the draft model writes while confident, the target rolls back unlikely tokens"
    lossless = False
    Options = BildOptions  # type: ignore[assignment]

    def propose(self, ctx: DraftContext) -> Proposal:
        return self.chain(ctx, self.model(ctx), min_confidence=self.options.fallback, keep_unconfident=False)

    def verdict(self, proposal: Proposal, logits: torch.Tensor, choice: list[int], params: SamplingParams) -> Verdict | None:
        if not len(proposal):
            return None
        lp = torch.log_softmax(logits.float(), -1) if params.greedy else target_logprobs(logits, params)
        return verify_tolerant(proposal, choice, lp, self.options.rollback)
