"""Drafters for the test suite, behind internal names (not listed by `fastdecode methods`).

- `_self`: the target drafts for itself with a scratch cache of its own. Under greedy decoding (and under
  Gumbel sampling, which shares the noise) every draft is accepted, so the acceptance pattern is known.
- `_random-tree`: random trees of random tokens, to fuzz masks, positions and cache compaction. Under
  sampling it reports the distribution each node was drawn from; siblings are drawn without replacement
  and report q renormalised without their earlier siblings, as the verifier's contract asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdecode.cache import KVCache
from fastdecode.drafters.base import DraftContext, Drafter, Proposal, register
from fastdecode.sampling import choose_tokens, target_probs


def drafter_generator(seed: int, salt: int) -> torch.Generator:
    """A drafter's own randomness: fresh for every generation seed (a speculative-sampling draft must be a
    new draw from the q it reports), reproducible for a fixed one."""
    return torch.Generator().manual_seed((seed * 1_000_003 + salt * 7_919 + 12_345) & 0xFFFFFFFF)


@dataclass(frozen=True)
class SelfOptions:
    num_draft: int = 6


@register
class SelfDraft(Drafter):
    name = "_self"
    description = "test drafter: the target drafts for itself (greedy: every draft is accepted)"
    lossless = True
    Options = SelfOptions

    def reset(self, prompt_tokens: list[int]) -> None:
        self.cache: KVCache | None = None
        self.generator: torch.Generator | None = None  # seeded from the generation's seed at the first step

    def propose(self, ctx: DraftContext) -> Proposal:
        k = min(self.options.num_draft, ctx.max_depth, ctx.max_nodes)
        if k < 1:
            return Proposal()
        model = ctx.target.model
        cache = self.cache
        if cache is None:
            cache = self.cache = model.new_cache(batch=1, length=ctx.target.cache.max_len)
        n = len(ctx.tokens)
        cache.truncate(min(cache.length, n - 1))  # rows for committed tokens only
        feed = ctx.tokens[cache.length :]
        pos = list(range(cache.length, n))
        if cache.length == 0 and n > 1:  # prefill as the engine does (prompt but its last token): the same rows
            model(torch.tensor([feed[:-1]], device=model.device), torch.tensor([pos[:-1]], device=model.device), cache, hidden_only=True)
            feed, pos = feed[-1:], pos[-1:]
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        for _ in range(k):
            ids = torch.tensor([feed], device=model.device)
            positions = torch.tensor([pos], device=model.device)
            logits, _ = model(ids, positions, cache, num_logits=1)
            row = logits[0, -1]  # distribution for position pos[-1] + 1
            if ctx.params.greedy or ctx.params.sampler == "gumbel":
                tok = int(choose_tokens(row, positions[0, -1], ctx.params))
            else:
                q = target_probs(row, ctx.params)
                self.generator = self.generator or drafter_generator(ctx.params.seed, 0)
                tok = int(torch.multinomial(q.cpu(), 1, generator=self.generator))
                qs.append(q)
            drafts.append(tok)
            feed, pos = [tok], [pos[-1] + 1]
        cache.truncate(n)
        probs = torch.stack(qs) if qs else None
        return Proposal.chain(drafts, probs, draft_forwards=k)


@dataclass(frozen=True)
class RandomTreeOptions:
    nodes: int = 8  # nodes per tree (fewer when the budget is short)
    max_children: int = 3
    context_p: float = 0.7  # probability mass on tokens already in the context (so drafts are accepted sometimes)
    seed: int = 0


@register
class RandomTree(Drafter):
    name = "_random-tree"
    description = "test drafter: random trees of random tokens (fuzzes masks, positions and the cache)"
    lossless = True
    Options = RandomTreeOptions

    def reset(self, prompt_tokens: list[int]) -> None:
        self.generator: torch.Generator | None = None  # seeded from the generation's seed at the first step

    def propose(self, ctx: DraftContext) -> Proposal:
        o = self.options
        g = self.generator = self.generator or drafter_generator(ctx.params.seed, o.seed)
        if ctx.max_depth < 1 or ctx.max_nodes < 1:
            return Proposal()
        # the shape: each node picks a random earlier node (or the root) with room for a child
        parents: list[int] = []
        depth: list[int] = []
        count: dict[int, int] = {}
        want = int(torch.randint(1, max(2, o.nodes + 1), (), generator=g))
        for _ in range(min(want, ctx.max_nodes)):
            options = [p for p in range(-1, len(parents)) if count.get(p, 0) < o.max_children and (p < 0 or depth[p] < ctx.max_depth)]
            if not options:
                break
            p = options[int(torch.randint(len(options), (), generator=g))]
            parents.append(p)
            depth.append(1 if p < 0 else depth[p] + 1)
            count[p] = count.get(p, 0) + 1
        # the tokens: q mixes the context's tokens with the whole vocabulary
        V = ctx.vocab_size
        seen = torch.tensor(sorted(set(ctx.tokens)))
        q = torch.full((V,), (1 - o.context_p) / V)
        q[seen] += o.context_p / len(seen)
        tokens = [0] * len(parents)
        probs = torch.zeros(len(parents), V)
        taken: dict[int, list[int]] = {}
        for j, p in enumerate(parents):
            qj = q.clone()
            qj[taken.get(p, [])] = 0.0  # without replacement among siblings
            qj /= qj.sum()
            tokens[j] = int(torch.multinomial(qj, 1, generator=g))
            probs[j] = qj
            taken.setdefault(p, []).append(tokens[j])
        return Proposal(tokens, parents, None if ctx.params.greedy else probs)
