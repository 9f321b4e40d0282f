"""`rsd` (issue 12) on tiny models: a draft-model tree sampled without replacement, recursive rejection sampling.

Invariants: the verifier's sibling rule fed each sibling's distribution *without the earlier siblings* (what
Gumbel-top-k drew it from) is recursive rejection sampling: it returns the target's distribution (chi-square),
and the same siblings passed the plain draft distribution fail by a wide margin. End to end, `rsd` returns
`ar`'s tokens (greedy and Gumbel), keeps the target's joint distribution under rejection sampling with
several siblings at several depths (a good and a bad draft), and after every rollback its draft cache holds
the rows a fresh forward over the committed tokens computes (the accepted tree rows compacted in).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_lossless, make_tiny_model, pooled_chisquare, prompt_text, run_engine, sample_joint
from test_drafters import tiny_prompt

from fastdecode.cli import main
from fastdecode.drafters import DraftContext, Proposal, StepResult, get_method, make_drafter, make_options
from fastdecode.drafters.rsd import RecursiveSpeculativeDecoding, draw_children, tree_size
from fastdecode.engine import Engine
from fastdecode.models.draft import init_draft, init_eagle, load_draft, save_draft, target_info
from fastdecode.sampling import SamplingParams
from fastdecode.verify import verify_rejection


@pytest.fixture(scope="module")
def drafts(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Draft artifacts for the tiny target: layer 0 alone (weak), both layers (the target itself), and layer 0
    with its weights scrambled (bad: its distribution is far from the target's, so drafts get rejected)."""
    folder = tmp_path_factory.mktemp("rsd-drafts")
    out = {}
    for name, layers in (("weak", [0]), ("same", [0, 1]), ("bad", [0])):
        draft = init_draft(tiny_model, layers)
        if name == "bad":
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in draft.layers.parameters():
                    if p.dim() == 2:
                        p.copy_(3.0 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        save_draft(draft, folder / name, {"target": target_info(tiny_model)}, dtype=torch.float32)
        out[name] = str(folder / name)
    return out


class Counting(RecursiveSpeculativeDecoding):
    """Counts accepted nodes that were not their parent's first child (only recursive rejection sampling, or a
    tree, can accept those) and the proposals' root children."""

    name = "_rsd_counting"

    def __init__(self, options: Any):
        super().__init__(options)
        self.later_siblings = 0
        self.root_children: list[int] = []

    def propose(self, ctx: DraftContext) -> Proposal:
        p = super().propose(ctx)
        self.root_children.append(p.parents.count(-1))
        return p

    def observe(self, result: StepResult) -> None:
        parents = result.proposal.parents
        for j in result.verdict.path:
            self.later_siblings += parents.index(parents[j]) != j


def counting(**options: Any) -> Counting:
    return Counting(make_options(RecursiveSpeculativeDecoding, options))


# ------------------------------------------------------------------ recursive rejection sampling, the verifier alone


P = torch.tensor([0.04, 0.08, 0.40, 0.28, 0.12, 0.08])  # the target
Q = torch.tensor([0.45, 0.25, 0.12, 0.08, 0.06, 0.04])  # a draft that favours what the target does not


def _first_tokens(renormalise: bool, runs: int = 20000, siblings: int = 3) -> Counter[int]:
    """The first emitted token of `runs` depth-1 trees of `siblings` children drawn without replacement from Q."""
    params = SamplingParams(temperature=1.0, sampler="rejection")
    ctx = DraftContext([0], 1, 1, siblings, params, len(P), None)
    draw_gen, verify_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    target = P.expand(1 + siblings, -1)
    counts: Counter[int] = Counter()
    for _ in range(runs):
        tokens, qs = draw_children(object(), Q.log(), 0, siblings, ctx, draw_gen)
        assert len(set(tokens)) == len(tokens) == siblings
        probs = torch.stack(qs) if renormalise else Q.expand(siblings, -1)
        v = verify_rejection(Proposal(tokens, [-1] * siblings, probs), target, verify_gen)
        counts[v.new_tokens[0]] += 1
    return counts


def test_draws_without_replacement_carry_the_distribution_each_was_drawn_from() -> None:
    params = SamplingParams(temperature=1.0, sampler="rejection")
    ctx = DraftContext([0], 1, 1, 4, params, len(Q), None)
    gen = torch.Generator().manual_seed(0)
    firsts: Counter[int] = Counter()
    for _ in range(4000):
        tokens, qs = draw_children(object(), Q.log(), 0, 4, ctx, gen)
        firsts[tokens[0]] += 1
        for i, (tok, q) in enumerate(zip(tokens, qs, strict=True)):
            expect = Q.clone()
            expect[tokens[:i]] = 0
            torch.testing.assert_close(q, expect / expect.sum())
            assert q[tok] > 0
    _, p, _ = pooled_chisquare(firsts, {t: float(Q[t]) for t in range(len(Q))})
    assert p > 1e-3  # the first draw is a draw from Q


def test_recursive_rejection_sampling_keeps_the_target_distribution() -> None:
    exact = {t: float(P[t]) for t in range(len(P))}
    stat, p, _ = pooled_chisquare(_first_tokens(renormalise=True), exact)
    assert p > 1e-3, stat
    # the deliberately wrong rule: every sibling checked against the plain draft distribution
    wrong_stat, wrong_p, _ = pooled_chisquare(_first_tokens(renormalise=False), exact)
    assert wrong_p < 1e-12 and wrong_stat > 20 * stat


def test_siblings_stop_where_the_distribution_runs_out_of_tokens() -> None:
    params = SamplingParams(temperature=1.0, top_k=2, sampler="rejection")  # two tokens left after top-k
    ctx = DraftContext([0], 1, 1, 4, params, len(Q), None)
    tokens, qs = draw_children(object(), Q.log(), 0, 4, ctx, torch.Generator().manual_seed(0))
    assert sorted(tokens) == [0, 1] and float(qs[1][tokens[1]]) == pytest.approx(1.0)
    greedy = DraftContext([0], 1, 1, 4, SamplingParams(), len(Q), None)
    assert draw_children(object(), Q.log(), 0, 3, greedy, None) == ([0, 1, 2], [])


# ------------------------------------------------------------------ end to end on a tiny model


@pytest.mark.parametrize("adaptive", [True, False])
def test_rsd_greedy_identical_to_ar(tiny_model: Any, drafts: dict[str, str], adaptive: bool) -> None:
    drafter = counting(draft=drafts["weak"], adaptive=adaptive, branches=(3, 2, 1, 1))
    engine = Engine(tiny_model)
    accepted = 0
    for seed in range(6):
        prompt = tiny_prompt(seed)
        ref, _ = run_engine(tiny_model, prompt, "ar", SamplingParams(), 40, engine=engine)
        out, stats = run_engine(tiny_model, prompt, "rsd", SamplingParams(), 40, engine=engine, drafter=drafter)
        assert out == ref
        accepted += stats.accepted
    assert accepted > 0
    assert drafter.later_siblings > 0  # the tree's other branches were used, not only the top-1 chain
    if not adaptive:
        assert max(drafter.root_children) == 3


def test_rsd_with_the_target_as_draft_accepts_a_full_path_every_step(tiny_model: Any, drafts: dict[str, str]) -> None:
    """With the target's own layers as the draft, the greedy tree's first path is the target's, step after step:
    a stale or missing row in the draft cache (a wrong compaction) would show as a shorter accepted path."""
    drafter = make_drafter("rsd", draft=drafts["same"], adaptive=False, branches=(2, 2, 1))
    for seed in range(4):
        out, stats = run_engine(tiny_model, tiny_prompt(seed), "rsd", SamplingParams(), 48, drafter=drafter)
        ref, _ = run_engine(tiny_model, tiny_prompt(seed), "ar", SamplingParams(), 48)
        assert out == ref
        assert [t.accepted for t in stats.trace] == [3] * 12  # 3 drafts + the bonus per step
        assert [t.rows for t in stats.trace] == [1 + tree_size((2, 2, 1))] * 12


class CheckedRollback(RecursiveSpeculativeDecoding):
    """After every rollback, the draft cache's kept rows must equal a fresh forward's over the same tokens."""

    name = "_rsd_checked"

    def __init__(self, options: Any):
        super().__init__(options)
        self.compacted = 0  # rollbacks that kept rows of the last tree's accepted path
        self.checked = 0  # rollbacks whose kept rows were compared with a fresh forward's
        self.reference: Any = None

    def _rollback(self, tokens: list[int]) -> int:
        base = None if self.tree is None else self.tree.base
        keep = super()._rollback(tokens)
        self.compacted += base is not None and keep > base
        self.checked += keep > 0
        if keep == 0:  # the first step of a generation: nothing kept, nothing to compare
            return keep
        fresh = self.reference.new_cache(batch=1, length=keep)
        with torch.no_grad():
            self.reference(torch.tensor([tokens[:keep]]), torch.arange(keep)[None], fresh)
        cache = self.state.cache
        torch.testing.assert_close(cache.k[:, :, :, :keep], fresh.k[:, :, :, :keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[:, :, :, :keep], fresh.v[:, :, :, :keep], atol=1e-5, rtol=1e-5)
        return keep


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=3, sampler="rejection")])
def test_rsd_draft_cache_after_rollback_equals_a_rebuilt_one(tiny_model: Any, drafts: dict[str, str], params: SamplingParams) -> None:
    drafter = CheckedRollback(make_options(RecursiveSpeculativeDecoding, {"draft": drafts["weak"], "adaptive": False}))
    drafter.reference = load_draft(drafts["weak"], tiny_model)
    for seed in range(3):
        run_engine(tiny_model, tiny_prompt(seed), "rsd", params, 40, drafter=drafter)
    assert drafter.compacted > 0 and drafter.checked >= drafter.compacted


