"""Drafting a chain with a model of the drafter's own (a layer subset of the target, or a draft model).

The drafter keeps a KV cache of its own and `fed`, the tokens whose rows it holds (slot i = position i).
Each step it keeps the rows of the longest prefix its tokens share with the committed ones (never the
pending token's: its logits start the draft), feeds the rest in one forward, then drafts autoregressively:
greedy by argmax, the Gumbel sampler by the same (seed, position) noise the target uses, the rejection
sampler by drawing from its own distribution (returned as `draft_probs`). Rows of drafted tokens stay in
the cache; the next step keeps those the verifier accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdecode.drafters.base import DraftContext, Proposal
from fastdecode.sampling import choose_tokens, target_probs


@dataclass
class ChainState:
    cache: Any = None
    fed: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # the rejection sampler's draws, seeded from the request's seed

    def reset(self) -> None:
        self.fed = []
        self.generator = None
        if self.cache is not None:
            self.cache.truncate(0)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def draft_generator(state: ChainState, params: Any) -> torch.Generator | None:
    """The rejection sampler's generator for the draft's draws (seeded from the request's seed), else None."""
    if params.rejection and state.generator is None:
        state.generator = torch.Generator().manual_seed((params.seed * 0x9E3779B1 + 0x1A7E5) & 0xFFFFFFFFFFFF)
    return state.generator if params.rejection else None


def pick_token(model: Any, row: torch.Tensor, position: torch.Tensor, ctx: DraftContext, generator: torch.Generator | None,
               ) -> tuple[int, torch.Tensor | None]:
    """The draft's token from its logits `row` (over its vocabulary) at `position`, and for the rejection sampler
    the distribution it was drawn from (over the target's vocabulary): greedy by argmax, the Gumbel sampler by
    the target's (seed, position) noise, the rejection sampler by a draw from its own distribution."""
    vocab = getattr(model, "draft_vocab", None)  # a draft vocabulary: logit column i is token vocab[i]
    vocab_ids: list[int] | None = getattr(model, "draft_vocab_ids", None)  # the same ids on the host (models/draft.py)
    if ctx.params.greedy:
        col = int(row.argmax())  # over the vocabulary's ascending ids: ties alike
        return (col if vocab_ids is None else vocab_ids[col]), None
    if vocab is not None:  # back to the target's token ids: tokens outside the draft vocabulary get -inf
        row = row.new_full((ctx.vocab_size,), float("-inf")).index_copy_(0, vocab, row)
    if generator is not None:
        q = target_probs(row, ctx.params)
        return int(torch.multinomial(q.cpu(), 1, generator=generator)), q
    return int(choose_tokens(row, position.to(row.device), ctx.params)), None


@dataclass
class Candidates:
    """A draft tree grown level by level by cumulative draft log-probability, then reranked (EAGLE-2; the
    `eagle` and `medusa` trees). Node j has a token, a parent (-1: the pending token), a score (the sum of
    its path's log-probabilities) and a depth."""

    vocab_ids: list[int] | None = None  # a draft vocabulary: column c of the draft's logits is token vocab_ids[c]
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)

    def best(self, nodes: list[int], n: int) -> list[int]:
        """The `n` of `nodes` (-1 allowed: the root, score 0) with the highest scores."""
        return sorted(nodes, key=lambda j: -self.scores[j] if j >= 0 else 0.0)[:n]

    def path(self, node: int) -> list[int]:
        """The tokens from the root's first child down to `node` (none for -1, the pending token)."""
        out: list[int] = []
        while node >= 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def add(self, parents: list[int], logprobs: list[list[float]], columns: list[list[int]]) -> list[int]:
        """Children of each of `parents`: `columns[i]` with log-probabilities `logprobs[i]`. Returns the new nodes."""
        first = len(self.tokens)
        for parent, vals, cols in zip(parents, logprobs, columns, strict=True):
            base, d = (0.0, 1) if parent < 0 else (self.scores[parent], self.depths[parent] + 1)
            for v, c in zip(vals, cols, strict=True):
                self.tokens.append(c if self.vocab_ids is None else self.vocab_ids[c])
                self.parents.append(parent)
                self.scores.append(base + v)
                self.depths.append(d)
        return list(range(first, len(self.tokens)))

    def proposal(self, budget: int, draft_forwards: int) -> Proposal:
        """The `budget` nodes of highest score as a Proposal. A child never scores above its parent and ties
        go to the shallower node, so every kept node's parent is kept; the nodes come out by depth, parents first."""
        ranked = sorted(range(len(self.tokens)), key=lambda j: (-self.scores[j], self.depths[j], j))[:budget]
        keep = sorted(ranked, key=lambda j: (self.depths[j], j))
        index = {-1: -1}
        for i, j in enumerate(keep):
            index[j] = i
        return Proposal([self.tokens[j] for j in keep], [index[self.parents[j]] for j in keep], None, draft_forwards=draft_forwards)


