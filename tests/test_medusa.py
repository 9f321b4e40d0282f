"""`medusa` (issue 12) on tiny models: heads on the target's last hidden state, their training and artifact.

Invariants: `medusa` returns `ar`'s tokens (a tree or a chain, greedy and Gumbel) and keeps the target's
distribution under rejection sampling (chi-square); the feature it drafts from each step is the target's
at the row that produced the pending token (each step's first drafted token equals head 0's argmax over a
fresh forward's feature); `train medusa` lowers the held-out KL and writes a kind="medusa" artifact.
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
from fastdecode.drafters.medusa import Medusa
from fastdecode.models.draft import MANIFEST, MedusaDraft, init_medusa, load_draft, save_draft, target_info
from fastdecode.sampling import SamplingParams
from fastdecode.train.draft import TrainSettings, hidden_states, train_draft


@pytest.fixture(scope="module")
def heads_dir(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Untrained Medusa heads for the tiny target, perturbed so that the heads differ from each other."""
    draft = init_medusa(tiny_model, 3)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for h in draft.heads:
            h.weight += 0.3 * torch.randn(h.weight.shape, generator=g)
    folder = tmp_path_factory.mktemp("medusa") / "m"
    save_draft(draft, folder, {"target": target_info(tiny_model)}, dtype=torch.float32)
    return str(folder)


@pytest.mark.parametrize(("adaptive", "width"), [(True, 8), (False, 8), (False, 1)])
def test_medusa_greedy_identical_to_ar(tiny_model: Any, heads_dir: str, adaptive: bool, width: int) -> None:
    drafter = make_drafter("medusa", draft=heads_dir, adaptive=adaptive, width=width, num_draft=3)
    accepted = 0
    for seed in range(6):
        ref, _ = run_engine(tiny_model, tiny_prompt(seed), "ar", SamplingParams(), 40)
        out, stats = run_engine(tiny_model, tiny_prompt(seed), "medusa", SamplingParams(), 40, drafter=drafter)
        assert out == ref
        accepted += stats.accepted
    assert accepted > 0


def test_medusa_gumbel_same_text_as_ar(tiny_model: Any, heads_dir: str) -> None:
    drafter = make_drafter("medusa", draft=heads_dir)
    for seed in range(4):
        params = SamplingParams(temperature=1.0, seed=seed)
        ref, _ = run_engine(tiny_model, tiny_prompt(seed), "ar", params, 30)
        out, _ = run_engine(tiny_model, tiny_prompt(seed), "medusa", params, 30, drafter=drafter)
        assert out == ref


def test_medusa_rejection_sampling_keeps_the_target_distribution(tiny_model: Any, heads_dir: str) -> None:
    drafter = make_drafter("medusa", draft=heads_dir, adaptive=False, num_draft=3)
    p, _, accepted = sample_joint(tiny_model, tiny_prompt(3), "medusa", drafter)
    assert accepted > 0
    assert p > 1e-3


Recording = recording(Medusa)


def test_medusa_drafts_from_the_feature_of_the_row_before_the_pending_token(tiny_model: Any, heads_dir: str) -> None:
    drafter = Recording(make_options(Medusa, {"draft": heads_dir, "adaptive": False, "num_draft": 3}))
    heads = load_draft(heads_dir, tiny_model, "medusa")
    accepted = 0
    for seed in range(3):
        drafter.seen = []
        _, stats = run_engine(tiny_model, tiny_prompt(seed), "medusa", SamplingParams(), 40, drafter=drafter)
        accepted += stats.accepted
        assert len(drafter.seen) >= stats.steps - 1
        for row in drafter.seen:
            tokens, first = row[:-1], row[-1]
            with torch.no_grad():
                f = hidden_states(tiny_model, torch.tensor([tokens[:-1]]))[0, -1]  # f_{n-2}: it produced the pending token
                assert int(heads.head_logits(f[None])[0, 0].argmax()) == first
    assert accepted > 0


def test_medusa_artifacts_and_options(tiny_model: Any, heads_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'medusa' artifact, this method needs a 'eagle' one"):
        make_options(get_method("eagle"), {"draft": heads_dir})
    with pytest.raises(ValueError, match="width"):
        make_options(get_method("medusa"), {"width": "0"})
    with pytest.raises(ValueError, match="fastdecode train medusa"):
        run_engine(tiny_model, tiny_prompt(0), "medusa", SamplingParams(), 4, drafter=make_drafter("medusa"))
    assert json.loads((Path(heads_dir) / MANIFEST).read_text())["num_heads"] == 3


def test_train_medusa_lowers_the_heldout_kl(target: Any, dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "medusa"
    settings = TrainSettings(kind="medusa", heads=3, steps=60, batch_tokens=512, max_len=64, lr=3e-3, warmup=5, eval_every=30,
                             save_every=30)
    m = train_draft(target, dataset, out, settings, "cmd", progress=False)
    first, last = m["evals"][0], m["evals"][-1]
    assert last["kl"] < 0.8 * first["kl"], m["evals"]
    saved = json.loads((out / MANIFEST).read_text())
    assert saved["kind"] == "medusa" and saved["num_heads"] == 3 and saved["num_layers"] == 0
    heads = load_draft(out, target, "medusa")
    assert isinstance(heads, MedusaDraft) and len(heads.heads) == 3
    prompt = [5, 9, 17, 3, 44, 12]
    ref, _ = run_engine(target, prompt, "ar", SamplingParams(), 24)
    got, _ = run_engine(target, prompt, "medusa", SamplingParams(), 24, drafter=make_drafter("medusa", draft=str(out)))
    assert got == ref
