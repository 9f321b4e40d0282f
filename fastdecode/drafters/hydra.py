"""`hydra`: Hydra heads (Ankner et al. 2024), sequentially dependent Medusa heads.

Head k (models/draft.py, HydraDraft; trained by `fastdecode train hydra`) reads the target's feature at the
row that produced the pending token and the embeddings of the pending token and the k tokens drafted after
it, and guesses the next one. Where Medusa's heads guess every depth blind to the tokens before, a Hydra
head sees its own path: a tree is drafted level by level, head d run once over the level-d nodes it
expands (one small call per level, no draft cache). The engine hands over the feature as for `medusa`.

Greedy decoding drafts a tree (the `top_k` most likely tokens under each of the `width` best nodes of the
level before, the best `width * num_draft` nodes kept); sampling drafts a chain (the Gumbel sampler by the
target's noise, the rejection sampler by a draw from each head's distribution), verified by speculative
sampling. Lossless either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fastdecode.drafters.base import DraftContext, Proposal, register
from fastdecode.drafters.chain import Candidates, draft_generator, pick_token
from fastdecode.drafters.medusa import Medusa, MedusaOptions
from fastdecode.drafters.sps import draft_model


@dataclass(frozen=True)
class HydraOptions(MedusaOptions):
    KIND: ClassVar[str] = "hydra"


@register
class Hydra(Medusa):
    name = "hydra"
    description = "Hydra heads: Medusa heads that see the tokens drafted before them, drafted as a tree (fastdecode train hydra)"
    artifact = "hydra"
    Options = HydraOptions

    def propose(self, ctx: DraftContext) -> Proposal:
        model = draft_model(ctx.target.model, self.options.draft, self.artifact)
        k = min(self.options.num_draft, len(model.heads), ctx.max_depth, ctx.max_nodes)
        if k < 1 or self.last is None:
            return Proposal()
        f = self.last[None]  # (1, D)
        pending, n = ctx.tokens[-1], len(ctx.tokens)
        dev = f.device
        if not ctx.params.greedy or self.options.width == 1 or ctx.max_nodes <= k:
            generator = draft_generator(self.state, ctx.params)
            path, qs = [pending], []
            for d in range(k):  # head d reads the pending token and the d drafted so far; its token sits at n+d
                row = model.head_logits(d, f, torch.tensor([path], device=dev))[0]
                tok, q = pick_token(model, row, torch.tensor(n - 1 + d), ctx, generator)
                path.append(tok)
                if q is not None:
                    qs.append(q)
            return Proposal.chain(path[1:], torch.stack(qs) if qs else None, draft_forwards=k)
        return self._path_tree(model, ctx, k, f, pending)

    def _path_tree(self, model: Any, ctx: DraftContext, depth: int, f: torch.Tensor, pending: int) -> Proposal:
        width, top_k = self.options.width, self.options.top_k
        budget = min(ctx.max_nodes, width * depth)
        tree = Candidates(getattr(model, "draft_vocab_ids", None))
        frontier = [-1]
        for d in range(depth):  # head d over the expanded nodes of level d, each with its own path
            expand = tree.best(frontier, min(width, budget))
            paths = torch.tensor([[pending, *tree.path(j)] for j in expand], device=f.device)  # (E, d+1)
            logits = model.head_logits(d, f.expand(len(expand), -1), paths)  # (E, V')
            top = torch.topk(torch.log_softmax(logits, -1), min(top_k, logits.shape[-1]))
            frontier = tree.add(expand, top.values.tolist(), top.indices.tolist())
        return tree.proposal(budget, depth)
