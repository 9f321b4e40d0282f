"""`sps` and `bild` (issue 11) on tiny models: the draft model's chain, its cache, the lossy rule.

Invariants: `sps` returns `ar`'s tokens (greedy and Gumbel) and keeps the target's distribution under
rejection sampling (chi-square); a draft identical to the target has every draft accepted (so the draft's
own cache keeps exactly the right rows across steps); `bild` with `rollback < 0` is `ar`, and with a
tolerance it keeps tokens the target would not have chosen, by the rule of `verify_tolerant`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model, run_engine, sample_joint
from test_drafters import tiny_prompt

from fastdecode.cli import main
from fastdecode.drafters import Proposal, get_method, make_drafter, make_options
from fastdecode.engine import Engine
from fastdecode.models.draft import init_draft, save_draft, target_info
from fastdecode.sampling import SamplingParams
from fastdecode.verify import verify_match, verify_tolerant


@pytest.fixture(scope="module")
def drafts(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two draft artifacts for the tiny target: layer 0 alone (a weak drafter) and both layers (the target itself)."""
    folder = tmp_path_factory.mktemp("drafts")
    out = {}
    for name, layers in (("weak", [0]), ("same", [0, 1])):
        save_draft(init_draft(tiny_model, layers), folder / name, {"target": target_info(tiny_model)}, dtype=torch.float32)
        out[name] = str(folder / name)
    return out


@pytest.mark.parametrize("adaptive", [True, False])
def test_sps_greedy_identical_to_ar(tiny_model: Any, drafts: dict[str, str], adaptive: bool) -> None:
    drafter = make_drafter("sps", draft=drafts["weak"], adaptive=adaptive)
    engine = Engine(tiny_model)
    accepted = 0
    for seed in range(6):
        prompt = tiny_prompt(seed)
        ref, _ = run_engine(tiny_model, prompt, "ar", SamplingParams(), 40, engine=engine)
        out, stats = run_engine(tiny_model, prompt, "sps", SamplingParams(), 40, engine=engine, drafter=drafter)
        assert out == ref
        accepted += stats.accepted
    assert accepted > 0


def test_sps_with_the_target_as_draft_accepts_every_draft(tiny_model: Any, drafts: dict[str, str]) -> None:
    """The draft's cache keeps the rows of accepted tokens and drops the rest: with the target's own layers
    as the draft, every drafted token is the target's (a stale or missing row would show as a rejection)."""
    drafter = make_drafter("sps", draft=drafts["same"], adaptive=False, num_draft=5)
    for seed in range(4):
        out, stats = run_engine(tiny_model, tiny_prompt(seed), "sps", SamplingParams(), 48, drafter=drafter)
        ref, _ = run_engine(tiny_model, tiny_prompt(seed), "ar", SamplingParams(), 48)
        assert out == ref
        assert stats.accepted == stats.drafted > 0
        assert stats.mat > 5.0  # 5 drafts + the bonus per step, but for the last steps' budget
        # each step feeds what the draft has not seen: the previous step's last draft and bonus token, then one per draft
        assert stats.draft_forwards == stats.drafted


def test_sps_gumbel_same_text_as_ar(tiny_model: Any, drafts: dict[str, str]) -> None:
    drafter = make_drafter("sps", draft=drafts["weak"])
    for seed in range(4):
        params = SamplingParams(temperature=1.0, seed=seed)
        ref, _ = run_engine(tiny_model, tiny_prompt(seed), "ar", params, 30)
        out, _ = run_engine(tiny_model, tiny_prompt(seed), "sps", params, 30, drafter=drafter)
        assert out == ref


def test_sps_rejection_sampling_keeps_the_target_distribution(tiny_model: Any, drafts: dict[str, str]) -> None:
    p, _, accepted = sample_joint(tiny_model, tiny_prompt(3), "sps", make_drafter("sps", draft=drafts["weak"], adaptive=False, num_draft=3))
    assert accepted > 0
    assert p > 1e-3


