"""The verifier alone: greedy matching, and speculative sampling on trees.

Sampling invariant (DESIGN.md, "How we know a method is lossless", 2): whatever the drafter proposes
(drawn from the q it reports, siblings without replacement, or a point mass), the tokens the verifier
emits are distributed exactly as the target's. Checked empirically against the exact distribution with a
pooled chi-square test at a fixed seed; deliberately broken rules must fail by a wide margin (p < 1e-6),
so the test is known to have the power to see a real bug.
"""

from __future__ import annotations

import types
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from conftest import pooled_chisquare

import fastdecode.verify as verify_mod
from fastdecode.drafters.base import Proposal
from fastdecode.verify import verify_match, verify_rejection

V = 8  # vocabulary of the synthetic target
N = 8_000  # trials per distribution test
PASS_P = 1e-3  # a correct rule must not be rejected at this level (fixed seeds: deterministic)
BROKEN_P = 1e-6  # a broken rule must be rejected at this level


# ------------------------------------------------------------------ greedy


def test_match_chain_accepts_longest_prefix_and_bonus() -> None:
    """Greedy chain: accept drafts while they equal the target's token for the row before; the target's
    token at the first mismatch (or after the last draft) is the bonus."""
    p = Proposal.chain([5, 6, 7])
    assert verify_match(p, [5, 6, 9, 4]).new_tokens == [5, 6, 9]
    v = verify_match(p, [5, 6, 7, 4])
    assert (v.path, v.tokens, v.bonus) == ([0, 1, 2], [5, 6, 7], 4)
    v = verify_match(p, [1, 6, 7, 4])
    assert (v.path, v.tokens, v.bonus) == ([], [], 1)
    v = verify_match(Proposal(), [3])
    assert (v.path, v.bonus) == ([], 3)


def test_match_tree_follows_matching_branch() -> None:
    """Greedy tree: at each node take the child whose token is the target's choice for that node's row.
    Tree: a(b, c), d -> tokens [a, b, c, d], parents [-1, 0, 0, -1]; row j+1 is node j's row."""
    a, b, c, d = 10, 11, 12, 13
    p = Proposal([a, b, c, d], [-1, 0, 0, -1])
    # row 0 -> a, row 1 (node a) -> c, row 3 (node c) -> 7
    v = verify_match(p, [a, c, 0, 7, 0])
    assert (v.path, v.tokens, v.bonus) == ([0, 2], [a, c], 7)
    # row 0 -> d: the second root child, a leaf; the bonus comes from row 4 (node d)
    v = verify_match(p, [d, 0, 0, 0, 9])
    assert (v.path, v.tokens, v.bonus) == ([3], [d], 9)
    # row 0 -> a token no child has
    v = verify_match(p, [1, c, 0, 7, 0])
    assert (v.path, v.bonus) == ([], 1)


def test_match_tree_duplicate_sibling_tokens_take_first() -> None:
    """Two siblings with the same token: the first one (in proposal order) is taken, deterministically."""
    p = Proposal([4, 4, 5], [-1, -1, 1])
    v = verify_match(p, [4, 6, 5, 0])
    assert v.path == [0] and v.new_tokens == [4, 6]


# ------------------------------------------------------------------ sampling: a synthetic target


def _peaked(g: torch.Generator, *shape: int, scale: float = 2.0) -> torch.Tensor:
    """Random peaked distributions over V tokens: softmax of scaled Gaussians."""
    return (torch.randn(*shape, V, generator=g) * scale).softmax(-1)