def test_rsd_gumbel_same_text_as_ar(tiny_model: Any, drafts: dict[str, str]) -> None:
    drafter = counting(draft=drafts["weak"], adaptive=False)
    for seed in range(4):
        params = SamplingParams(temperature=1.0, seed=seed)
        ref, _ = run_engine(tiny_model, tiny_prompt(seed), "ar", params, 30)
        out, _ = run_engine(tiny_model, tiny_prompt(seed), "rsd", params, 30, drafter=drafter)
        assert out == ref
    assert drafter.later_siblings > 0  # the Gumbel runners-up matched the target's choice at times


@pytest.mark.parametrize(("draft", "branches"), [("weak", (3, 2, 2)), ("bad", (4, 3, 1)), ("same", (2, 2, 2))])
def test_rsd_rejection_sampling_keeps_the_target_distribution(tiny_model: Any, drafts: dict[str, str], draft: str,
                                                              branches: tuple[int, ...]) -> None:
    """Several siblings at several depths; with `bad` most drafts are rejected, and (4, ...) draws every token
    top-k 4 leaves, so the last root child's distribution is a point mass."""
    drafter = counting(draft=drafts[draft], adaptive=False, branches=branches)
    p, drafted, accepted = sample_joint(tiny_model, tiny_prompt(3), "rsd", drafter)
    assert p > 1e-3
    assert accepted > 0
    if draft != "same":  # the target as its own draft has its first child accepted (q = p)
        assert drafter.later_siblings > 0
    if draft == "bad":
        steps = len(drafter.root_children)
        assert accepted < 0.5 * steps * len(branches)  # far fewer accepted than a full path per step


