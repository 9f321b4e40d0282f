"""`eagle` (issue 12) on tiny models: the drafter on the target's features, its training and its artifact.

Invariants: `eagle` returns `ar`'s tokens (greedy and Gumbel) and keeps the target's distribution under
rejection sampling (chi-square); the features the engine hands it (prompt, pending and accepted rows) and
the rows its cache keeps are those a fresh forward computes (each step's first drafted token equals the
one drafted from scratch); `train eagle` lowers the held-out KL and writes a kind="eagle" artifact that
`sps` refuses, as `eagle` refuses a draft model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import recording, run_engine, sample_joint
from test_drafters import tiny_prompt
from test_train import dataset, target  # noqa: F401  (fixtures)

from fastdecode.drafters import get_method, make_drafter, make_options
from fastdecode.drafters.eagle import Eagle
from fastdecode.engine import Engine
from fastdecode.models.draft import MANIFEST, WEIGHTS, FeatureDraft, init_draft, init_eagle, load_draft, save_draft, target_info
from fastdecode.sampling import SamplingParams
from fastdecode.train.draft import LayerCaches, TrainSettings, hidden_states, train_draft


@pytest.fixture(scope="module")
def eagle_dir(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained EAGLE drafter for the tiny target (layer 0, its fc perturbed so it reads the features too)."""
    draft = init_eagle(tiny_model, [0])
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        draft.fc.weight[:, : draft.cfg.hidden_size] += 0.05 * torch.randn(draft.cfg.hidden_size, draft.cfg.hidden_size, generator=g)
    folder = tmp_path_factory.mktemp("eagle") / "e"
    save_draft(draft, folder, {"target": target_info(tiny_model)}, dtype=torch.float32)
    return str(folder)


@pytest.mark.parametrize(("adaptive", "width"), [(True, 8), (False, 8), (False, 1)])
def test_eagle_greedy_identical_to_ar(tiny_model: Any, eagle_dir: str, adaptive: bool, width: int) -> None:
    """Greedy drafts a tree (width 8) or a chain (width 1); either way the output is ar's."""
    drafter = make_drafter("eagle", draft=eagle_dir, adaptive=adaptive, width=width)
    engine = Engine(tiny_model)
    accepted = 0
    for seed in range(6):
        prompt = tiny_prompt(seed)
        ref, _ = run_engine(tiny_model, prompt, "ar", SamplingParams(), 40, engine=engine)
        out, stats = run_engine(tiny_model, prompt, "eagle", SamplingParams(), 40, engine=engine, drafter=drafter)
        assert out == ref
        accepted += stats.accepted
    assert accepted > 0


def test_eagle_gumbel_same_text_as_ar(tiny_model: Any, eagle_dir: str) -> None:
    drafter = make_drafter("eagle", draft=eagle_dir)
    for seed in range(4):
        params = SamplingParams(temperature=1.0, seed=seed)
        ref, _ = run_engine(tiny_model, tiny_prompt(seed), "ar", params, 30)
        out, _ = run_engine(tiny_model, tiny_prompt(seed), "eagle", params, 30, drafter=drafter)
        assert out == ref


def test_eagle_rejection_sampling_keeps_the_target_distribution(tiny_model: Any, eagle_dir: str) -> None:
    p, _, accepted = sample_joint(tiny_model, tiny_prompt(3), "eagle", make_drafter("eagle", draft=eagle_dir, adaptive=False, num_draft=3))
    assert accepted > 0
    assert p > 1e-3


Recording = recording(Eagle)


