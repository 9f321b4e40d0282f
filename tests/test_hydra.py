"""`hydra` (issue 12) on tiny models: sequentially dependent heads on the target's last hidden state.

Invariants: `hydra` returns `ar`'s tokens (a tree or a chain, greedy and Gumbel) and keeps the target's
distribution under rejection sampling (chi-square); every drafted node is among the `top_k` guesses of its
depth's head given the target's feature at the row that produced the pending token *and the node's own path*
(what makes Hydra heads sequentially dependent); `train hydra` lowers the held-out KL and writes a
kind="hydra" artifact that the other head methods refuse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_engine, sample_joint
from test_drafters import tiny_prompt
from test_train import dataset, target  # noqa: F401  (fixtures)

from fastdecode.drafters import get_method, make_drafter, make_options
from fastdecode.drafters.hydra import Hydra
from fastdecode.models.draft import MANIFEST, HydraDraft, init_heads, load_draft, save_draft, target_info
from fastdecode.sampling import SamplingParams
from fastdecode.train.draft import TrainSettings, hidden_states, train_draft


@pytest.fixture(scope="module")
def heads_dir(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Untrained Hydra heads for the tiny target, perturbed so that each head depends on the tokens it reads."""
    draft = init_heads(tiny_model, "hydra", 3)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for h in draft.heads:
            h.weight += 0.3 * torch.randn(h.weight.shape, generator=g)
    folder = tmp_path_factory.mktemp("hydra") / "h"
    save_draft(draft, folder, {"target": target_info(tiny_model)}, dtype=torch.float32)
    return str(folder)


@pytest.mark.parametrize(("adaptive", "width"), [(True, 8), (False, 8), (False, 1)])
def test_hydra_greedy_identical_to_ar(tiny_model: Any, heads_dir: str, adaptive: bool, width: int) -> None:
    drafter = make_drafter("hydra", draft=heads_dir, adaptive=adaptive, width=width, num_draft=3)
    accepted = 0
    for seed in range(6):
        ref, _ = run_engine(tiny_model, tiny_prompt(seed), "ar", SamplingParams(), 40)
        out, stats = run_engine(tiny_model, tiny_prompt(seed), "hydra", SamplingParams(), 40, drafter=drafter)
        assert out == ref
        accepted += stats.accepted
    assert accepted > 0


def test_hydra_gumbel_same_text_as_ar(tiny_model: Any, heads_dir: str) -> None:
    drafter = make_drafter("hydra", draft=heads_dir)
    for seed in range(4):
        params = SamplingParams(temperature=1.0, seed=seed)
        ref, _ = run_engine(tiny_model, tiny_prompt(seed), "ar", params, 30)
        out, _ = run_engine(tiny_model, tiny_prompt(seed), "hydra", params, 30, drafter=drafter)
        assert out == ref


def test_hydra_rejection_sampling_keeps_the_target_distribution(tiny_model: Any, heads_dir: str) -> None:
    drafter = make_drafter("hydra", draft=heads_dir, adaptive=False, num_draft=3)
    p, _, accepted = sample_joint(tiny_model, tiny_prompt(3), "hydra", drafter)
    assert accepted > 0
    assert p > 1e-3


class Recording(Hydra):
    name = "_hydra_recording"

    def __init__(self, options: Any):
        super().__init__(options)
        self.seen: list[tuple[list[int], Any]] = []

    def propose(self, ctx: Any) -> Any:
        p = super().propose(ctx)
        self.seen.append((list(ctx.tokens), p))
        return p


def test_hydra_nodes_come_from_their_depths_head_given_their_path(tiny_model: Any, heads_dir: str) -> None:
    top_k = 3
    drafter = Recording(make_options(Hydra, {"draft": heads_dir, "adaptive": False, "num_draft": 3, "width": 4, "top_k": top_k}))
    heads = load_draft(heads_dir, tiny_model, "hydra")
    deep = 0
    for seed in range(2):
        drafter.seen = []
        run_engine(tiny_model, tiny_prompt(seed), "hydra", SamplingParams(), 24, drafter=drafter)
        for tokens, proposal in drafter.seen[:4]:
            with torch.no_grad():
                f = hidden_states(tiny_model, torch.tensor([tokens[:-1]]))[0, -1:]  # f_{n-2}: it produced the pending token
            depths = proposal.depths()
            for j, tok in enumerate(proposal.tokens):
                path, node = [], proposal.parents[j]
                while node >= 0:
                    path.append(proposal.tokens[node])
                    node = proposal.parents[node]
                reads = torch.tensor([[tokens[-1], *path[::-1]]])
                with torch.no_grad():
                    guesses = heads.head_logits(depths[j] - 1, f, reads)[0].topk(top_k).indices.tolist()
                assert tok in guesses, (j, depths[j])
                deep += depths[j] > 1
    assert deep > 0


def test_hydra_head_reads_its_tokens(tiny_model: Any, heads_dir: str) -> None:
    heads = load_draft(heads_dir, tiny_model, "hydra")
    f = torch.randn(2, tiny_model.cfg.hidden_size)
    with torch.no_grad():
        a = heads.head_logits(1, f, torch.tensor([[3, 5], [3, 5]]))
        b = heads.head_logits(1, f, torch.tensor([[3, 5], [3, 6]]))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="reads 2 tokens"):
        heads.head_logits(1, f, torch.tensor([[3], [3]]))


def test_hydra_artifacts_and_options(tiny_model: Any, heads_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'hydra' artifact, this method needs a 'medusa' one"):
        make_options(get_method("medusa"), {"draft": heads_dir})
    with pytest.raises(ValueError, match="hydra: num_draft, width and top_k"):
        make_options(get_method("hydra"), {"top_k": "0"})
    with pytest.raises(ValueError, match="fastdecode train hydra"):
        run_engine(tiny_model, tiny_prompt(0), "hydra", SamplingParams(), 4, drafter=make_drafter("hydra"))
    assert json.loads((Path(heads_dir) / MANIFEST).read_text())["num_heads"] == 3
    with pytest.raises(ValueError, match="medusa or hydra"):
        init_heads(tiny_model, "eagle", 2)


def test_train_hydra_lowers_the_heldout_kl(target: Any, dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "hydra"
    settings = TrainSettings(kind="hydra", heads=3, steps=60, batch_tokens=512, max_len=64, lr=3e-3, warmup=5, eval_every=30,
                             save_every=30)
    m = train_draft(target, dataset, out, settings, "cmd", progress=False)
    first, last = m["evals"][0], m["evals"][-1]
    assert last["kl"] < 0.8 * first["kl"], m["evals"]
    saved = json.loads((out / MANIFEST).read_text())
    assert saved["kind"] == "hydra" and saved["num_heads"] == 3 and saved["num_layers"] == 0
    heads = load_draft(out, target, "hydra")
    assert isinstance(heads, HydraDraft) and [h.weight.shape[1] for h in heads.heads] == [
        (k + 2) * target.cfg.hidden_size for k in range(3)]
    prompt = [5, 9, 17, 3, 44, 12]
    ref, _ = run_engine(target, prompt, "ar", SamplingParams(), 24)
    got, _ = run_engine(target, prompt, "hydra", SamplingParams(), 24, drafter=make_drafter("hydra", draft=str(out)))
    assert got == ref