def test_rsd_options_and_missing_drafts(tiny_model: Any, drafts: dict[str, str], tmp_path: Path) -> None:
    rsd = get_method("rsd")
    assert make_options(rsd, {"branches": "3,2,1"}).branches == (3, 2, 1)
    assert make_options(rsd, {"branches": [2, 2]}).branches == (2, 2)  # from the API: still hashable
    assert tree_size((3, 2, 1)) == 15 and tree_size(rsd.Options().branches) == 57
    for bad, match in (("0", "branches must be"), ("3,0,1", "branches must be"), ("", "branches must be"),
                       ("8,8,8", "makes a tree of 584 nodes"), ("3,x", "not a valid")):
        with pytest.raises(ValueError, match=match):
            make_options(rsd, {"branches": bad})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_options(rsd, {"draft": str(tmp_path / "none")})
    eagle = tmp_path / "eagle"
    save_draft(init_eagle(tiny_model, [0]), eagle, {"target": target_info(tiny_model)})
    with pytest.raises(ValueError, match="'eagle' artifact, this method needs a 'draft' one"):
        make_options(rsd, {"draft": str(eagle)})
    with pytest.raises(ValueError, match="fastdecode train draft"):  # no draft ships for a tiny random target
        run_engine(tiny_model, tiny_prompt(0), "rsd", SamplingParams(), 4)
    other = make_tiny_model(seed=9)
    save_draft(init_draft(other, [0]), tmp_path / "d", {"target": target_info(other)})
    with pytest.raises(ValueError, match="another target"):
        run_engine(tiny_model, tiny_prompt(0), "rsd", SamplingParams(), 4, draft=str(tmp_path / "d"))


def test_rsd_is_listed_as_lossless_with_its_artifact(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("rsd "))
    assert "[lossless]" in lines[at]
    assert lines[at + 1].split() == ["options:", "draft=,", "branches=(3,", "2,", "2,", "1,", "1,", "1),", "adaptive=True"]
    assert "artifact: draft=PATH from `fastdecode train draft`; ships: smollm2 " in lines[at + 2]


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_rsd_greedy_lossless_on_spec_bench(smollm2: Any, spec_prompts: list[dict], ar_refs: Any) -> None:
    """SmolLM2 fp32 with the shipped draft, 9 Spec-Bench prompts (every third): `ar`'s tokens (bit for bit
    where the forwards are row-invariant, else up to a numeric tie)."""
    steps = tokens = 0
    for i in range(0, 26, 3):
        out = smollm2.generate(prompt_text(spec_prompts[i]), "rsd", max_new_tokens=64, top_logits=16)
        assert_lossless(f"rsd #{i} {spec_prompts[i]['category']}", ar_refs[i], out, exact=smollm2.row_invariant)
        steps += out.stats.steps
        tokens += out.stats.new_tokens
    assert tokens / steps > 1.2
