"""`pld`: prompt lookup decoding (input-guided aggressive decoding).

Match the last n tokens (n from `max_ngram` down to `min_ngram`) against everything committed so far,
the prompt and the generated text, and propose what followed the most recent match, up to `num_draft`
tokens. With `branches > 1` the continuations of several matches are merged into a tree (a trie).
Deterministic: `draft_probs` is None, the verifier treats each node as a point mass.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastdecode.drafters.base import DraftContext, Drafter, Proposal, register


@dataclass(frozen=True)
class PLDOptions:
    num_draft: int = 10  # tokens per continuation (the depth of the draft)
    max_ngram: int = 3  # longest suffix matched
    min_ngram: int = 1  # shortest suffix matched
    branches: int = 1  # distinct continuations verified as a tree
    # draft depth and width follow acceptance and step time (drafters/adaptive.py). On by default since the
    # Spec-Bench runs of docs/benchmarks.md: on the 2-core CPU, where a 10-row verify costs ~1.3x a 1-row
    # step, it took pld from 1.04x to 1.26x `ar`; on the H200, where any width up to 16 costs the same, the
    # fixed 10-token draft was 6% faster (2.26x vs 2.12x): pass adaptive=false there
    adaptive: bool = True

    def validate(self) -> None:
        if self.num_draft < 1 or self.branches < 1:
            raise ValueError("pld: num_draft and branches must be >= 1")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("pld: need 1 <= min_ngram <= max_ngram")


def build_trie(continuations: list[list[int]]) -> Proposal:
    """Merge token chains that share prefixes into one tree. [[a, b], [a, c], [d]] -> a(b, c), d."""
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}
    for chain in continuations:
        node = -1
        for t in chain:
            nxt = child.get((node, t))
            if nxt is None:
                nxt = len(tokens)
                tokens.append(t)
                parents.append(node)
                child[(node, t)] = nxt
            node = nxt
    return Proposal(tokens, parents)


class NgramIndex:
    """For each n, the end positions of every n-gram in a growing token list (appended to, never edited)."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.ends: dict[tuple[int, ...], list[int]] = {}
        self.indexed = 0  # positions < indexed are in the table

    def update(self, tokens: list[int]) -> None:
        for end in range(self.indexed, len(tokens)):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self.ends.setdefault(tuple(tokens[end - n + 1 : end + 1]), []).append(end)
        self.indexed = len(tokens)

    def continuations(self, tokens: list[int], length: int, limit: int) -> list[list[int]]:
        """Up to `limit` distinct continuations of the current suffix, longest match and most recent first."""
        last = len(tokens) - 1
        found: list[list[int]] = []
        for n in range(min(self.max_n, last), self.min_n - 1, -1):
            for end in reversed(self.ends.get(tuple(tokens[last - n + 1 :]), ())):
                if end >= last:
                    continue  # the suffix itself
                cont = tokens[end + 1 : end + 1 + length]
                if cont and cont not in found:
                    found.append(cont)
                    if len(found) >= limit:
                        return found
        return found


@register
class PromptLookup(Drafter):
    name = "pld"
    description = "prompt lookup: copy what followed the latest match of the last n tokens in the prompt and output"
    lossless = True
    Options = PLDOptions

    def draft_shape(self) -> tuple[int, int]:
        return self.options.num_draft, self.options.branches

    def reset(self, prompt_tokens: list[int]) -> None:
        self.index = NgramIndex(self.options.min_ngram, self.options.max_ngram)

    def propose(self, ctx: DraftContext) -> Proposal:
        depth = min(self.options.num_draft, ctx.max_depth)
        if depth < 1:
            return Proposal()
        self.index.update(ctx.tokens)
        return build_trie(self.index.continuations(ctx.tokens, depth, self.options.branches))
