"""`eagle`: EAGLE (Li et al. 2024), a one-layer drafter that is autoregressive in the target's feature space.

The target's final hidden state f_i at position i predicts token i+1 through the LM head; the drafter
(models/draft.py, FeatureDraft; trained by `fastdecode train eagle`) reads (f_i, t_{i+1}) and predicts
f_{i+1}, whose LM-head row proposes t_{i+2}. The engine hands it the target's features: those of the prompt
(`prefill`) and, after each step, those of the pending row and the accepted rows (`StepResult.hidden`).
Its KV cache holds one row per pair read from the target's features; each step feeds the new pairs in one
forward, then drafts a chain, each drafted row reading the previous row's predicted feature. Drafted rows
are dropped at the next step (their features were guesses; the verified ones replace them).

Greedy decoding drafts a dynamic tree (EAGLE-2): from the root, each level expands the `width` nodes of
highest cumulative draft probability, each giving its `top_k` most likely children (the level's rows in one
forward, each row seeing the real rows and its own ancestors); after `num_draft` levels every node is
reranked by cumulative probability and the best `width * num_draft` form the tree (ancestors always rank
above their children, so it is a tree). The target verifies it in one forward. Sampling drafts a chain
(`width` 1 does too): the Gumbel sampler by the target's noise, the rejection sampler by drawing from the
drafter's distribution, verified by speculative sampling. Lossless either way. The adaptive controller
picks each step's depth and node budget. `draft=PATH` names the artifact; one ships for the embedded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastdecode.drafters.base import DraftContext, Drafter, Proposal, StepResult, register
from fastdecode.drafters.chain import Candidates, ChainState, draft_generator, pick_token
from fastdecode.drafters.sps import check_draft, draft_model


@dataclass(frozen=True)
class EagleOptions:
    draft: str = ""  # the EAGLE drafter's folder (default: the one shipped for the embedded model)
    num_draft: int = 6  # deepest draft (tree levels)
    width: int = 8  # greedy: nodes expanded per level; the tree keeps width * num_draft nodes (1: a chain)
    top_k: int = 8  # greedy: children drafted per expanded node
    adaptive: bool = True

    def validate(self) -> None:
        if self.num_draft < 1 or self.width < 1 or self.top_k < 1:
            raise ValueError("eagle: num_draft, width and top_k must be >= 1")
        check_draft(self.draft, "eagle")


@register
class Eagle(Drafter):
    name = "eagle"
    description = "EAGLE: a one-layer drafter on the target's features (fastdecode train eagle; one ships for smollm2)"
    lossless = True
    artifact = "eagle"
    features = True
    Options = EagleOptions

    def __init__(self, options: Any):
        super().__init__(options)
        self.state = ChainState()  # the drafter's KV cache and the rejection sampler's generator
        self.feats: torch.Tensor | None = None  # (capacity, D): the target's feature at each position
        self.known = 0  # positions 0 .. known-1 have their feature
        self.real = 0  # cache rows 0 .. real-1 hold pairs read from the target's features
        self.pending = 0  # the pending token's position at the last proposal

    def draft_shape(self) -> tuple[int, int]:
        return self.options.num_draft, self.options.width

    def reset(self, prompt_tokens: list[int]) -> None:
        self.state.reset()
        self.known = self.real = 0

    def prefill(self, hidden: torch.Tensor) -> None:
        self._store(0, hidden)

    def observe(self, result: StepResult) -> None:
        if result.hidden is None:
            return
        rows = [0, *(1 + j for j in result.verdict.path)]  # the pending row and the accepted draft rows
        with torch.inference_mode():
            self._store(self.pending, result.hidden[rows])

    def _store(self, at: int, rows: torch.Tensor) -> None:
        need = at + len(rows)
        f = self.feats
        if f is None or f.shape[0] < need or f.dtype != rows.dtype or f.device != rows.device:
            grown = torch.empty(max(need, 2 * (0 if f is None else f.shape[0]), 256), rows.shape[-1], dtype=rows.dtype, device=rows.device)
            if f is not None and f.dtype == rows.dtype and f.device == rows.device:
                grown[: self.known] = f[: self.known]
            self.feats = f = grown
        f[at:need] = rows
        self.known = need

    def propose(self, ctx: DraftContext) -> Proposal:
        model = draft_model(ctx.target.model, self.options.draft, "eagle")
        n = len(ctx.tokens)  # tokens[n-1] is pending: features are known for positions 0 .. n-2
        self.pending = n - 1
        k = min(self.options.num_draft, ctx.max_depth, ctx.max_nodes)
        if k < 1 or n < 2:
            return Proposal()
        if self.known < n - 1:
            raise RuntimeError(f"eagle: the target's features of {n - 1} positions are needed, {self.known} were given")
        st = self.state
        if st.cache is None or st.cache.max_len < ctx.target.cache.max_len:
            st.cache = model.new_cache(batch=1, length=ctx.target.cache.max_len)
            self.real = 0
        cache = st.cache
        keep = min(self.real, n - 2, cache.length)
        cache.truncate(keep)  # drop last step's drafted rows (guessed features) and any stale ones
        dev = model.device
        assert self.feats is not None
        feats = self.feats[keep : n - 1][None]  # pair i = (f_i, t_{i+1}) sits at cache row i, position i
        ids = torch.tensor([ctx.tokens[keep + 1 : n]], device=dev)
        pos = torch.arange(keep, n - 1, device=dev)[None]
        if ctx.params.greedy and self.options.width > 1 and ctx.max_nodes > k:
            return self._tree(model, ctx, k, feats, ids, pos)
        generator = draft_generator(st, ctx.params)
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        forwards = 0
        for _ in range(k):
            if cache.length + ids.shape[1] > cache.max_len:
                break
            logits, hidden = model(ids, pos, cache, num_logits=1, features=feats)
            forwards += 1
            if forwards == 1:
                self.real = n - 1
            # the row stands for the target's row at position pos+1, whose (seed, position) noise the Gumbel sampler uses
            tok, q = pick_token(model, logits[0, -1], pos[0, -1] + 1, ctx, generator)
            drafts.append(tok)
            if q is not None:
                qs.append(q)
            feats = hidden[:, -1:]  # the predicted feature of the drafted token's row
            ids = torch.tensor([[tok]], device=dev)
            pos = pos[:, -1:] + 1
        return Proposal.chain(drafts, torch.stack(qs) if qs else None, draft_forwards=forwards)

    def _tree(self, model: Any, ctx: DraftContext, depth: int, feats: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> Proposal:
        """EAGLE-2's dynamic tree (greedy): expand by cumulative draft probability level by level, then rerank."""
        cache = self.state.cache
        n = len(ctx.tokens)
        width, top_k = self.options.width, self.options.top_k
        budget = min(ctx.max_nodes, width * depth)
        logits, hidden = model(ids, pos, cache, num_logits=1, features=feats)
        self.real = n - 1
        tree = Candidates(getattr(model, "draft_vocab_ids", None))
        parents = tree.parents
        row_of: dict[int, int] = {}  # a fed node's cache row
        out_h = {-1: hidden[0, -1]}  # a fed node's output: its children's feature

        def add_children(expanded: list[int], rows: torch.Tensor) -> list[int]:
            """Each expanded node's `top_k` most likely children (rows: its logits, one row per node); one device read."""
            top = torch.topk(torch.log_softmax(rows.float(), -1), min(top_k, rows.shape[-1]))
            return tree.add(expanded, top.values.tolist(), top.indices.tolist())

        frontier = add_children([-1], logits[0, -1:])
        forwards = 1
        for level in range(1, depth):
            expand = tree.best(frontier, min(width, budget))
            T = len(expand)
            start = cache.length
            if start + T > cache.max_len:
                break
            mask = torch.zeros(1, T, start + T, dtype=torch.bool)
            mask[0, :, : self.real] = True  # the rows read from the target's features
            for r, j in enumerate(expand):
                mask[0, r, start + r] = True
                a = parents[j]
                while a >= 0:  # its ancestors' rows (drafted, in the cache)
                    mask[0, r, row_of[a]] = True
                    a = parents[a]
            f = torch.stack([out_h[parents[j]] for j in expand])[None]
            ids_l = torch.tensor([[tree.tokens[j] for j in expand]], device=model.device)
            pos_l = torch.full((1, T), n - 2 + level, device=model.device)
            logits, hidden = model(ids_l, pos_l, cache, mask=mask.to(model.device), features=f)
            forwards += 1
            for r, j in enumerate(expand):
                row_of[j] = start + r
                out_h[j] = hidden[0, r]
            frontier = add_children(expand, logits[0])
        return tree.proposal(budget, forwards)  # depth <= k <= ctx.max_depth
