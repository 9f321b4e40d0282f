"""`lookahead`: Jacobi / lookahead decoding (Fu et al. 2024), and Speculative Jacobi Decoding under sampling.

Greedy and Gumbel sampling (verification is an exact match, proposals are deterministic):
- A 2-D window of N-1 levels x W columns of guessed future tokens rides along each verify forward as
  lookahead rows (DESIGN.md: their logits come back, their K/V are never kept). Token (r, c) sits at
  offset 1 + r + c from the pending token and sees the pending token, level 0 up to column c, and its
  own column above it — one Jacobi trajectory per column:

      offsets:   1 2 3 4 5        level 0:  a b c d e      (r, c) sees: pending, level 0[..c], column c[..r]
                   2 3 4 5 6      level 1:    f g h i j
                     3 4 5 6 7    level 2:      k l m n o

- Each step the last level's outputs close one n-gram per column, (level 0[c], …, level N-2[c], out[c]),
  which goes into a pool keyed by its first token; the levels shift up by one and the outputs become the
  new last level (one Jacobi iteration). Up to G pooled n-grams that start with the pending token (plus
  the request's own prompt-lookup match, unless prompt_ngrams=false) are verified as a tree in the same
  forward.

Rejection sampling (`sampler="rejection"`): Speculative Jacobi Decoding. The window is one chain of
`sjd_window` tokens after the pending token; each was sampled from the target's distribution at its
position in the previous iteration, and that distribution is its q (draft_probs). The verify rows'
own distributions give the next iteration's tokens; a token is verified at most once, so x ~ q holds and
the verifier keeps the target's distribution. Tokens with no previous iteration are a deterministic
guess (a point mass).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fastdecode.drafters.base import DraftContext, Drafter, Proposal, StepResult, register
from fastdecode.drafters.pld import NgramIndex, build_trie
from fastdecode.sampling import choose_tokens, target_probs


@dataclass(frozen=True)
class LookaheadOptions:
    window: int = 5  # W: Jacobi columns (future positions iterated per step)
    ngram: int = 4  # N: n-gram size (N-1 lookahead levels; verified n-grams draft N-1 tokens)
    candidates: int = 4  # G: pooled n-grams verified per step
    pool_per_key: int = 8  # n-grams kept per first token
    prompt_ngrams: bool = True  # also verify the request's prompt-lookup continuation
    sjd_window: int = 6  # chain length of Speculative Jacobi Decoding (rejection sampling)
    seed: int = 0  # initial window tokens and SJD sampling noise
    adaptive: bool = True

    def validate(self) -> None:
        if self.window < 1 or self.candidates < 1 or self.pool_per_key < 1 or self.sjd_window < 1:
            raise ValueError("lookahead: window, candidates, pool_per_key and sjd_window must be >= 1")
        if self.ngram < 2:
            raise ValueError("lookahead: ngram must be >= 2")


@register
class Lookahead(Drafter):
    name = "lookahead"
    description = "Jacobi / lookahead decoding: an n-gram pool from Jacobi trajectories (SJD under rejection sampling)"
    lossless = True
    Options = LookaheadOptions

    def draft_shape(self) -> tuple[int, int]:
        o = self.options
        return o.ngram - 1, o.candidates + int(o.prompt_ngrams)

    def reset(self, prompt_tokens: list[int]) -> None:
        o = self.options
        self.rng = random.Random(o.seed)
        self.generator: torch.Generator | None = None  # SJD noise: seeded from the request's seed at the first step
        recent = prompt_tokens[-256:]
        self.levels: list[list[int]] = [[self.rng.choice(recent) for _ in range(o.window)] for _ in range(o.ngram - 1)]
        self.pool: dict[int, list[tuple[int, ...]]] = {}
        self.index = NgramIndex(1, 3)
        self.start = 0  # the pending token's position at the last propose
        self.sent_levels = False
        # SJD: the window after the pending token, with the distribution each token was drawn from (None = point mass)
        self.chain: list[tuple[int, torch.Tensor | None]] = []

    # ------------------------------------------------------------ propose

    def propose(self, ctx: DraftContext) -> Proposal:
        self.index.update(ctx.tokens)
        self.start = len(ctx.tokens) - 1
        if ctx.params.rejection:
            if self.generator is None:  # fresh noise per request, independent of the verifier's
                mixed = ctx.params.seed * 0x9E3779B1 + self.options.seed * 0x85EBCA77 + 0x51D
                self.generator = torch.Generator().manual_seed(mixed & 0xFFFFFFFFFFFF)
            return self._propose_sjd(ctx)
        return self._propose_lookahead(ctx)

    def _prompt_match(self, tokens: list[int], length: int) -> list[int]:
        found = self.index.continuations(tokens, length, 1)
        return found[0] if found else []

    def _propose_lookahead(self, ctx: DraftContext) -> Proposal:
        o = self.options
        depth = min(o.ngram - 1, ctx.max_depth)
        conts: list[list[int]] = []
        if depth >= 1:
            if o.prompt_ngrams:
                match = self._prompt_match(ctx.tokens, depth)
                if match:
                    conts.append(match)
            for g in self.pool.get(ctx.tokens[-1], [])[: o.candidates]:
                conts.append(list(g[:depth]))
        tree = build_trie(conts).clip(depth, ctx.max_nodes) if conts else Proposal()
        # the lookahead rows, if the context and the cache have room for them
        W, levels = o.window, o.ngram - 1
        e = W * levels
        room = ctx.target.cache.max_len - ctx.target.cache.length - 1 - len(tree)
        self.sent_levels = e <= room and self.start + levels + W <= ctx.target.context_length - 1
        if not self.sent_levels:
            return tree
        m = len(tree)
        mask = torch.zeros(e, 1 + m + e, dtype=torch.bool)
        mask[:, 0] = True  # the pending token
        tokens, offsets = [], []
        for r in range(levels):
            for c in range(W):
                i = r * W + c
                tokens.append(self.levels[r][c])
                offsets.append(1 + r + c)
                mask[i, 1 + m : 1 + m + c + 1] = True  # level 0, columns 0..c
                for rr in range(1, r + 1):
                    mask[i, 1 + m + rr * W + c] = True  # its column, levels 1..r (itself included)
        tree.extra_tokens, tree.extra_positions, tree.extra_mask = tokens, offsets, mask
        return tree

    def _propose_sjd(self, ctx: DraftContext) -> Proposal:
        o = self.options
        k = min(o.sjd_window, ctx.max_depth, ctx.max_nodes)
        if k < 1:
            self.chain = []
            return Proposal()
        # complete the window with deterministic guesses (point masses): the request's prompt-lookup match
        while len(self.chain) < k:
            guess = self._prompt_match(ctx.tokens + [t for t, _ in self.chain], k - len(self.chain))
            if not guess:
                break
            self.chain.extend((t, None) for t in guess)
        self.chain = self.chain[:k]
        if not self.chain:
            return Proposal()
        V = ctx.vocab_size
        probs = torch.zeros(len(self.chain), V)
        for j, (t, q) in enumerate(self.chain):
            if q is None:
                probs[j, t] = 1.0
            else:
                probs[j] = q
        return Proposal.chain([t for t, _ in self.chain], probs)

    # ------------------------------------------------------------ observe

    def observe(self, result: StepResult) -> None:
        prop, verdict = result.proposal, result.verdict
        if prop.draft_probs is not None or (not prop.extra_tokens and self.chain):
            self._observe_sjd(result)
            return
        if not prop.extra_tokens or result.extra_logits is None:
            return
        o = self.options
        W, levels = o.window, o.ngram - 1
        last = result.extra_logits[(levels - 1) * W : levels * W]  # (W, V): the last level's outputs
        pos = torch.tensor([self.start + levels + c for c in range(W)])  # the rows' own positions
        out = choose_tokens(last, pos, self._params).tolist() if self._params is not None else last.argmax(-1).tolist()
        for c in range(W):
            gram = tuple(self.levels[r][c] for r in range(levels)) + (int(out[c]),)
            bucket = self.pool.setdefault(gram[0], [])
            cont = gram[1:]
            if cont in bucket:
                bucket.remove(cont)
            bucket.insert(0, cont)
            del bucket[o.pool_per_key :]
        # one Jacobi iteration: levels move up, the outputs become the last level; then the columns
        # shift left by the extra tokens this step committed beyond one
        self.levels = self.levels[1:] + [[int(t) for t in out]]
        extra = len(verdict.path)
        if extra:
            self.levels = [row[extra:] + [row[-1]] * min(extra, W) for row in self.levels]
            self.levels = [row[:W] for row in self.levels]

    _params = None

    def draft(self, ctx: DraftContext) -> Proposal:
        self._params = ctx.params  # observe needs the sampling rule to iterate the window as the target would
        return super().draft(ctx)

    def _observe_sjd(self, result: StepResult) -> None:
        prop, verdict = result.proposal, result.verdict
        k, m = len(verdict.path), len(prop)
        params = self._params
        self.chain = []
        if result.logits is None or params is None or self.generator is None or k >= m:
            return
        # row r (1-based node r-1) predicts offset r+1; after this step the new pending token sits at
        # offset k+1, so rows k+1 .. m give the next iteration's tokens at new offsets 1 .. m-k
        for r in range(k + 1, m + 1):
            q = target_probs(result.logits[r], params)
            tok = int(torch.multinomial(q.cpu(), 1, generator=self.generator))
            self.chain.append((tok, q.cpu()))
