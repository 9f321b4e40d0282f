"""`ar`: plain autoregressive decoding, the reference every method is measured against (no drafts)."""

from __future__ import annotations

from fastdecode.drafters.base import DraftContext, Drafter, NoOptions, Proposal, register


@register
class AutoRegressive(Drafter):
    name = "ar"
    description = "plain autoregressive decoding: one target forward per token (the reference)"
    lossless = True
    Options = NoOptions

    def propose(self, ctx: DraftContext) -> Proposal:
        return Proposal()
