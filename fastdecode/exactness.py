"""Is a method's greedy output the reference's, and where it is not, is the difference a numeric tie?

docs/design.md's rule, for comparing different engines or machines (a peer, fp32 vs bf16) and our own
forwards where they are not row-invariant (bf16 on CPUs without native bf16, fp16 on a CPU, fp32 on a GPU:
a width-16 forward may round differently from a width-1 one): a divergence from plain greedy decoding is accepted as a *numeric tie*
only where, at the first differing position, the target's top-2 logit gap is smaller than the measured
difference between the two paths' logits there. Both figures are kept so a reader can check the verdict.
Where forwards are row-invariant (`Generator.row_invariant`) a lossless method must be bit-identical:
the bench then flags any divergence, tie or not.

Pure functions on token ids and per-token top-k logits (what `Engine.generate(..., top_logits=k)` records):
this module never runs a model and never decides what a method is allowed to be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

TopLogits = Sequence[Sequence[float]]  # a pair at one position: the target's top-k token ids, their logits


@dataclass(frozen=True)
class Divergence:
    """The first position where two outputs of the same prompt differ."""

    position: int  # index into the new tokens
    reference_token: int | None  # None: the reference ended here
    other_token: int | None  # None: the other output ended here
    gap: float | None  # reference path: logit(reference_token) - logit(other_token); the top-2 gap when other is the runner-up
    top2_gap: float | None  # reference path: top-1 logit - top-2 logit
    logit_diff: float | None  # max |logit_ref - logit_other| over the token ids both top-k lists hold
    tie: bool  # gap < logit_diff: rounding alone can explain the different choice

    def to_dict(self) -> dict:
        return asdict(self)


def is_numeric_tie(gap: float | None, logit_diff: float | None) -> bool:
    """DESIGN.md's rule: a different choice is a tie only if the logits moved by more than the gap between the choices."""
    if gap is None or logit_diff is None:
        return False
    return gap < logit_diff


def first_difference(reference: Sequence[int], other: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts), or None when equal."""
    for i, (a, b) in enumerate(zip(reference, other, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


def logit_gap(top: TopLogits, winner: int, loser: int) -> float | None:
    """logit(winner) - logit(loser) in one top-k record; None when `loser` is not in it (no tie possible)."""
    ids, values = list(top[0]), list(top[1])
    if winner not in ids or loser not in ids:
        return None
    return float(values[ids.index(winner)] - values[ids.index(loser)])


def max_logit_difference(a: TopLogits, b: TopLogits) -> float | None:
    """max |Δlogit| between two top-k records of the same position, over the ids both hold."""
    logits_b = dict(zip(b[0], b[1], strict=True))
    diffs = [abs(float(v) - float(logits_b[t])) for t, v in zip(a[0], a[1], strict=True) if t in logits_b]
    return max(diffs) if diffs else None


def first_divergence(
    reference: Sequence[int],
    other: Sequence[int],
    reference_top: Sequence[TopLogits] = (),
    other_top: Sequence[TopLogits] = (),
) -> Divergence | None:
    """None when the token ids are equal; else the first divergence, judged by DESIGN.md's tie rule.

    Without top-k records at that position (sampling, a peer tool, a length difference) it is never a tie.
    """
    pos = first_difference(reference, other)
    if pos is None:
        return None
    ref_tok = int(reference[pos]) if pos < len(reference) else None
    oth_tok = int(other[pos]) if pos < len(other) else None
    ref_rec = reference_top[pos] if pos < len(reference_top) else None
    oth_rec = other_top[pos] if pos < len(other_top) else None
    gap = top2 = diff = None
    if ref_rec is not None:
        values = list(ref_rec[1])
        top2 = float(values[0] - values[1]) if len(values) > 1 else None
        if ref_tok is not None and oth_tok is not None:
            gap = logit_gap(ref_rec, ref_tok, oth_tok)
    if ref_rec is not None and oth_rec is not None:
        diff = max_logit_difference(ref_rec, oth_rec)
    return Divergence(pos, ref_tok, oth_tok, gap, top2, diff, is_numeric_tie(gap, diff))