def test_eagle_reads_the_targets_features_and_keeps_the_right_rows(tiny_model: Any, eagle_dir: str) -> None:
    """Each step's first drafted token is the one a fresh forward over the target's features of all committed
    tokens gives: the prompt's features (prefill), the pending and accepted rows' (each step) and the
    cache rows kept across steps are the right ones (a stale or missing one would change the argmax)."""
    drafter = Recording(make_options(Eagle, {"draft": eagle_dir, "adaptive": False, "num_draft": 4}))
    model = load_draft(eagle_dir, tiny_model, "eagle")
    accepted = 0
    for seed in range(3):
        drafter.seen = []
        _, stats = run_engine(tiny_model, tiny_prompt(seed), "eagle", SamplingParams(), 40, drafter=drafter)
        accepted += stats.accepted
        assert len(drafter.seen) >= stats.steps - 1  # the last step may have no budget left for a draft
        for row in drafter.seen:
            tokens, first = row[:-1], row[-1]
            ids = torch.tensor([tokens[:-1]])
            with torch.no_grad():
                f = hidden_states(tiny_model, ids)  # f_0 .. f_{n-2}
                cache = LayerCaches(model, 1, len(tokens) - 1, model.dtype)
                pos = torch.arange(len(tokens) - 1)[None]
                logits, _ = model(torch.tensor([tokens[1:]]), pos, cache, num_logits=1, features=f)
            assert int(logits[0, -1].argmax()) == first
    assert accepted > 0


def test_eagle_and_sps_refuse_each_others_artifacts(tiny_model: Any, eagle_dir: str, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    save_draft(init_draft(tiny_model, [0]), plain, {"target": target_info(tiny_model)})
    with pytest.raises(ValueError, match="'draft' artifact, this method needs a 'eagle' one"):
        make_options(get_method("eagle"), {"draft": str(plain)})
    with pytest.raises(ValueError, match="'eagle' artifact, this method needs a 'draft' one"):
        make_options(get_method("sps"), {"draft": eagle_dir})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_options(get_method("eagle"), {"draft": str(tmp_path / "none")})
    drafter = make_drafter("eagle")  # none ships for a tiny random target
    with pytest.raises(ValueError, match="fastdecode train eagle"):
        run_engine(tiny_model, tiny_prompt(0), "eagle", SamplingParams(), 4, drafter=drafter)
    manifest = json.loads((Path(eagle_dir) / MANIFEST).read_text())
    assert manifest["kind"] == "eagle"


def test_feature_draft_needs_features(tiny_model: Any) -> None:
    draft = init_eagle(tiny_model, [0])
    cache = draft.new_cache(batch=1, length=8)
    with pytest.raises(ValueError, match="features"):
        draft(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), cache)


def test_train_eagle_lowers_the_heldout_kl_and_writes_an_artifact(target: Any, dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "eagle"
    settings = TrainSettings(kind="eagle", layers=1, steps=80, batch_tokens=512, max_len=64, lr=3e-3, warmup=5, eval_every=40,
                             save_every=40, unroll=2)
    m = train_draft(target, dataset, out, settings, "cmd", progress=False)
    first, last = m["evals"][0], m["evals"][-1]
    assert last["kl"] < 0.7 * first["kl"], m["evals"]
    assert last["agreement"] >= first["agreement"]
    saved = json.loads((out / MANIFEST).read_text())
    assert saved["kind"] == "eagle" and saved["num_layers"] == 1 and saved["settings"]["unroll"] == 2
    from safetensors.torch import load_file

    assert {k.split(".")[0] for k in load_file(str(out / WEIGHTS))} == {"fc", "layers", "norm", "draft_vocab"}
    draft = load_draft(out, target, "eagle")
    assert isinstance(draft, FeatureDraft) and draft.embed_tokens is target.embed_tokens
    with pytest.raises(ValueError, match="needs a 'draft' one"):
        load_draft(out, target)
    # it drafts for its target, losslessly
    prompt = [5, 9, 17, 3, 44, 12]
    ref, _ = run_engine(target, prompt, "ar", SamplingParams(), 24)
    got, _ = run_engine(target, prompt, "eagle", SamplingParams(), 24, drafter=make_drafter("eagle", draft=str(out)))
    assert got == ref


def test_auto_hands_the_prompt_features_to_a_feature_arm() -> None:
    auto = make_drafter("auto", arms=("eagle", "ar"))
    assert auto.features
    auto.reset([1, 2, 3, 4])  # an untried arm first: eagle
    arm = auto.arms["eagle"]  # type: ignore[attr-defined]
    with torch.inference_mode():
        auto.prefill(torch.ones(3, 8))
    assert isinstance(arm, Eagle) and arm.known == 3
    assert not make_drafter("auto", arms=("pld", "ar")).features
