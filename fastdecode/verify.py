"""The verifier: the one place where "lossless" is decided. Pure: tensors and a proposal in, a verdict out.

Words (as in DESIGN.md): row 0 of the target's output is the distribution for the children of the pending
token; row j >= 1 is the distribution for the children of draft node j-1. The *accepted* tokens are draft
tokens on the path the verifier walks; the *bonus* token is the target's own token after that path.

Two rules:
- `verify_match`: the target's own choice per row is known (argmax for greedy; Gumbel-max on
  (seed, position) for drafter-invariant sampling). Walk the tree from the root, at each node taking the
  child whose token equals the target's choice; the choice at the first node without such a child is the
  bonus token. Draft probabilities are not needed.
- `verify_rejection`: speculative sampling on trees. Children are tried in order; child i with token x and
  draft distribution q_i is accepted with probability min(1, p(x) / q_i(x)); on rejection the target's
  distribution becomes the residual p <- norm(max(0, p - q_i)). A node without q is a point mass at its
  token. When every child is rejected the bonus token is drawn from the final residual.

One lossy rule, for methods that say they are lossy (`fastdecode methods`):
- `verify_tolerant` (BiLD's rollback): a draft token the target would not have chosen is still accepted
  when its negative log-likelihood under the target is at most `max_nll`.
"""

from __future__ import annotations

import torch

from fastdecode.drafters.base import Proposal, Verdict


def _children(parents: list[int]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for j, p in enumerate(parents):
        kids.setdefault(p, []).append(j)
    return kids


def verify_match(proposal: Proposal, target_tokens: list[int]) -> Verdict:
    """target_tokens[r] is the target's own token for row r (1 + len(proposal) entries)."""
    kids = _children(proposal.parents)
    path: list[int] = []
    node, row = -1, 0
    while True:
        want = target_tokens[row]
        nxt = next((c for c in kids.get(node, ()) if proposal.tokens[c] == want), None)
        if nxt is None:
            return Verdict(path, [proposal.tokens[j] for j in path], int(want))
        path.append(nxt)
        node, row = nxt, nxt + 1


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r = (p - q).clamp_min_(0)
    total = r.sum()
    # total == 0 only when p <= q everywhere, where rejection has probability 0; keep p for round-off
    return p if total <= 0 else r / total


def verify_rejection(
    proposal: Proposal,
    target_probs: torch.Tensor,  # (1+m, V) fp32: the target's distribution per row
    generator: torch.Generator | None = None,
) -> Verdict:
    kids = _children(proposal.parents)
    q_all = proposal.draft_probs
    path: list[int] = []
    node, row = -1, 0
    while True:
        p = target_probs[row]
        accepted = None
        for c in kids.get(node, ()):
            x = proposal.tokens[c]
            u = torch.rand((), generator=generator, device=p.device)
            if q_all is None:  # point mass at x
                # q(x) = 1 >= p(x): accept with probability p(x)
                if u < p[x]:
                    accepted = c
                    break
                p = p.clone()
                p[x] = 0.0
                p = p / p.sum() if p.sum() > 0 else target_probs[row]
            else:
                q = q_all[c]
                # q >= p: accept with probability p/q;  q < p: always accept
                if u * q[x] < p[x]:
                    accepted = c
                    break
                p = _residual(p, q)
        if accepted is None:
            bonus = int(torch.multinomial(p, 1, generator=generator).item())
            return Verdict(path, [proposal.tokens[j] for j in path], bonus)
        path.append(accepted)
        node, row = accepted, accepted + 1


def verify_tolerant(proposal: Proposal, target_tokens: list[int], target_logprobs: torch.Tensor, max_nll: float) -> Verdict:
    """Lossy (BiLD's rollback policy). Walk the tree as `verify_match` does, but accept a child whose token x is
    not the target's choice when -log p(x) <= max_nll under the target's row (`target_logprobs`, (1+m, V));
    at the first node with no acceptable child the target's own token is the bonus. With max_nll < 0 this is
    `verify_match`."""
    kids = _children(proposal.parents)
    path: list[int] = []
    node, row = -1, 0
    while True:
        want = target_tokens[row]
        children = kids.get(node, ())
        nxt = next((c for c in children if proposal.tokens[c] == want), None)
        if nxt is None and max_nll >= 0:
            nxt = next((c for c in children if -float(target_logprobs[row, proposal.tokens[c]]) <= max_nll), None)
        if nxt is None:
            return Verdict(path, [proposal.tokens[j] for j in path], int(want))
        path.append(nxt)
        node, row = nxt, nxt + 1
