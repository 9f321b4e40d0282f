"""Training drafters (issue 11): batched generation, `fastdecode train data`, `fastdecode train draft`,
draft artifacts. Tiny random models on the CPU: what is tested is behaviour, not quality.

Invariants: a left-padded batch answers each prompt as `ar` does (fp32, no ties on a tiny model); a
dataset holds the prompts and the target's greedy answers, split into held-out and train shards whose
sha256 the manifest records; a rerun resumes without redoing shards and refuses other settings; training
lowers the held-out KL; an artifact holds only the draft's own weights and loads back only onto its target.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model, run_engine, tiny_config

from fastdecode.cli import main
from fastdecode.engine import Engine
from fastdecode.models.draft import MANIFEST, WEIGHTS, init_draft, load_draft, same_target, save_draft, target_info
from fastdecode.sampling import SamplingParams
from fastdecode.train.data import DataSettings, build_dataset, first_turns, load_split, read_manifest, read_shard
from fastdecode.train.draft import TrainSettings, train_draft

VOCAB = 64
EOS = 3


@pytest.fixture(scope="module")
def target() -> Any:
    return make_tiny_model(tiny_config(vocab_size=VOCAB), seed=0, logit_scale=6.0)


def fake_chat(messages: list[dict[str, str]]) -> list[int]:
    """A stand-in tokenizer: characters to ids, a fixed 'assistant' header."""
    text = messages[-1]["content"]
    return [1, *[4 + ord(c) % (VOCAB - 4) for c in text][:24], 2]


def conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega"]
    return [
        {"id": f"c{i}", "conversations": [{"from": "human", "value": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))},
                                          {"from": "gpt", "value": "an answer"}]}
        for i in range(n)
    ]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "convs.json"
    path.write_text(json.dumps(conversations(30)))
    return path


# ------------------------------------------------------------------ batched generation


@pytest.mark.parametrize("prefill_rows", [128, 4])
def test_generate_batch_answers_like_ar(target: Any, prefill_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import fastdecode.engine

    monkeypatch.setattr(fastdecode.engine, "PREFILL_ROWS", prefill_rows)  # 4: the prompts prefill in two groups
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 18))] for _ in range(6)]
    engine = Engine(target)
    answers = engine.generate_batch(prompts, 24, frozenset({EOS}))
    for p, a in zip(prompts, answers, strict=True):
        ref, _ = run_engine(target, p, "ar", SamplingParams(), 24, eos_ids=[EOS])
        assert a == ref


def test_key_mask_of_the_wrong_shape_is_refused(target: Any) -> None:
    cache = target.new_cache(batch=2, length=8)
    with pytest.raises(ValueError, match="key_mask"):
        target(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), cache, key_mask=torch.ones(2, 2, dtype=torch.bool))


# ------------------------------------------------------------------ train data


def test_first_turns_reads_json_truncated_json_and_jsonl(tmp_path: Path) -> None:
    convs = conversations(5)
    convs[1]["conversations"][0]["value"] = "line\u2028separator inside"
    full = tmp_path / "a.json"
    full.write_text(json.dumps(convs))
    cut = tmp_path / "b.json"
    cut.write_text(json.dumps(convs)[:-40])  # the packaged ShareGPT file ends mid-object
    lines = tmp_path / "c.jsonl"
    lines.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs))
    messages = tmp_path / "d.jsonl"
    messages.write_text(json.dumps({"id": "m", "messages": [{"role": "user", "content": "hello"}]}) + "\n")
    want = [(c["id"], c["conversations"][0]["value"]) for c in convs]
    assert first_turns(full) == want == first_turns(lines)
    assert first_turns(cut) == want[:4]
    assert first_turns(messages) == [("m", "hello")]


def test_train_data_writes_splits_and_resumes(target: Any, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    settings = DataSettings(source=str(source), count=10, held_out=2, max_new_tokens=12, batch_size=3, shard_size=4)
    info = target_info(target)
    m = build_dataset(out, Engine(target), fake_chat, frozenset({EOS}), settings, info, "cmd", progress=False)
    assert m["complete"] and m["sequences"] == 10 and len(m["held_out_ids"]) == 2
    assert [(s["file"], s["sequences"]) for s in m["shards"]] == [("heldout-00000.safetensors", 2), ("train-00000.safetensors", 4),
                                                                  ("train-00001.safetensors", 4)]
    held, train = load_split(out, "heldout"), load_split(out, "train")
    assert len(held) == 2 and len(train) == 8
    prompts = {tuple(fake_chat([{"role": "user", "content": c["conversations"][0]["value"]}])) for c in conversations(30)}
    for ids, plen in held + train:  # the prompt, then the target's own greedy answer
        assert tuple(ids[:plen]) in prompts
        ref, _ = run_engine(target, ids[:plen], "ar", SamplingParams(), 12, eos_ids=[EOS])
        assert ids[plen:] == ref
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    again = build_dataset(out, Engine(target), fake_chat, frozenset({EOS}), settings, info, "cmd", progress=False)
    assert again["data_sha256"] == m["data_sha256"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == stamps  # nothing redone
    with pytest.raises(ValueError, match="settings"):
        build_dataset(out, Engine(target), fake_chat, frozenset({EOS}), DataSettings(**{**settings.__dict__, "seed": 1}), info,
                      progress=False)
    shard = out / "train-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="sha256"):
        load_split(out, "train")


def test_train_data_resumes_after_an_interruption(target: Any, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    settings = DataSettings(source=str(source), count=9, held_out=1, max_new_tokens=6, batch_size=4, shard_size=4)
    full = build_dataset(tmp_path / "whole", Engine(target), fake_chat, frozenset({EOS}), settings, target_info(target), progress=False)
    m = build_dataset(out, Engine(target), fake_chat, frozenset({EOS}), settings, target_info(target), progress=False)
    # as if cut off after the first two shards: the manifest lists only those
    manifest = read_manifest(out)
    manifest["shards"] = manifest["shards"][:2]
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / m["shards"][2]["file"]).unlink()
    resumed = build_dataset(out, Engine(target), fake_chat, frozenset({EOS}), settings, target_info(target), progress=False)
    assert resumed["complete"] and resumed["data_sha256"] == full["data_sha256"]
    assert read_shard(out / "train-00001.safetensors") == read_shard(tmp_path / "whole" / "train-00001.safetensors")


def test_train_data_refuses_too_few_prompts(target: Any, source: Path, tmp_path: Path) -> None:
    settings = DataSettings(source=str(source), count=31, held_out=1, max_new_tokens=4)
    with pytest.raises(ValueError, match="only 30 usable"):
        build_dataset(tmp_path / "d", Engine(target), fake_chat, frozenset(), settings, target_info(target), progress=False)
    with pytest.raises(ValueError, match="held_out"):
        DataSettings(count=5, held_out=5).validate()


# ------------------------------------------------------------------ train draft and artifacts


@pytest.fixture(scope="module")
def dataset(target: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    src = folder / "convs.json"
    src.write_text(json.dumps(conversations(60, seed=3)))
    settings = DataSettings(source=str(src), count=60, held_out=8, max_new_tokens=24, batch_size=16, shard_size=32)
    build_dataset(folder / "data", Engine(target), fake_chat, frozenset({EOS}), settings, target_info(target), progress=False)
    return folder / "data"


def test_train_draft_lowers_the_heldout_kl_and_writes_an_artifact(target: Any, dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "draft"
    settings = TrainSettings(layers=1, steps=80, batch_tokens=512, max_len=64, lr=3e-3, warmup=5, eval_every=40, save_every=40)
    m = train_draft(target, dataset, out, settings, "cmd", progress=False)
    first, last = m["evals"][0], m["evals"][-1]
    assert first["step"] == 0 and last["step"] == 80
    assert last["kl"] < 0.7 * first["kl"], m["evals"]
    assert last["agreement"] >= first["agreement"]
    assert {WEIGHTS, MANIFEST, "training.png", "history.json", "checkpoint.pt"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / MANIFEST).read_text())
    assert saved["num_layers"] == 1 and saved["init_layers"] == [0] and saved["steps"] == 80
    assert saved["data"]["sha256"] == read_manifest(dataset)["data_sha256"]
    from safetensors.torch import load_file

    saved_state = load_file(str(out / WEIGHTS))
    assert all(k.startswith(("layers.0.", "norm.", "draft_vocab")) for k in saved_state)  # no embedding, no LM head
    seen = {t for ids, plen in load_split(dataset, "train") for t in ids[plen:]}
    assert set(saved_state["draft_vocab"].tolist()) == seen  # fewer than 8192 distinct answer tokens: all of them
    assert 0 < saved["metrics"]["heldout_answer_tokens_in_draft_vocab"] <= 1
    draft = load_draft(out, target)
    assert draft.embed_tokens is target.embed_tokens and draft.lm_head.weight.shape[0] == len(seen)
    torch.testing.assert_close(draft.lm_head.weight, target.lm_head.weight[saved_state["draft_vocab"]])
    # resuming a finished run trains no further and gives the same weights
    m2 = train_draft(target, dataset, out, settings, "cmd", resume=True, progress=False)
    assert m2["steps"] == 80


def test_load_draft_refuses_another_target_and_broken_folders(target: Any, tmp_path: Path) -> None:
    draft = init_draft(target, [1])
    save_draft(draft, tmp_path / "d", {"target": target_info(target)})
    assert load_draft(tmp_path / "d", target).cfg.num_layers == 1
    other = make_tiny_model(tiny_config(vocab_size=VOCAB), seed=5)
    assert same_target(target_info(target), other) is not None
    with pytest.raises(ValueError, match="another target"):
        load_draft(tmp_path / "d", other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_draft(tmp_path / "nothing", target)
    (tmp_path / "d" / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        load_draft(tmp_path / "d", target)
    with pytest.raises(ValueError, match="init layers"):
        init_draft(target, [7])


def test_draft_vocabulary_keeps_the_most_frequent_answer_tokens() -> None:
    from fastdecode.models.draft import draft_vocabulary

    seqs = [([9, 9, 9, 1, 1, 2, 5], 3), ([8, 1, 2, 7], 1)]  # answers: 1 1 2 5 | 1 2 7 -> 1:3, 2:2, 5:1, 7:1
    assert draft_vocabulary(seqs, 2).tolist() == [1, 2]
    assert draft_vocabulary(seqs, 3).tolist() == [1, 2, 5]  # a tie goes to the lower id
    assert draft_vocabulary(seqs, 99).tolist() == [1, 2, 5, 7]


def test_target_info_is_dtype_independent(target: Any) -> None:
    import copy

    half = copy.deepcopy(target).to(torch.bfloat16)
    assert same_target(target_info(target), half) is None


def test_train_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "draft", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no manifest.json" in err
    assert main(["train", "data", "--out", str(tmp_path / "o"), "--source", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "data", "--out", str(tmp_path / "o"), "--count", "3", "--held-out", "3"]) == 2
    assert "held_out" in capsys.readouterr().err
    assert main(["train", "draft", "--data", "x", "--out", "y", "--init-layers", "a,b"]) == 2


def test_batches_fit_the_token_budget_and_cover_the_epoch() -> None:
    from fastdecode.train.draft import batches, lr_at

    rng = random.Random(0)
    seqs = [([1] * rng.randint(2, 90), 1) for _ in range(200)]
    settings = TrainSettings(batch_tokens=256, max_len=64, warmup=10, steps=110, lr=1e-3, min_lr_ratio=0.1)
    epoch = batches(seqs, settings, random.Random(1))
    assert sorted(i for b in epoch for i in b) == list(range(200))
    assert all(len(b) * min(64, max(len(seqs[i][0]) for i in b)) <= 256 for b in epoch)
    assert lr_at(0, settings) == pytest.approx(1e-4) and lr_at(9, settings) == pytest.approx(1e-3)
    assert lr_at(110, settings) == pytest.approx(1e-4)  # the end of the cosine: min_lr_ratio
    timed = TrainSettings(steps=10**6, warmup=0, time_limit=100.0, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(5, timed, elapsed=100.0) == pytest.approx(1e-4)  # cut short by the clock: decayed all the same
