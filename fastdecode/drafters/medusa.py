"""`medusa`: Medusa heads (Cai et al. 2024) on the target's last hidden state.

Head k (models/draft.py, MedusaDraft; trained by `fastdecode train medusa`) maps the target's feature at the
row that produced the pending token to a guess of the token k+1 places after the pending one, through the
target's LM head (restricted to the draft vocabulary). One small call drafts every depth, with no draft
cache: the engine hands over the feature (`prefill`, `StepResult.hidden`).

Greedy decoding drafts a tree: level d holds the `top_k` most likely tokens of head d under each of the
`width` nodes of level d-1 with the highest cumulative log-probability; the best `width * num_draft` nodes
are kept (a parent always ranks above its child). Sampling drafts a chain, one token per head (the Gumbel
sampler by the target's noise, the rejection sampler by a draw from the head's distribution), verified by
speculative sampling. Lossless either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fastdecode.drafters.base import DraftContext, Drafter, Proposal, StepResult, register
from fastdecode.drafters.chain import Candidates, ChainState, draft_generator, pick_token
from fastdecode.drafters.sps import check_draft, draft_model


@dataclass(frozen=True)
class MedusaOptions:
    draft: str = ""  # the heads' folder (default: the ones shipped for the embedded model)
    num_draft: int = 4  # deepest draft (at most the number of heads)
    width: int = 8  # greedy: nodes expanded per level; the tree keeps width * num_draft nodes (1: a chain)
    top_k: int = 8  # greedy: tokens of each head under each expanded node
    adaptive: bool = True

    KIND: ClassVar[str] = "medusa"

    def validate(self) -> None:
        if self.num_draft < 1 or self.width < 1 or self.top_k < 1:
            raise ValueError(f"{self.KIND}: num_draft, width and top_k must be >= 1")
        check_draft(self.draft, self.KIND)


@register
class Medusa(Drafter):
    name = "medusa"
    description = "Medusa heads on the target's last hidden state, drafted as a tree (fastdecode train medusa)"
    lossless = True
    artifact = "medusa"
    features = True
    Options = MedusaOptions

    def __init__(self, options: Any):
        super().__init__(options)
        self.state = ChainState()  # only the rejection sampler's generator
        self.last: torch.Tensor | None = None  # the target's feature at the row that produced the pending token

    def draft_shape(self) -> tuple[int, int]:
        return self.options.num_draft, self.options.width

    def reset(self, prompt_tokens: list[int]) -> None:
        self.state.reset()
        self.last = None

    def prefill(self, hidden: torch.Tensor) -> None:
        self.last = hidden[-1].clone() if len(hidden) else None

    def observe(self, result: StepResult) -> None:
        if result.hidden is not None:
            row = 1 + result.verdict.path[-1] if result.verdict.path else 0  # the row that produced the bonus token
            with torch.inference_mode():
                self.last = result.hidden[row].clone()

    def propose(self, ctx: DraftContext) -> Proposal:
        model = draft_model(ctx.target.model, self.options.draft, self.artifact)
        k = min(self.options.num_draft, len(model.heads), ctx.max_depth, ctx.max_nodes)
        if k < 1 or self.last is None:
            return Proposal()
        logits = model.head_logits(self.last[None])[:k, 0]  # (k, V'): head d guesses the token d+1 after the pending one
        n = len(ctx.tokens)
        if not ctx.params.greedy or self.options.width == 1 or ctx.max_nodes <= k:
            generator = draft_generator(self.state, ctx.params)
            drafts, qs = [], []
            for d in range(k):  # the target's row at position n-1+d produces this token: its noise
                tok, q = pick_token(model, logits[d], torch.tensor(n - 1 + d), ctx, generator)
                drafts.append(tok)
                if q is not None:
                    qs.append(q)
            return Proposal.chain(drafts, torch.stack(qs) if qs else None, draft_forwards=1)
        return self._tree(model, ctx, k, logits)

    def _tree(self, model: Any, ctx: DraftContext, depth: int, logits: torch.Tensor) -> Proposal:
        width, top_k = self.options.width, self.options.top_k
        budget = min(ctx.max_nodes, width * depth)
        top = torch.topk(torch.log_softmax(logits, -1), min(top_k, logits.shape[-1]))
        head_vals, head_cols = top.values.tolist(), top.indices.tolist()  # one device read for every head
        tree = Candidates(getattr(model, "draft_vocab_ids", None))
        frontier = [-1]
        for d in range(depth):  # head d's tokens under each expanded node: the heads do not see the tokens before
            expand = tree.best(frontier, min(width, budget))
            frontier = tree.add(expand, [head_vals[d]] * len(expand), [head_cols[d]] * len(expand))
        return tree.proposal(budget, 1)
