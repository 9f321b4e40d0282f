"""`rsd`: Recursive Speculative Decoding (Jeon et al. 2024), RSD-C: a draft tree sampled without replacement.

The draft model of `sps` (the same artifact: `draft=PATH`, by default the one shipped for the embedded model)
drafts a tree with a constant branching factor per depth: with `branches=3,2,1` the pending token gets 3
children, each of them 2, each of those 1 (3 + 6 + 6 nodes). A node's children are drawn *without
replacement* from the draft's distribution after the target's temperature / top-k / top-p (Gumbel-top-k:
the k largest of log q + Gumbel noise), so siblings never repeat a token and the tree covers more of what the
target may say than independent draws would. A node gets fewer children where the distribution has fewer tokens.

- Greedy: the draft's k most likely tokens per node, verified by matching: `ar`'s tokens.
- Gumbel sampler: Gumbel-top-k with the target's own (seed, position) noise, so the first child is the draft's
  Gumbel-max token (what `sps` drafts) and the others are the runners-up under the same noise; verified by
  matching: the same text as `ar` for a seed.
- Rejection sampler: Gumbel-top-k with noise from the drafter's generator. Sibling i's `draft_probs` row is
  the draft's distribution with siblings 0..i-1 removed and renormalised, the distribution it was drawn from,
  so the verifier's sibling rule (accept with min(1, p(x)/q_i(x)), else p <- norm(max(0, p - q_i))) is the
  paper's recursive rejection sampling: the target's distribution, exactly.

The draft model runs the tree level by level in its own KV cache: one forward feeds the committed tokens it
has not seen (its last row gives the root's children), then one forward per depth feeds that depth's nodes,
each row seeing the committed rows, its ancestors' rows and itself (a mask over the whole cache; so the draft
runs eagerly on a GPU, as `eagle` does). The next step keeps the committed rows, compacts the rows of the
accepted path after them and drops the rest. The adaptive controller bounds each step's depth and node count
(nodes past the bound are cut in breadth-first order: a prefix of every node's children, as the rejection
sampler needs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch

from fastdecode.drafters.base import DraftContext, Drafter, Proposal, register
from fastdecode.drafters.chain import ChainState, _common_prefix, draft_generator
from fastdecode.drafters.sps import check_draft, draft_model
from fastdecode.sampling import gumbel_noise, target_logprobs

MAX_NODES = 256  # a larger tree would not fit the KV cache's slack for draft rows (engine.CACHE_SLACK)


@dataclass(frozen=True)
class RsdOptions:
    draft: str = ""  # the draft model's folder (default: the one shipped for the embedded model)
    branches: tuple[int, ...] = (3, 2, 2, 1, 1, 1)  # children per node at each depth: 3 + 6 + 12*4 = 57 nodes, 6 deep
    adaptive: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "branches", tuple(self.branches))  # a list from the API: options stay hashable

    def validate(self) -> None:
        if not self.branches or min(self.branches) < 1:
            raise ValueError(f"rsd: branches must be one or more counts >= 1 (children per node at each depth), got {self.branches}")
        if (size := tree_size(self.branches)) > MAX_NODES:
            raise ValueError(f"rsd: branches={','.join(map(str, self.branches))} makes a tree of {size} nodes; at most {MAX_NODES}")
        check_draft(self.draft)


def tree_size(branches: tuple[int, ...]) -> int:
    """Nodes of the full tree. Example: (3, 2, 1) -> 3 + 6 + 6 = 15."""
    return sum(prod(branches[: d + 1]) for d in range(len(branches)))


@dataclass
class DraftTree:
    """The last proposal as the draft cache holds it: rows 0..base-1 are the committed tokens (the pending one
    included), `slots[j]` is node j's row (-1 for nodes never fed: the deepest level)."""

    base: int
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)

    def child(self, parent: int, token: int) -> int | None:
        return next((j for j, p in enumerate(self.parents) if p == parent and self.tokens[j] == token), None)

    def ancestors(self, j: int) -> list[int]:
        out = []
        while j >= 0:
            out.append(j)
            j = self.parents[j]
        return out


def draw_children(model: Any, row: torch.Tensor, position: int, k: int, ctx: DraftContext, generator: torch.Generator | None,
                  ) -> tuple[list[int], list[torch.Tensor]]:
    """Up to `k` distinct children from the draft's logits `row` (over its vocabulary) of a node at `position`:
    greedy, the k most likely; sampling, Gumbel-top-k on the draft's distribution after the target's processing,
    with the target's (seed, position) noise (Gumbel sampler) or the drafter's generator (rejection sampler).
    For the rejection sampler also each child's q_i over the target's vocabulary: the draft's distribution
    without the earlier children, renormalised (what sampling without replacement drew it from)."""
    vocab = getattr(model, "draft_vocab", None)  # a draft vocabulary: logit column i is token vocab[i]
    vocab_ids: list[int] | None = getattr(model, "draft_vocab_ids", None)
    if ctx.params.greedy:
        cols = torch.topk(row, min(k, row.shape[-1])).indices.tolist()
        return [c if vocab_ids is None else vocab_ids[c] for c in cols], []
    if vocab is not None:  # back to the target's token ids: tokens outside the draft vocabulary get -inf
        row = row.new_full((ctx.vocab_size,), float("-inf")).index_copy_(0, vocab, row)
    logq = target_logprobs(row, ctx.params)  # (V,)
    if generator is None:  # the Gumbel sampler: the noise the target's own choice at this position uses
        noise = gumbel_noise(ctx.params.seed, torch.tensor(position, device=row.device), ctx.vocab_size).double()
    else:
        u = torch.rand(ctx.vocab_size, generator=generator, dtype=torch.float64).clamp_min_(torch.finfo(torch.float64).tiny)
        noise = -torch.log(-torch.log(u))
    q = logq.exp()
    keys = torch.where(q > 0, logq, float("-inf")).double().cpu() + noise.cpu()  # Gumbel-top-k: k draws without replacement
    tokens = torch.topk(keys, min(k, int((q > 0).sum()))).indices.tolist()  # no more than the tokens q can draw
    if generator is None:
        return tokens, []
    qs = []
    for i in range(len(tokens)):
        qi = q.clone()
        qi[tokens[:i]] = 0.0
        qs.append(qi / qi.sum())
    return tokens, qs