class Target:
    """A synthetic target over two tokens: p1 for the first token, p2[x1] for the second, p3 elsewhere."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.p1 = _peaked(g)
        self.p2 = _peaked(g, V)
        self.p3 = _peaked(g)
        # the drafter's own (different) distributions
        self.q1 = _peaked(g)
        self.q2 = _peaked(g, V)

    def joint(self) -> dict[tuple[int, int], float]:
        return {(a, b): float(self.p1[a] * self.p2[a, b]) for a in range(V) for b in range(V)}

    def first(self) -> dict[int, float]:
        return {a: float(self.p1[a]) for a in range(V)}


def _without(q: torch.Tensor, taken: list[int]) -> torch.Tensor:
    """q renormalised without the tokens earlier siblings took (the contract for sampling without replacement)."""
    q = q.clone()
    q[taken] = 0.0
    return q / q.sum()


def _run(
    target: Target,
    make: Callable[[torch.Generator], tuple[Proposal, torch.Tensor]],
    seed: int = 0,
    n: int = N,
) -> tuple[Counter, Counter]:
    """n independent verifications; returns counts of the first emitted token and of the first two.

    When a verdict emits only one token, the second is drawn from the target's exact conditional p2[x1],
    as the next step would; so the pair is distributed as p1 x p2 iff the verifier is lossless."""
    g = torch.Generator().manual_seed(seed)
    first: Counter = Counter()
    pairs: Counter = Counter()
    for _ in range(n):
        proposal, rows = make(g)
        new = verify_rejection(proposal, rows, g).new_tokens
        if len(new) < 2:
            new.append(int(torch.multinomial(target.p2[new[0]], 1, generator=g)))
        first[new[0]] += 1
        pairs[(new[0], new[1])] += 1
    return first, pairs


def _rows(target: Target, tokens: list[int], parents: list[int]) -> torch.Tensor:
    """The target's rows for a proposal: row 0 = p1, row of a depth-1 node x = p2[x], deeper rows p3."""
    rows = [target.p1]
    for tok, par in zip(tokens, parents, strict=True):
        rows.append(target.p2[tok] if par < 0 else target.p3)
    return torch.stack(rows)


def chain_with_q(target: Target) -> Callable[[torch.Generator], tuple[Proposal, torch.Tensor]]:
    """A chain of two draft tokens, x1 ~ q1, x2 ~ q2[x1], each reporting its q."""

    def make(g: torch.Generator) -> tuple[Proposal, torch.Tensor]:
        x1 = int(torch.multinomial(target.q1, 1, generator=g))
        x2 = int(torch.multinomial(target.q2[x1], 1, generator=g))
        probs = torch.stack([target.q1, target.q2[x1]])
        return Proposal.chain([x1, x2], probs), _rows(target, [x1, x2], [-1, 0])

    return make


def tree_without_replacement(target: Target, renormalise: bool = True) -> Callable[[torch.Generator], tuple[Proposal, torch.Tensor]]:
    """A tree: three root children drawn without replacement from q1; the first has two children and the
    second one child, drawn without replacement from q2[parent]. Later siblings report q renormalised
    without the earlier ones (or, with renormalise=False, lie and report the plain q)."""

    def make(g: torch.Generator) -> tuple[Proposal, torch.Tensor]:
        roots = torch.multinomial(target.q1, 3, replacement=False, generator=g).tolist()
        kids0 = torch.multinomial(target.q2[roots[0]], 2, replacement=False, generator=g).tolist()
        kid1 = int(torch.multinomial(target.q2[roots[1]], 1, generator=g))
        tokens = [*roots, *kids0, kid1]
        parents = [-1, -1, -1, 0, 0, 1]
        report = _without if renormalise else (lambda q, taken: q)
        probs = torch.stack(
            [
                target.q1,
                report(target.q1, roots[:1]),
                report(target.q1, roots[:2]),
                target.q2[roots[0]],
                report(target.q2[roots[0]], kids0[:1]),
                target.q2[roots[1]],
            ]
        )
        return Proposal(tokens, parents, probs), _rows(target, tokens, parents)

    return make


def point_mass_tree(target: Target) -> Callable[[torch.Generator], tuple[Proposal, torch.Tensor]]:
    """A deterministic drafter (draft_probs=None): root children [likely, unlikely] and a chain under the
    first. The same proposal every time: each node is a point mass."""
    order = torch.argsort(target.p1, descending=True).tolist()
    likely, unlikely = order[0], order[3]
    child = int(torch.argmax(target.p2[likely]))
    tokens, parents = [likely, unlikely, child], [-1, -1, 0]
    rows = _rows(target, tokens, parents)

    def make(g: torch.Generator) -> tuple[Proposal, torch.Tensor]:
        return Proposal(list(tokens), list(parents), None), rows

    return make


