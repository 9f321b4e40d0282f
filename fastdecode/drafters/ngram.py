"""`ngram`: adaptive draft-verification (ADED-style) from an online n-gram table of the model's own output.

Two sources of continuations, merged into one draft tree:
- the *corpus table*: n-gram counts (tri-grams by default, backing off to shorter contexts) of every token
  the target has committed in this process, across requests (optionally seeded from a file). It is
  bounded: at most `max_entries` (context, next token) entries, least recently used contexts evicted
  first, and at most `max_children` next tokens per context (the rarest one goes).
- the *request*: like `pld`, the latest match of the last tokens in this request's prompt and output.

The tree is grown best-first, as a bandit would: a candidate's value is its estimated probability of
being accepted — its observed acceptance when it was verified before, shrunk toward its n-gram frequency
when it was not — plus an exploration bonus for candidates verified rarely (UCB1); a node's priority is
the product of the values on its path. Every verified node feeds its outcome back into the statistics.
Deterministic (draft_probs is None): lossless under every verification rule.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from fastdecode.drafters.base import DraftContext, Drafter, Proposal, StepResult, register
from fastdecode.drafters.pld import NgramIndex


@dataclass(frozen=True)
class NgramOptions:
    n: int = 3  # tri-grams: a context of n-1 tokens predicts the next one
    num_draft: int = 8  # deepest draft
    width: int = 4  # tree width: the node budget is num_draft * width (the adaptive controller narrows both)
    max_entries: int = 200_000  # bound on the corpus table's (context, next token) entries
    max_children: int = 8  # next tokens kept per context
    exploration: float = 0.3  # UCB1 bonus weight; 0 = pure exploitation
    min_value: float = 0.02  # a node whose path value falls below this is not drafted
    prompt: bool = True  # also draft from the current request (prompt and output), as pld does
    prompt_ngram: int = 3  # longest suffix matched against the request
    seed_file: str = ""  # a table saved by NgramDrafter.save (.json), or token ids, one document per line
    adaptive: bool = True  # draft depth and width follow acceptance and step time

    def validate(self) -> None:
        if self.n < 2:
            raise ValueError("ngram: n must be >= 2")
        if self.num_draft < 1 or self.width < 1 or self.max_children < 1 or self.prompt_ngram < 1:
            raise ValueError("ngram: num_draft, width, max_children and prompt_ngram must be >= 1")
        if self.max_entries < 1:
            raise ValueError("ngram: max_entries must be >= 1")
        if self.exploration < 0 or not 0 <= self.min_value < 1:
            raise ValueError("ngram: need exploration >= 0 and 0 <= min_value < 1")
        if self.seed_file and not Path(self.seed_file).is_file():
            raise FileNotFoundError(f"ngram: seed file {self.seed_file} not found")


class Entry:
    """A next token after a context: how often the target wrote it, and how often a draft of it was verified / accepted."""

    __slots__ = ("count", "tries", "hits")

    def __init__(self, count: float = 0.0):
        self.count, self.tries, self.hits = count, 0.0, 0.0


class NgramTable:
    """Contexts of 1 .. n-1 tokens -> next-token entries, bounded, least recently used contexts evicted first."""

    def __init__(self, n: int, max_entries: int, max_children: int):
        self.n, self.max_entries, self.max_children = n, max_entries, max_children
        self.contexts: OrderedDict[tuple[int, ...], dict[int, Entry]] = OrderedDict()
        self.entries = 0

    def __len__(self) -> int:
        return self.entries

    def add(self, tokens: list[int], start: int) -> None:
        """Count every n-gram (and shorter) whose last token is at index >= start."""
        for end in range(max(start, 1), len(tokens)):
            nxt = tokens[end]
            for k in range(1, min(self.n - 1, end) + 1):
                self.count(tuple(tokens[end - k : end]), nxt)
        self._evict()

    def count(self, ctx: tuple[int, ...], token: int, amount: float = 1.0) -> None:
        kids = self.contexts.get(ctx)
        if kids is None:
            kids = self.contexts[ctx] = {}
        else:
            self.contexts.move_to_end(ctx)
        entry = kids.get(token)
        if entry is None:
            if len(kids) >= self.max_children:  # the rarest next token makes room
                rare = min(kids, key=lambda t: kids[t].count)
                del kids[rare]
                self.entries -= 1
            entry = kids[token] = Entry()
            self.entries += 1
        entry.count += amount

    def _evict(self) -> None:
        while self.entries > self.max_entries and self.contexts:
            _, kids = self.contexts.popitem(last=False)
            self.entries -= len(kids)

    def lookup(self, tokens: list[int]) -> tuple[tuple[int, ...], dict[int, Entry]] | None:
        """The longest context ending `tokens` that the table knows, with its next tokens."""
        for k in range(min(self.n - 1, len(tokens)), 0, -1):
            ctx = tuple(tokens[-k:])
            kids = self.contexts.get(ctx)
            if kids:
                self.contexts.move_to_end(ctx)
                return ctx, kids
        return None

    def to_json(self) -> dict:
        rows = [[list(ctx), t, e.count] for ctx, kids in self.contexts.items() for t, e in kids.items()]
        return {"format": "fastdecode-ngram", "n": self.n, "entries": rows}


@dataclass
class _Node:
    """Where a drafted node came from, to credit its source once it is verified."""

    ctx: tuple[int, ...] | None  # corpus context (None: not from the corpus)
    match: int  # request match length (0: not from the request)


@register
class NgramDrafter(Drafter):
    name = "ngram"
    description = "adaptive n-gram (ADED): a bounded online table of the model's own output plus the prompt, drafted as a UCB tree"
    lossless = True
    Options = NgramOptions

    def __init__(self, options: NgramOptions):
        super().__init__(options)
        self.table = NgramTable(options.n, options.max_entries, options.max_children)
        # request-match reliability per match length: [tries, hits]
        self.match_stats = {n: [0.0, 0.0] for n in range(1, options.prompt_ngram + 1)}
        if options.seed_file:
            self.load_seed(options.seed_file)
        self.index = NgramIndex(1, options.prompt_ngram)
        self.absorbed = 0
        self.nodes: list[_Node] = []

    def draft_shape(self) -> tuple[int, int]:
        return self.options.num_draft, self.options.width

    # ------------------------------------------------------------ the corpus

    def load_seed(self, path: str) -> None:
        text = Path(path).read_text(encoding="utf-8")
        if path.endswith(".json"):
            data = json.loads(text)
            if data.get("format") != "fastdecode-ngram":
                raise ValueError(f"ngram: {path} is not a saved n-gram table")
            for ctx, token, count in data["entries"]:
                if 1 <= len(ctx) < self.options.n:
                    self.table.count(tuple(int(t) for t in ctx), int(token), float(count))
            self.table._evict()
            return
        for line in text.splitlines():
            ids = [int(t) for t in line.split()]
            self.table.add(ids, 1)

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.table.to_json()), encoding="utf-8")

    def reset(self, prompt_tokens: list[int]) -> None:
        self.index = NgramIndex(1, self.options.prompt_ngram)
        self.absorbed = len(prompt_tokens)  # the corpus learns the target's own output, not prompts
        self.nodes = []

    # ------------------------------------------------------------ drafting

    def _value(self, hits: float, tries: float, prior: float, total_tries: float) -> float:
        mean = (hits + 2.0 * prior) / (tries + 2.0)
        bonus = self.options.exploration * math.sqrt(math.log(total_tries + 2.0) / (tries + 1.0))
        return min(1.0, mean + bonus)

    def _candidates(self, tokens: list[int], limit: int) -> list[tuple[float, int, _Node]]:
        """(value, token, source) for the children of the node whose context is `tokens`, best first."""
        best: dict[int, tuple[float, _Node]] = {}
        found = self.table.lookup(tokens)
        if found is not None:
            ctx, kids = found
            total = sum(e.count for e in kids.values())
            total_tries = sum(e.tries for e in kids.values())
            for tok, e in kids.items():
                v = self._value(e.hits, e.tries, e.count / total, total_tries)
                best[tok] = (v, _Node(ctx, 0))
        if self.options.prompt:
            committed = self.index.indexed - 1  # followers must be committed tokens
            for n in range(min(self.options.prompt_ngram, len(tokens) - 1), 0, -1):
                ends = self.index.ends.get(tuple(tokens[-n:]))
                if not ends:
                    continue
                end = next((e for e in reversed(ends) if e < committed), None)
                if end is None:
                    continue
                tok = self.base[end + 1]
                tries, hits = self.match_stats[n]
                v = self._value(hits, tries, 0.5, tries)
                if tok not in best or best[tok][0] < v:
                    prev_ctx = best[tok][1].ctx if tok in best else None
                    best[tok] = (v, _Node(prev_ctx, n))
                break  # the longest match only, as pld does
        ranked = sorted(((v, t, src) for t, (v, src) in best.items()), key=lambda c: (-c[0], c[1]))
        return ranked[:limit]

    def propose(self, ctx: DraftContext) -> Proposal:
        o = self.options
        self.nodes = []
        tokens = ctx.tokens
        if self.absorbed < len(tokens):  # learn every committed token (the pending one included)
            self.table.add(tokens, max(self.absorbed, 1))
            self.absorbed = len(tokens)
        if o.prompt:
            self.index.update(tokens)
            self.base = tokens
        max_depth = min(o.num_draft, ctx.max_depth)
        max_nodes = min(o.num_draft * o.width, ctx.max_nodes)
        if max_depth < 1 or max_nodes < 1:
            return Proposal()
        # best-first growth: a heap of (-path value, tiebreak, parent index, token, source, depth)
        heap: list[tuple[float, int, int, int, _Node, int]] = []
        order = 0
        for v, t, src in self._candidates(tokens, o.width):
            if v >= o.min_value:
                heapq.heappush(heap, (-v, order, -1, t, src, 1))
                order += 1
        out_tokens: list[int] = []
        parents: list[int] = []
        paths: list[list[int]] = []
        while heap and len(out_tokens) < max_nodes:
            negv, _, parent, tok, src, depth = heapq.heappop(heap)
            j = len(out_tokens)
            out_tokens.append(tok)
            parents.append(parent)
            self.nodes.append(src)
            path = (paths[parent] if parent >= 0 else []) + [tok]
            paths.append(path)
            if depth >= max_depth:
                continue
            for v, t, s in self._candidates(tokens + path, o.width):
                pv = -negv * v
                if pv >= o.min_value:
                    heapq.heappush(heap, (-pv, order, j, t, s, depth + 1))
                    order += 1
        return Proposal(out_tokens, parents)

    def observe(self, result: StepResult) -> None:
        prop, path = result.proposal, result.verdict.path
        if not self.nodes or len(self.nodes) < len(prop):
            return
        on_path = set(path)
        tested_parents = {-1, *path}
        for j, parent in enumerate(prop.parents):
            if parent not in tested_parents:
                continue  # never compared with the target
            hit = 1.0 if j in on_path else 0.0
            src = self.nodes[j]
            if src.ctx is not None:
                kids = self.table.contexts.get(src.ctx)
                entry = kids.get(prop.tokens[j]) if kids else None
                if entry is not None:
                    entry.tries += 1.0
                    entry.hits += hit
            if src.match:
                stats = self.match_stats[src.match]
                stats[0] += 1.0
                stats[1] += hit
