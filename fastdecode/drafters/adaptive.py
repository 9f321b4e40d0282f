"""Adaptive draft length: pick each step's draft depth and tree width from what the engine measured.

The controller keeps, per drafter instance (so across the requests of a process), two kinds of online
statistics, both decayed so that they follow the workload:

- *accepted tokens* for every candidate shape (depth d, width w; width = nodes per level, so the node
  budget is d * w). A step verified under the limit (d0, w0) tells exactly how many tokens every smaller
  shape would have accepted under greedy verification: clip the proposal as `Proposal.clip` would and
  take the accepted path's prefix that survives. So one step updates every cell d <= d0, w <= w0.
  Larger cells are estimated from their neighbours, and refreshed by an occasional *probe* step one
  size beyond the current choice.
- *time*: the engine's verify time per number of rows (StepResult.step_seconds - draft_seconds), as a
  decayed mean per row count made monotone, and the drafter's own time as a base plus a cost per draft
  forward.

Each step it picks the shape with the most expected tokens (accepted + the bonus token) per second.
It never changes what is accepted: it only bounds the proposal, so every drafter stays lossless.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastdecode.drafters.base import DraftContext, Proposal, StepResult

PROBE_EVERY = 8  # one step in PROBE_EVERY drafts one size beyond the current best shape
ACCEPT_DECAY = 0.99  # per step: acceptance statistics have a memory of ~100 steps
TIME_DECAY = 0.98
DEEPER_GAIN = 0.7  # an unseen depth is guessed to add DEEPER_GAIN times the previous depth's gain
RECHOOSE_EVERY = 4  # the scores of every shape are recomputed every RECHOOSE_EVERY steps (~0.1 ms of Python each
# for a 6-deep, 8-wide tree: a tenth of a GPU step); the steps between keep the last choice


def _widths(max_width: int) -> list[int]:
    ws = [1]
    while ws[-1] * 2 < max_width:
        ws.append(ws[-1] * 2)
    if max_width > 1:
        ws.append(max_width)
    return ws


def clipped_outcome(depths: list[int], parents: list[int], path: list[int], max_depth: int, max_nodes: int) -> tuple[int, int]:
    """(nodes kept, accepted tokens) had the proposal been clipped to (max_depth, max_nodes).

    Example: a chain of 5 with 3 accepted, clipped to depth 2 -> (2, 2).
    """
    kept: set[int] = set()
    for j, p in enumerate(parents):
        if len(kept) >= max_nodes:
            break
        if depths[j] <= max_depth and (p < 0 or p in kept):
            kept.add(j)
    accepted = 0
    for j in path:
        if j not in kept:
            break
        accepted += 1
    return len(kept), accepted


class LengthController:
    def __init__(self, max_depth: int, max_width: int = 1):
        self.max_depth = max(1, max_depth)
        self.widths = _widths(max(1, max_width))
        D, W = self.max_depth + 1, len(self.widths)
        # decayed sums per cell [depth][width index]; depth 0 = no draft
        self.weight = [[0.0] * W for _ in range(D)]
        self.accepted = [[0.0] * W for _ in range(D)]
        self.rows = [[0.0] * W for _ in range(D)]
        self.drafts = [[0.0] * W for _ in range(D)]
        self.verify_time: dict[int, list[float]] = {}  # rows -> [decayed sum of seconds, weight]
        self.draft_base = [0.0, 0.0]  # decayed sum of draft seconds without draft forwards, weight
        self.draft_per_forward = [0.0, 0.0]  # decayed sum of seconds per draft forward, weight
        self.steps = 0
        self.choice = (self.max_depth, len(self.widths) - 1)  # start wide: the first steps measure everything
        self.extra_rows = 0.0

    # ------------------------------------------------------------ choose

    def limit(self, ctx: DraftContext) -> DraftContext:
        """The context with max_depth / max_nodes narrowed to this step's chosen shape."""
        d, wi = self._choose()
        self.limit_used = (d, wi)
        w = self.widths[wi]
        return dataclasses.replace(ctx, max_depth=min(ctx.max_depth, d), max_nodes=min(ctx.max_nodes, d * w))

    def _choose(self) -> tuple[int, int]:
        self.steps += 1
        if self.steps <= 2:
            return self.max_depth, len(self.widths) - 1
        if self.steps <= 2 + RECHOOSE_EVERY or self.steps % RECHOOSE_EVERY == 0:
            self.choice = self.best()
        best = self.choice
        if self.steps % PROBE_EVERY == 0:
            d, wi = best
            return min(self.max_depth, d + 2), min(len(self.widths) - 1, wi + 1)
        return best

    def best(self) -> tuple[int, int]:
        scores = self.scores()
        return max(scores, key=lambda k: (scores[k], -k[0], -k[1]))

    def scores(self) -> dict[tuple[int, int], float]:
        """Expected tokens per second for every shape (depth >= 1)."""
        out: dict[tuple[int, int], float] = {}
        table = self._time_table()
        for wi in range(len(self.widths)):
            acc = self._estimates(self.accepted, wi)
            rows = self._estimates(self.rows, wi, floor=1.0)
            drafts = self._estimates(self.drafts, wi)
            for d in range(1, self.max_depth + 1):
                t = self._draft_time(drafts[d]) + self._verify_time(rows[d] + self.extra_rows, table)
                out[(d, wi)] = (1.0 + acc[d]) / max(t, 1e-9)
        return out

    def _estimates(self, table: list[list[float]], wi: int, floor: float = 0.0) -> list[float]:
        """Per depth: the decayed mean where observed, shrunk toward a guess from the shallower depth."""
        est = [floor]
        for d in range(1, self.max_depth + 1):
            prev = est[d - 1]
            gain = prev - est[d - 2] if d >= 2 else 0.0
            guess = prev + DEEPER_GAIN * max(gain, 0.0) if d >= 2 else prev + 0.5
            if wi > 0:  # a wider tree is guessed to do what the next narrower one does
                guess = max(guess, self._cell(table, d, wi - 1, guess))
            est.append(self._cell(table, d, wi, guess))
        return est

    def _cell(self, table: list[list[float]], d: int, wi: int, guess: float) -> float:
        w = self.weight[d][wi]
        return (table[d][wi] + guess) / (w + 1.0)  # one pseudo-step at the guess

    def _time_table(self) -> tuple[list[int], list[float]]:
        keys = sorted(self.verify_time)
        means = [self.verify_time[k][0] / self.verify_time[k][1] for k in keys]
        for i in range(1, len(means)):  # more rows never cost less
            means[i] = max(means[i], means[i - 1])
        return keys, means

    def _verify_time(self, rows: float, table: tuple[list[int], list[float]] | None = None) -> float:
        if not self.verify_time:
            return 1.0
        keys, means = table or self._time_table()
        if len(keys) == 1:  # one width seen: assume a gentle slope around it
            return means[0] * max(0.5, 1.0 + 0.01 * (rows - keys[0]))
        if rows <= keys[0]:  # narrower than any seen: extend the first segment's slope
            slope = (means[1] - means[0]) / (keys[1] - keys[0])
            return max(0.5 * means[0], means[0] - slope * (keys[0] - rows))
        for i in range(1, len(keys)):
            if rows <= keys[i]:
                f = (rows - keys[i - 1]) / (keys[i] - keys[i - 1])
                return means[i - 1] + f * (means[i] - means[i - 1])
        slope = max((means[-1] - means[-2]) / (keys[-1] - keys[-2]), 0.01 * means[-1] / keys[-1])
        return means[-1] + slope * (rows - keys[-1])  # wider than any seen: extend the last segment's slope

    def _draft_time(self, drafts: float) -> float:
        base = self.draft_base[0] / self.draft_base[1] if self.draft_base[1] else 0.0
        per = self.draft_per_forward[0] / self.draft_per_forward[1] if self.draft_per_forward[1] else 0.0
        return base + per * drafts

    # ------------------------------------------------------------ learn

    def observe(self, result: StepResult) -> None:
        prop: Proposal = result.proposal
        d0, w0 = getattr(self, "limit_used", self.choice)
        self._observe_shape(prop, result.verdict.path, d0, w0)
        self._observe_time(prop, result.step_seconds, result.draft_seconds)

    def _observe_shape(self, prop: Proposal, path: list[int], d0: int, w0: int) -> None:
        for row in (self.weight, self.accepted, self.rows, self.drafts):
            for cells in row:
                for i in range(len(cells)):
                    cells[i] *= ACCEPT_DECAY
        depths = prop.depths()
        real_depth = max(depths, default=0)
        for wi in range(w0 + 1):
            for d in range(1, d0 + 1):
                nodes, acc = clipped_outcome(depths, prop.parents, path, d, d * self.widths[wi])
                self.weight[d][wi] += 1.0
                self.accepted[d][wi] += acc
                self.rows[d][wi] += 1.0 + nodes
                self.drafts[d][wi] += prop.draft_forwards * min(d, real_depth) / real_depth if real_depth else 0.0
        self.extra_rows = 0.9 * self.extra_rows + 0.1 * len(prop.extra_tokens)

    def _observe_time(self, prop: Proposal, step_s: float, draft_s: float) -> None:
        rows = 1 + len(prop) + len(prop.extra_tokens)
        for v in self.verify_time.values():
            v[0] *= TIME_DECAY
            v[1] *= TIME_DECAY
        cell = self.verify_time.setdefault(rows, [0.0, 0.0])
        cell[0] += max(step_s - draft_s, 0.0)
        cell[1] += 1.0
        for acc in (self.draft_base, self.draft_per_forward):
            acc[0] *= TIME_DECAY
            acc[1] *= TIME_DECAY
        if prop.draft_forwards:
            base = self.draft_base[0] / self.draft_base[1] if self.draft_base[1] else 0.0
            self.draft_per_forward[0] += max(draft_s - base, 0.0) / prop.draft_forwards
            self.draft_per_forward[1] += 1.0
        else:
            self.draft_base[0] += draft_s
            self.draft_base[1] += 1.0