SCENARIOS = {
    "chain-q": chain_with_q,
    "tree-without-replacement": tree_without_replacement,
    "point-mass-tree": point_mass_tree,
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_rejection_sampling_is_lossless(name: str) -> None:
    """The first emitted token and the first two tokens along the path are distributed as the target's
    p1 and p1 x p2 (pooled chi-square, fixed seed)."""
    target = Target(seed=1)
    first, pairs = _run(target, SCENARIOS[name](target))
    _, p_first, cells1 = pooled_chisquare(first, target.first())
    _, p_pair, cells2 = pooled_chisquare(pairs, target.joint())
    print(f"\n{name}: first token p={p_first:.3g} ({cells1} cells), first two p={p_pair:.3g} ({cells2} cells)")
    assert p_first > PASS_P and p_pair > PASS_P


def test_point_mass_chain_is_lossless() -> None:
    """A chain of point masses (prompt lookup's shape) whose first draft is unlikely under the target."""
    target = Target(seed=2)
    x1 = int(torch.argsort(target.p1)[2])  # a low-probability first draft: rejections and residuals matter
    x2 = int(torch.argmax(target.p2[x1]))
    rows = _rows(target, [x1, x2], [-1, 0])
    first, pairs = _run(target, lambda g: (Proposal.chain([x1, x2]), rows), n=N // 2)
    _, p_first, _ = pooled_chisquare(first, target.first())
    _, p_pair, _ = pooled_chisquare(pairs, target.joint())
    assert p_first > PASS_P and p_pair > PASS_P


def test_tie_of_target_and_draft_never_rejects() -> None:
    """q == p: every draft is accepted (min(1, p/q) = 1), so a chain of two is emitted whole plus a bonus."""
    target = Target(seed=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x1 = int(torch.multinomial(target.p1, 1, generator=g))
        x2 = int(torch.multinomial(target.p2[x1], 1, generator=g))
        rows = _rows(target, [x1, x2], [-1, 0])
        v = verify_rejection(Proposal.chain([x1, x2], rows[:2].clone()), rows, g)
        assert v.path == [0, 1]


def test_rejected_point_mass_token_is_never_the_bonus() -> None:
    """After a point-mass draft x is rejected, the residual has no mass on x: the bonus is never x."""
    target = Target(seed=4)
    x = int(torch.argmax(target.p1))
    rows = _rows(target, [x], [-1])
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        v = verify_rejection(Proposal.chain([x]), rows, g)
        assert v.path or v.bonus != x


# ------------------------------------------------------------------ broken rules must fail


class _AlwaysAccept(types.SimpleNamespace):
    """Stands in for `torch` inside fastdecode.verify: u = 0, so every draft with p(x) > 0 is accepted."""

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(torch, name)

    @staticmethod
    def rand(*args, **kwargs):  # type: ignore[no-untyped-def]
        return torch.zeros(())


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_broken_accept_always_is_detected(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepting every draft emits the drafter's distribution, not the target's: p < 1e-6."""
    monkeypatch.setattr(verify_mod, "torch", _AlwaysAccept())
    target = Target(seed=1)
    first, pairs = _run(target, SCENARIOS[name](target), n=N // 4)
    _, p_first, _ = pooled_chisquare(first, target.first())
    _, p_pair, _ = pooled_chisquare(pairs, target.joint())
    print(f"\n{name}, accept always: first token p={p_first:.3g}, first two p={p_pair:.3g}")
    assert min(p_first, p_pair) < BROKEN_P


@pytest.mark.parametrize("name", ["chain-q", "tree-without-replacement"])
def test_broken_residual_is_detected(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling from p instead of norm(max(0, p - q)) after a rejection over-weights the rejected token's
    neighbours in q's shadow: p < 1e-6."""
    monkeypatch.setattr(verify_mod, "_residual", lambda p, q: p)
    target = Target(seed=1)
    first, pairs = _run(target, SCENARIOS[name](target), n=N // 4)
    _, p_first, _ = pooled_chisquare(first, target.first())
    _, p_pair, _ = pooled_chisquare(pairs, target.joint())
    print(f"\n{name}, residual = p: first token p={p_first:.3g}, first two p={p_pair:.3g}")
    assert min(p_first, p_pair) < BROKEN_P


def test_drafter_lying_about_sibling_q_is_detected() -> None:
    """The contract matters: siblings drawn without replacement that report the plain q (not renormalised
    without earlier siblings) break losslessness, and the test sees it."""
    target = Target(seed=1)
    first, pairs = _run(target, tree_without_replacement(target, renormalise=False), n=N // 2)
    _, p_first, _ = pooled_chisquare(first, target.first())
    _, p_pair, _ = pooled_chisquare(pairs, target.joint())
    print(f"\nlying drafter: first token p={p_first:.3g}, first two p={p_pair:.3g}")
    assert min(p_first, p_pair) < BROKEN_P