def draft_chain(
    model: Any,  # a LlamaModel or a GraphRunner
    state: ChainState,
    ctx: DraftContext,
    k: int,
    layers: list[int] | None = None,
    min_confidence: float = 0.0,  # stop after a token whose draft probability (top-1) is below this
    keep_unconfident: bool = True,  # propose that last, unconfident token (False: the target makes it; BiLD's fallback)
    new_cache: Any = None,  # () -> KVCache: the drafter's cache (default: model.new_cache of the target cache's size)
    forced: Sequence[int] = (),  # the draft's first tokens, given (a prompt-lookup match): the model continues after them
) -> Proposal:
    if state.cache is None or state.cache.max_len < ctx.target.cache.max_len:
        n_layers = None if layers is None else len(layers)
        state.cache = new_cache() if new_cache else model.new_cache(batch=1, length=ctx.target.cache.max_len, layers=n_layers)
        state.fed = []
    cache = state.cache
    n = len(ctx.tokens)
    keep = min(_common_prefix(state.fed, ctx.tokens), n - 1, cache.length)
    cache.truncate(keep)
    del state.fed[keep:]
    feed = [*ctx.tokens[keep:], *forced]
    pos = list(range(keep, n + len(forced)))
    generator = draft_generator(state, ctx.params)
    greedy_tokens = getattr(model, "greedy_tokens", None) if ctx.params.greedy else None
    vocab_ids: list[int] | None = getattr(model, "draft_vocab_ids", None)
    in_dev = getattr(model, "input_device", model.device)
    if forced and generator is not None:
        raise ValueError("given draft tokens have no draft distribution: the rejection sampler cannot verify them")
    drafts: list[int] = list(forced)
    qs: list[torch.Tensor] = []
    forwards = 0
    for _ in range(k):
        if cache.length + len(feed) > cache.max_len:
            break
        ids = torch.tensor([feed], device=in_dev)
        positions = torch.tensor([pos], device=in_dev)
        logits, _ = model(ids, positions, cache, num_logits=1, layers=layers)
        state.fed.extend(feed)
        forwards += 1
        row = logits[0, -1]  # the draft's distribution for position pos[-1] + 1 (over its vocabulary)
        choice = greedy_tokens(len(feed)) if greedy_tokens is not None else None
        if choice:  # greedy, the argmax read from the graph that computed it, mapped to a token id on the host
            tok, q = (int(choice[-1]) if vocab_ids is None else vocab_ids[int(choice[-1])]), None
        else:
            tok, q = pick_token(model, row, positions[0, -1], ctx, generator)
        confident = True
        if min_confidence > 0:
            confident = float(torch.softmax(row.float(), -1).max()) >= min_confidence
        if not confident and not keep_unconfident:
            break
        drafts.append(tok)
        if q is not None:
            qs.append(q)
        if not confident:
            break
        feed, pos = [tok], [pos[-1] + 1]
    return Proposal.chain(drafts, torch.stack(qs) if qs else None, draft_forwards=forwards)