def test_sps_options_and_missing_drafts(tiny_model: Any, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_options(get_method("sps"), {"draft": str(tmp_path / "none")})
    with pytest.raises(ValueError, match="num_draft"):
        make_options(get_method("sps"), {"num_draft": "0"})
    drafter = make_drafter("sps")  # no draft ships for a tiny random target
    with pytest.raises(ValueError, match="fastdecode train draft"):
        run_engine(tiny_model, tiny_prompt(0), "sps", SamplingParams(), 4, drafter=drafter)
    other = make_tiny_model(seed=9)
    folder = tmp_path / "d"
    save_draft(init_draft(other, [0]), folder, {"target": target_info(other)})
    with pytest.raises(ValueError, match="another target"):
        run_engine(tiny_model, tiny_prompt(0), "sps", SamplingParams(), 4, drafter=make_drafter("sps", draft=str(folder)))


def test_the_draft_is_resolved_once_per_target_not_every_step(drafts: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafters ask for their model every step; reading the manifests and comparing the target each time
    cost ~1 ms a step on the CPU and more on a GPU (a device read). The same (target, kind, path) is resolved once."""
    import fastdecode.drafters.sps as sps_module

    calls: list[str] = []
    real = sps_module.resolve_draft
    monkeypatch.setattr(sps_module, "resolve_draft", lambda target, path, kind="draft": calls.append(path) or real(target, path, kind))
    target = make_tiny_model()  # the tiny target's weights, in a model no other test has loaded a draft for
    first = sps_module.draft_model(target, drafts["weak"])
    run_engine(target, tiny_prompt(0), "sps", SamplingParams(), 12, drafter=make_drafter("sps", draft=drafts["weak"]))
    assert sps_module.draft_model(target, drafts["weak"]) is first
    assert calls == [drafts["weak"]]
    other = make_tiny_model(seed=3)  # another target resolves (and refuses) its own
    with pytest.raises(ValueError, match="another target"):
        sps_module.draft_model(other, drafts["weak"])


# ------------------------------------------------------------------ bild


def test_verify_tolerant_keeps_likely_tokens_and_rolls_back_at_the_first_unlikely_one() -> None:
    prop = Proposal.chain([5, 6, 7])
    logp = torch.full((4, 10), -10.0)
    logp[0, 5], logp[1, 6], logp[2, 7] = -0.5, -3.0, -0.1
    choice = [4, 4, 7, 2]  # the target's own tokens per row
    v = verify_tolerant(prop, choice, logp, max_nll=1.0)
    assert v.tokens == [5] and v.bonus == 4  # 5 kept (nll 0.5), 6 too unlikely (3.0): the target's 4 there
    v = verify_tolerant(prop, choice, logp, max_nll=5.0)
    assert v.tokens == [5, 6, 7] and v.bonus == 2
    exact = verify_tolerant(prop, choice, logp, max_nll=-1.0)
    assert exact == verify_match(prop, choice)


def test_bild_is_lossy_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert not get_method("bild").lossless and get_method("sps").lossless
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("bild") and "[lossy]" in line for line in lines)
    assert any(line.startswith("sps") and "[lossless]" in line for line in lines)


def test_bild_without_tolerance_is_ar_and_with_it_keeps_more(tiny_model: Any, drafts: dict[str, str]) -> None:
    strict_steps = loose_steps = 0
    differs = 0
    for seed in range(6):
        prompt = tiny_prompt(seed)
        ref, _ = run_engine(tiny_model, prompt, "ar", SamplingParams(), 40)
        out, s1 = run_engine(tiny_model, prompt, "bild", SamplingParams(), 40, draft=drafts["weak"], rollback=-1.0, fallback=0.0)
        assert out == ref
        loose, s2 = run_engine(tiny_model, prompt, "bild", SamplingParams(), 40, draft=drafts["weak"], rollback=50.0, fallback=0.0)
        strict_steps += s1.steps
        loose_steps += s2.steps
        differs += loose != ref
    assert loose_steps < strict_steps and differs > 0


def test_bild_falls_back_to_the_target_when_the_draft_is_unsure(tiny_model: Any, drafts: dict[str, str]) -> None:
    """fallback=0.999: the draft is never that sure, so it proposes nothing and every step is the target's."""
    out, stats = run_engine(tiny_model, tiny_prompt(1), "bild", SamplingParams(), 20, draft=drafts["weak"], fallback=0.999)
    ref, _ = run_engine(tiny_model, tiny_prompt(1), "ar", SamplingParams(), 20)
    assert out == ref and stats.drafted == 0 and stats.steps == 20
    assert stats.draft_forwards == 19  # one per step but the last (a budget of one token: nothing to draft)


def test_sps_with_prompt_lookup_starts_from_the_match_and_stays_lossless(tiny_model: Any, drafts: dict[str, str]) -> None:
    drafter = make_drafter("sps", draft=drafts["weak"], lookup=6, adaptive=False)
    plain = make_drafter("sps", draft=drafts["weak"], adaptive=False)
    more = 0
    for seed in range(6):
        prompt = tiny_prompt(seed, length=24)
        ref, _ = run_engine(tiny_model, prompt, "ar", SamplingParams(), 40)
        out, s1 = run_engine(tiny_model, prompt, "sps", SamplingParams(), 40, drafter=drafter)
        _, s0 = run_engine(tiny_model, prompt, "sps", SamplingParams(), 40, drafter=plain)
        assert out == ref
        more += s1.drafted - s0.drafted
    assert more > 0  # matches add tokens to the draft model's own
    # rejection sampling cannot verify given tokens: lookup is skipped there, and the output keeps the distribution
    params = SamplingParams(temperature=1.0, seed=1, sampler="rejection")
    run_engine(tiny_model, tiny_prompt(0, length=24), "sps", params, 20, drafter=drafter)


def test_sps_with_a_draft_vocabulary_proposes_only_its_tokens(tiny_model: Any, tmp_path: Path) -> None:
    """A draft that keeps 6 of the 16 LM-head rows proposes only those tokens, and sps stays `ar`."""
    from fastdecode.drafters import DraftContext
    from fastdecode.drafters.sps import draft_model

    vocab = torch.tensor([0, 2, 3, 5, 8, 13])
    save_draft(init_draft(tiny_model, [0, 1]), tmp_path / "v", {"target": target_info(tiny_model)}, dtype=torch.float32, vocab=vocab)
    drafter = make_drafter("sps", draft=str(tmp_path / "v"), adaptive=False, num_draft=4)
    seen: set[int] = set()
    original = drafter.propose

    def spy(ctx: DraftContext) -> Proposal:
        p = original(ctx)
        seen.update(p.tokens)
        return p

    drafter.propose = spy  # type: ignore[method-assign]
    for seed in range(4):
        out, stats = run_engine(tiny_model, tiny_prompt(seed), "sps", SamplingParams(), 30, drafter=drafter)
        ref, _ = run_engine(tiny_model, tiny_prompt(seed), "ar", SamplingParams(), 30)
        assert out == ref
    assert seen and seen <= set(vocab.tolist())
    assert draft_model(tiny_model, str(tmp_path / "v")).lm_head.weight.shape == (6, tiny_model.cfg.hidden_size)
    params = SamplingParams(temperature=1.0, seed=2, sampler="rejection")  # q is zero outside the vocabulary
    run_engine(tiny_model, tiny_prompt(1), "sps", params, 20, drafter=make_drafter("sps", draft=str(tmp_path / "v")))