@register
class RecursiveSpeculativeDecoding(Drafter):
    name = "rsd"
    description = "recursive speculative decoding: a draft-model tree sampled without replacement (the sps draft model)"
    lossless = True
    artifact = "draft"
    Options = RsdOptions

    def __init__(self, options: Any):
        super().__init__(options)
        self.state = ChainState()  # the draft's KV cache, the tokens whose rows it holds, the rejection sampler's generator
        self.tree: DraftTree | None = None

    def draft_shape(self) -> tuple[int, int]:
        b = self.options.branches
        return len(b), max(prod(b[: d + 1]) for d in range(len(b)))

    def reset(self, prompt_tokens: list[int]) -> None:
        self.state.reset()
        self.tree = None

    def _rollback(self, tokens: list[int]) -> int:
        """Keep the draft cache's rows of the committed tokens but the pending one: the rows it held before the
        last tree, then the accepted path's rows compacted after them. Returns how many rows it keeps."""
        st, tree = self.state, self.tree
        self.tree = None
        if tree is not None and st.fed == tokens[: tree.base]:
            slots, node = [], -1
            for tok in tokens[tree.base :]:
                nxt = tree.child(node, tok)
                if nxt is None or tree.slots[nxt] < 0:
                    break
                slots.append(tree.slots[nxt])
                st.fed.append(tok)
                node = nxt
            st.cache.compact(tree.base, slots)
        keep = min(_common_prefix(st.fed, tokens), len(tokens) - 1, st.cache.length)
        st.cache.truncate(keep)
        del st.fed[keep:]
        return keep

    def propose(self, ctx: DraftContext) -> Proposal:
        model = draft_model(ctx.target.model, self.options.draft)
        st = self.state
        if st.cache is None or st.cache.max_len < ctx.target.cache.max_len:
            st.cache = model.new_cache(batch=1, length=ctx.target.cache.max_len)  # a plain cache: tree masks over it
            st.fed, self.tree = [], None
        keep = self._rollback(ctx.tokens)
        branches = self.options.branches[: ctx.max_depth]
        cache, n = st.cache, len(ctx.tokens)
        if not branches or ctx.max_nodes < 1 or cache.length + n - keep > cache.max_len:
            return Proposal()
        in_dev = getattr(model, "input_device", model.device)
        # 1. feed what the draft has not seen; the pending token's row gives the root's children
        feed = ctx.tokens[keep:]
        logits, _ = model(torch.tensor([feed], device=in_dev), torch.arange(keep, n, device=in_dev)[None], cache, num_logits=1)
        st.fed.extend(feed)
        tree = self.tree = DraftTree(base=n)
        generator = draft_generator(st, ctx.params)
        frontier, rows, forwards = [-1], logits[0], 1
        draft_probs: list[torch.Tensor] = []  # the rejection sampler's q_i, one per node
        # 2. level by level: each frontier node's children, then (but for the last level) one forward over them
        for depth, k in enumerate(branches, start=1):
            level: list[int] = []
            for parent, row in zip(frontier, rows, strict=True):
                tokens, qs = draw_children(model, row, n - 2 + depth, min(k, ctx.max_nodes - len(tree.tokens)), ctx, generator)
                for i, tok in enumerate(tokens):
                    level.append(len(tree.tokens))
                    tree.tokens.append(tok)
                    tree.parents.append(parent)
                    tree.slots.append(-1)
                    if qs:
                        draft_probs.append(qs[i])
                if len(tree.tokens) >= ctx.max_nodes:
                    break
            room = ctx.max_nodes - len(tree.tokens)
            if depth == len(branches) or not level or room < 1:
                break
            frontier = level[: -(-room // branches[depth])]  # only nodes whose children fit the node budget
            start, T = cache.length, len(frontier)
            if start + T > cache.max_len:
                break
            mask = torch.zeros(1, T, start + T, dtype=torch.bool)  # (1, T, start+T): committed rows, ancestors, itself
            mask[0, :, :n] = True
            for r, j in enumerate(frontier):
                tree.slots[j] = start + r
                for a in tree.ancestors(j):
                    mask[0, r, tree.slots[a]] = True
            ids = torch.tensor([[tree.tokens[j] for j in frontier]], device=in_dev)
            pos = torch.full((1, T), n - 1 + depth, device=in_dev)
            logits, _ = model(ids, pos, cache, mask=mask.to(in_dev))
            rows, forwards = logits[0], forwards + 1
        probs = torch.stack(draft_probs) if draft_probs else None
        return Proposal(list(tree.tokens), list(tree.parents), probs, draft_forwards=forwards)
