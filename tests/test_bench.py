"""`fastdecode bench` on a tiny random model: rows, exactness, resume, peers, summaries and reports.

Fast (no checkpoint): a 2-layer random Llama, a byte-level stand-in tokenizer and a 3-prompt workload
(one two-turn MT-bench prompt, one chat prompt, one raw completion). Assertions are about behaviour,
never about timings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fastdecode.api import Generation, Generator
from fastdecode.bench import peers as peers_mod
from fastdecode.bench import workloads as workloads_mod
from fastdecode.bench.cli import method_specs, select_rows
from fastdecode.bench.metrics import OVERALL, failing_methods, speedup, summarize
from fastdecode.bench.plots import write_plots
from fastdecode.bench.report import render_markdown, write_outputs
from fastdecode.bench.runner import RESULTS, TIMING_FIELDS, BenchSettings, MethodSpec, Turn, run_bench, with_reference
from fastdecode.bench.workloads import MULTI_TURN, BenchPrompt, Workload, jsonl, load_workload
from fastdecode.cli import main
from fastdecode.drafters.ar import AutoRegressive
from fastdecode.drafters.base import _REGISTRY, register
from fastdecode.exactness import first_divergence, is_numeric_tie
from fastdecode.models.llama import LlamaModel, ModelConfig

EOS, USER, ASSISTANT, END = 256, 257, 258, 259


class ByteTokenizer:
    """A stand-in for fastdecode.tokenizer.Tokenizer: bytes are tokens, four special ids frame a chat."""

    eos_ids = frozenset({EOS, END})
    has_chat_template = True
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [USER if m["role"] == "user" else ASSISTANT, *self.encode(m["content"]), END]
        return [*ids, ASSISTANT]

    def decode(self, ids: list[int]) -> str:
        return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on several threads of a busy machine are slower, not faster (and timings are never asserted)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_generator(cls: type[Generator] = Generator) -> Generator:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, max_position=1024)
    model = LlamaModel(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked logits: top-2 gaps far above fp32 rounding
    return cls(model.eval(), ByteTokenizer())  # type: ignore[arg-type]


WORKLOAD = Workload("tiny", (
    BenchPrompt("w1", "writing", ("Write a haiku about the sea.", "Now make it rhyme.")),
    BenchPrompt("s1", "summarization", ("Summarize: the cat sat on the mat. The cat sat on the mat again.",)),
    BenchPrompt("c1", "humaneval", ("def add(a, b):\n    return",), raw=True),
))
SETTINGS = BenchSettings(with_reference([MethodSpec("pld"), MethodSpec("_self")]), max_new_tokens=12, warmup=0)
# pld's adaptive draft length follows measured step times (and the requests before): only a fixed draft
# gives the same steps and drafts in a run and its resumption (the tokens are the same either way)
FIXED = BenchSettings(with_reference([MethodSpec("pld", (("adaptive", "false"),)), MethodSpec("_self")]), max_new_tokens=12, warmup=0)
RECORD = {"provenance": {"commit": "test", "machine": "test", "device": "cpu", "dtype": "fp32", "threads": 1, "torch": "x",
                         "fastdecode": "x"},
          "setup": {"model": "tiny", "workload": "tiny", "max_new_tokens": 12, "temperature": 0.0, "seed": 0, "top_logits": 8}}


class CountingGenerator(Generator):
    """Counts generate calls per method; raises KeyboardInterrupt after `stop_after` calls (an interruption)."""

    calls: list[str]
    stop_after: int | None = None

    def generate(self, prompt: Any, method: str = "pld", **kwargs: Any) -> Generation:
        self.calls = getattr(self, "calls", [])
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append(method)
        return super().generate(prompt, method, **kwargs)


def non_timing(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}


def run(tmp_path: Path, gen: Generator | None = None, settings: BenchSettings = SETTINGS, **kw: Any) -> list[dict[str, Any]]:
    return run_bench(gen or tiny_generator(), WORKLOAD, settings, tmp_path, RECORD, progress=False, **kw)


# ---------------------------------------------------------------- the tie rule


def test_tie_rule() -> None:
    ref_top = [([5, 6], [3.0, 1.0]), ([7, 8], [2.0, 1.99995])]
    same = first_divergence([5, 7], [5, 7], ref_top, ref_top)
    assert same is None
    # position 1: ar chose 7, the method 8; the gap (5e-5) is below the paths' logit difference (1e-4): a tie
    tie = first_divergence([5, 7], [5, 8], ref_top, [([5, 6], [3.0, 1.0]), ([8, 7], [2.0, 1.9999])])
    assert tie is not None and tie.position == 1 and tie.tie
    assert tie.gap == pytest.approx(5e-5) and tie.logit_diff == pytest.approx(1e-4)
    # the same choice with identical logits is no tie: nothing rounded differently
    assert not first_divergence([5, 7], [5, 8], ref_top, ref_top).tie  # type: ignore[union-attr]
    # a token outside the reference's top-k, a length difference, missing logits: never a tie
    assert not first_divergence([5, 7], [5, 9], ref_top, ref_top).tie  # type: ignore[union-attr]
    short = first_divergence([5, 7], [5], ref_top, ref_top)
    assert short is not None and short.position == 1 and short.other_token is None and not short.tie
    assert not first_divergence([5, 7], [5, 8]).tie  # type: ignore[union-attr]
    assert is_numeric_tie(0.1, 0.2) and not is_numeric_tie(0.2, 0.1) and not is_numeric_tie(None, 1.0)


def test_row_invariant_runs_flag_even_a_numeric_tie() -> None:
    """Our own method on row-invariant forwards must be bit-identical: a tie is flagged there; a peer (another
    engine) or a run without row invariance keeps the tie rule."""
    from fastdecode.bench.runner import Turn, _exactness
    from fastdecode.engine import GenerationStats

    ref = {"token_ids": [[5, 7]], "reference_top": [[[5, 6], [3.0, 1.0]], [[7, 8], [2.0, 1.99995]]]}
    st = GenerationStats()
    st.top_logits = [([5, 6], [3.0, 1.0]), ([8, 7], [2.0, 1.9999])]
    turn = Turn((1,), (5, 8), 0.1, st)
    loose = _exactness([turn], ref, greedy=True, lossless=True)
    strict = _exactness([turn], ref, greedy=True, lossless=True, strict=True)
    assert loose["divergence"]["tie"] and not loose["flag"]
    assert strict["divergence"]["tie"] and strict["flag"]


# ---------------------------------------------------------------- runner, metrics, reports


def test_rows_summary_and_reports(tmp_path: Path) -> None:
    gen = tiny_generator(CountingGenerator)
    rows = run(tmp_path, gen)
    assert [(r["prompt_id"], r["method"]) for r in rows] == [(p.id, m) for p in WORKLOAD.prompts for m in ("ar", "pld", "_self")]
    assert gen.calls == ["ar", "ar", "pld", "pld", "_self", "_self"] + ["ar", "pld", "_self"] * 2  # interleaved per prompt
    on_disk = [json.loads(line) for line in (tmp_path / RESULTS).read_text().splitlines()]
    assert on_disk == rows
    for r in rows:
        assert r["error"] is None
        assert r["new_tokens"] == sum(len(t) for t in r["token_ids"]) > 0
        assert r["mat"] == pytest.approx(r["new_tokens"] / r["steps"], abs=1e-4)
        assert sum(r["accepted_hist"]) == r["steps"] and r["peak_bytes"] > 0
        assert r["exact"] is True and not r["flag"], r["divergence"]  # lossless methods, peaked logits
        assert r["provenance"] == RECORD["provenance"]
    by = {(r["prompt_id"], r["method"]): r for r in rows}
    assert by[("w1", "ar")]["turns"] == 2 and by[("w1", "ar")]["group"] == MULTI_TURN
    assert by[("s1", "pld")]["group"] == "summarization"
    assert by[("w1", "_self")]["mat"] > 1.0  # the target drafting for itself is always accepted

    summary = summarize(rows)
    assert summary["groups"] == [MULTI_TURN, "summarization", "humaneval"]
    assert summary[OVERALL]["ar"]["speedup"] == 1.0 and summary[OVERALL]["ar"]["mat"] == 1.0
    assert summary[OVERALL]["pld"]["exact_match"] == 1.0 and failing_methods(summary) == []
    assert summary["by_category"]["writing"]["pld"]["prompts"] == 1
    assert sum(summary[OVERALL]["_self"]["accepted_per_step"]) == sum(by[(p.id, "_self")]["steps"] for p in WORKLOAD.prompts)

    plots = write_plots(summary, tmp_path, "tiny")
    meta = {**RECORD, "command": "fastdecode bench --model tiny", "date": "today", "prompts": 3, "warmup": 0}
    write_outputs(tmp_path, summary, meta, plots)
    report = (tmp_path / "report.md").read_text()
    assert "| method | multi-turn conversation | summarization | humaneval | overall |" in report
    assert "fastdecode bench --model tiny" in report and "**FAIL**" not in report
    assert json.loads((tmp_path / "summary.json").read_text())["methods"] == ["ar", "pld", "_self"]
    for p in plots:
        assert Path(p).read_bytes()[:4] == b"\x89PNG"

    # --report-only: the same rows summarized again, here only the summarization prompt, with no model loaded
    assert main(["bench", "--report-only", str(tmp_path), "--out", str(tmp_path / "again"), "--categories", "summarization"]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["groups"] == ["summarization"] and again["meta"]["command"] == "fastdecode bench --model tiny"
    assert again[OVERALL]["pld"]["new_tokens"] == by[("s1", "pld")]["new_tokens"]
    assert "summarized from its rows by" not in report and (tmp_path / "again" / "report.md").is_file()


def test_second_turn_follows_own_first_answer(tmp_path: Path) -> None:
    class Recording(Generator):
        prompts: list[list[int]] = []

        def generate(self, prompt: Any, method: str = "pld", **kwargs: Any) -> Generation:
            self.prompts.append(list(prompt))
            return super().generate(prompt, method, **kwargs)

    gen = tiny_generator(Recording)
    one = Workload("one", WORKLOAD.prompts[:1])
    rows = run_bench(gen, one, BenchSettings((MethodSpec("ar"),), max_new_tokens=8, warmup=0), tmp_path, RECORD, progress=False)
    tok = ByteTokenizer()
    first_answer = [t for t in rows[0]["token_ids"][0] if t not in tok.eos_ids]
    expected = tok.chat([
        {"role": "user", "content": one.prompts[0].turns[0]},
        {"role": "assistant", "content": tok.decode(first_answer)},
        {"role": "user", "content": one.prompts[0].turns[1]},
    ])
    assert gen.prompts[1] == expected


def test_resume_runs_nothing_twice_and_gives_the_same_rows(tmp_path: Path) -> None:
    clean = run(tmp_path / "clean", settings=FIXED)

    broken = tiny_generator(CountingGenerator)
    broken.stop_after = 5  # ar and pld on the two-turn prompt, then one turn of _self
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", broken, FIXED)
    assert len((tmp_path / "resumed" / RESULTS).read_text().splitlines()) == 2
    with (tmp_path / "resumed" / RESULTS).open("a") as f:
        f.write('{"prompt_id": "w1", "meth')  # a row cut short by the interruption

    again = tiny_generator(CountingGenerator)
    rows = run(tmp_path / "resumed", again, FIXED, resume=True)
    assert again.calls == ["_self", "_self"] + ["ar", "pld", "_self"] * 2  # only what was missing
    assert [non_timing(r) for r in rows] == [non_timing(r) for r in clean]
    again.calls = []
    assert run(tmp_path / "resumed", again, FIXED, resume=True) == rows and again.calls == []


def test_resume_refuses_other_provenance_and_overwrite(tmp_path: Path) -> None:
    one = Workload("one", WORKLOAD.prompts[1:2])
    settings = BenchSettings((MethodSpec("ar"),), max_new_tokens=4, warmup=0)
    run_bench(tiny_generator(), one, settings, tmp_path, RECORD, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        run_bench(tiny_generator(), one, settings, tmp_path, RECORD, progress=False)
    other = {**RECORD, "provenance": {**RECORD["provenance"], "dtype": "bf16"}}
    with pytest.raises(ValueError, match="dtype: 'fp32' there, 'bf16' now"):
        run_bench(tiny_generator(), one, settings, tmp_path, other, progress=False, resume=True)


# ---------------------------------------------------------------- exactness catches a wrong method


@pytest.fixture
def tampered_method():
    """A method that claims to be lossless but changes one token of what the engine produced."""

    @register
    class Tampered(AutoRegressive):
        name = "_tampered"
        description = "test only: plain decoding with one output token changed"
        lossless = True

    yield Tampered.name
    _REGISTRY.pop(Tampered.name)


class TamperingGenerator(Generator):
    def generate(self, prompt: Any, method: str = "pld", **kwargs: Any) -> Generation:
        gen = super().generate(prompt, method, **kwargs)
        if method == "_tampered" and len(gen.token_ids) > 2:
            gen.token_ids[2] = (gen.token_ids[2] + 1) % 256
        return gen


def test_exact_match_catches_a_wrong_method(tmp_path: Path, tampered_method: str) -> None:
    settings = BenchSettings(with_reference([MethodSpec("pld"), MethodSpec(tampered_method)]), max_new_tokens=8, warmup=0)
    rows = run(tmp_path, tiny_generator(TamperingGenerator), settings)
    bad = [r for r in rows if r["method"] == tampered_method]
    assert bad and all(r["exact"] is False and r["flag"] for r in bad)
    assert all(r["divergence"]["position"] == 2 and not r["divergence"]["tie"] for r in bad)
    assert not any(r["flag"] for r in rows if r["method"] != tampered_method)
    summary = summarize(rows)
    assert failing_methods(summary) == [tampered_method]
    assert summary[OVERALL][tampered_method]["exact_match"] == 0.0
    meta = {**RECORD, "command": "x", "date": "today", "prompts": 3, "warmup": 0}
    assert "**FAIL**" in render_markdown(summary, meta, [])


# ---------------------------------------------------------------- peers


class EchoPeer:
    """A peer that answers what our ar answers (through the same model): exact match expected."""

    label = "echo"

    def __init__(self, gen: Generator):
        self.gen = gen

    def complete(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Turn:
        out = self.gen.generate(prompt_ids, "ar", max_new_tokens=max_new_tokens)
        return Turn(tuple(prompt_ids), tuple(out.token_ids), out.stats.wall_s)


class BrokenPeer:
    label = "broken"

    def complete(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Turn:
        raise RuntimeError("peer crashed")


def test_missing_peer_is_skipped_and_peer_rows_are_compared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(peers_mod.PEER_TOOLS, "llamacpp", ("fastdecode_no_such_module",))
    notices: list[str] = []
    setup = peers_mod.PeerSetup(None, torch.float32, torch.device("cpu"), 1, frozenset({EOS}), 1024)  # type: ignore[arg-type]
    assert peers_mod.make_peers(["llamacpp"], setup, notices.append) == []
    assert len(notices) == 1 and "llamacpp skipped" in notices[0] and "fastdecode[peers]" in notices[0]
    with pytest.raises(ValueError, match="unknown peer"):
        peers_mod.make_peers(["nope"], setup, notices.append)

    gen = tiny_generator()
    settings = BenchSettings((MethodSpec("ar"),), max_new_tokens=6, warmup=1, peer_per_category=1)
    rows = run(tmp_path, gen, settings, peers=[EchoPeer(gen), BrokenPeer()])
    echo = [r for r in rows if r["method"] == "echo"]
    assert len(echo) == 3 and all(r["kind"] == "peer" and r["exact"] is True for r in echo)
    broken = [r for r in rows if r["method"] == "broken"]
    assert len(broken) == 3 and all("RuntimeError: peer crashed" in r["error"] for r in broken)
    summary = summarize(rows)
    assert summary[OVERALL]["echo"]["exact_match"] == 1.0 and summary[OVERALL]["echo"]["mat"] is None
    assert summary[OVERALL]["broken"]["errors"] == 3 and failing_methods(summary) == []


# ---------------------------------------------------------------- workloads and the command line


def test_workloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = load_workload("spec-bench").select(1)
    assert len(spec.prompts) == 13 and sum(p.group == MULTI_TURN for p in spec.prompts) == 8
    path = tmp_path / "w.jsonl"
    path.write_text('{"turns": "hello"}\n\n{"id": "b", "category": "qa", "turns": ["a", "b"]}\n')
    w = jsonl(path)
    assert [(p.id, p.category, p.turns) for p in w.prompts] == [("line-1", "custom", ("hello",)), ("b", "qa", ("a", "b"))]
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="line 1"):
        jsonl(path)
    monkeypatch.setattr(workloads_mod.importlib.util, "find_spec", lambda name: None)
    for name in ("humaneval", "sharegpt"):
        with pytest.raises(ValueError, match=r"pip install fastdecode\[data\]"):
            load_workload(name)


def test_select_rows_and_generation_time() -> None:
    rows = [
        {"prompt_id": pid, "category": cat, "group": cat, "method": m, "wall_s": 2.0, "capture_s": cap, "new_tokens": 10}
        for pid, cat in (("a", "qa"), ("b", "qa"), ("c", "rag"))
        for m, cap in (("ar", 1.0), ("pld", 0.0))
    ]
    assert [(r["prompt_id"], r["method"]) for r in select_rows(rows, [], 1)] == [("a", "ar"), ("a", "pld"), ("c", "ar"), ("c", "pld")]
    assert [r["prompt_id"] for r in select_rows(rows, ["rag"], None)] == ["c", "c"]
    with pytest.raises(ValueError, match="per-category"):
        select_rows(rows, [], 0)
    # one-time graph capture inside a generation is not generation time: ar ran 10 tokens in 2 - 1 s
    assert speedup([(rows[1], rows[0])]) == pytest.approx(0.5)


def test_rejection_sampler_runs_reach_the_drafters(tmp_path: Path) -> None:
    """--sampler rejection: every method's generations use speculative sampling (pld's drafts then verify by the
    rejection rule), and text that differs from `ar`'s is no failure (the same distribution, other draws)."""
    seen: list[str] = []
    real = Generator.generate

    def generate(self: Generator, prompt: Any, method: str = "pld", **kwargs: Any) -> Generation:
        seen.append(kwargs["sampler"])
        return real(self, prompt, method, **kwargs)

    settings = BenchSettings(with_reference([MethodSpec("pld")]), max_new_tokens=12, temperature=0.8, warmup=0, sampler="rejection")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Generator, "generate", generate)
        rows = run(tmp_path, tiny_generator(), settings)
    assert seen and set(seen) == {"rejection"}
    assert not any(r["flag"] for r in rows)
    assert {r["method"] for r in rows} == {"ar", "pld"}
    summary = summarize(rows)
    meta = {**RECORD, "setup": {**RECORD["setup"], "temperature": 0.8, "sampler": "rejection"}, "command": "x", "date": "today",
            "prompts": 3, "warmup": 0}
    text = render_markdown(summary, meta, [])
    assert "temperature 0.8, sampler rejection" in text and "no test of losslessness here" in text
    assert "## Divergences" not in text and "**FAIL**" not in text


def test_cli_checks_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "not-rows").mkdir()
    (tmp_path / "not-rows" / RESULTS).write_text('{"a": 1}\n[2]\n')
    assert [m.label for m in method_specs("pld,ar", ["pld.num_draft=5"])] == ["ar", "pld(num_draft=5)"]
    # one method in several variants: bracket options are the entry's own, --opt applies to every entry
    variants = method_specs("pld,pld[adaptive=true],pld[num_draft=4,max_ngram=2]", ["pld.num_draft=5"])
    assert [m.label for m in variants] == [
        "ar", "pld(num_draft=5)", "pld(adaptive=true,num_draft=5)", "pld(max_ngram=2,num_draft=4)"
    ]
    for argv in (
        ["bench", "--methods", "pld,pld"],
        ["bench", "--methods", "pld[num_draft=4"],
        ["bench", "--methods", "pld]"],
        ["bench", "--methods", "pld[num_draft]"],
        ["bench", "--methods", "pld[bogus=1]"],
        ["bench", "--methods", "nope"],
        ["bench", "--methods", "pld", "--opt", "pld.bogus=1"],
        ["bench", "--opt", "ar"],
        ["bench", "--peers", "vllm"],
        ["bench", "--workload", str(tmp_path / "missing.jsonl")],
        ["bench", "--max-new-tokens", "0"],
        ["bench", "--sampler", "rejection"],  # greedy has no sampler
        ["bench", "--sampler", "nucleus", "--temperature", "0.7"],
        ["bench", "--report-only", str(tmp_path / "nothing-here")],
        ["bench", "--report-only", str(tmp_path / "not-rows")],
    ):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.startswith("fastdecode: error:")


def tiny_hf_target(folder: Path) -> tuple[Any, LlamaModel]:
    """A tiny random transformers Llama saved as a Hugging Face folder, and our model loaded from it (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdecode.models.loader import build_model, load_hf, resolve

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config)
    with torch.no_grad():
        hf.lm_head.weight.mul_(20.0)
    hf.save_pretrained(folder)
    source = resolve(str(folder))
    cfg, state = load_hf(source.path)
    return source, build_model(cfg, state, torch.float32, "cpu")


def test_transformers_peer_on_the_same_weights(tmp_path: Path) -> None:
    """transformers `generate` on the tiny model's HF folder: the same greedy tokens as our ar."""
    pytest.importorskip("accelerate")
    source, model = tiny_hf_target(tmp_path / "model")
    gen = Generator(model, ByteTokenizer(), source)  # type: ignore[arg-type]
    notices: list[str] = []
    setup = peers_mod.PeerSetup(source, torch.float32, torch.device("cpu"), 1, ByteTokenizer.eos_ids, 1024)
    peers = peers_mod.make_peers(["transformers"], setup, notices.append)
    assert [p.label for p in peers] == ["transformers", "transformers-pld"] and notices == []
    settings = BenchSettings((MethodSpec("ar"),), max_new_tokens=8, warmup=0)
    rows = run_bench(gen, WORKLOAD, settings, tmp_path / "out", RECORD, peers, progress=False)
    peer_rows = [r for r in rows if r["kind"] == "peer"]
    assert len(peer_rows) == 6 and all(r["error"] is None and r["exact"] for r in peer_rows), [r.get("divergence") for r in peer_rows]


def test_commit_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the checkout whose git metadata is stale (the GPU machine's) names its commit through the environment."""
    from fastdecode.bench.provenance import git_commit

    monkeypatch.delenv("FASTDECODE_COMMIT", raising=False)
    real = git_commit()
    monkeypatch.setenv("FASTDECODE_COMMIT", "abc123+gpu")
    assert git_commit() == "abc123+gpu" != real


def test_quality_against_ar_token_agreement_and_rouge_l() -> None:
    from fastdecode.bench.metrics import rouge_l, token_agreement

    ref = [1, 2, 3, 4, 5, 6, 7, 8]
    assert token_agreement(ref, ref) == 1.0 == rouge_l(ref, ref)
    assert token_agreement(ref, [1, 2, 3, 4, 9, 9, 9, 9]) == 0.5
    shifted = [1, 2, 3, 4, 0, 5, 6, 7, 8]  # one token inserted: positions shift, the subsequence stays
    assert token_agreement(ref, shifted) == 0.5
    lcs = 8
    assert abs(rouge_l(ref, shifted) - 2 * (lcs / 9) * (lcs / 8) / (lcs / 9 + lcs / 8)) < 1e-12
    assert rouge_l(ref, [9, 9]) == 0.0 and rouge_l([], []) == 1.0 and token_agreement(ref, []) == 0.0


def test_transformers_assisted_with_our_draft_artifact(tmp_path: Path) -> None:
    """A `train draft` artifact as transformers' assistant: the same logits as our draft model, and
    assisted generation returns ar's tokens."""
    pytest.importorskip("accelerate")
    from fastdecode.models.draft import init_draft, load_draft, save_draft, target_info

    source, model = tiny_hf_target(tmp_path / "model")
    save_draft(init_draft(model, [1]), tmp_path / "draft", {"target": target_info(model)}, dtype=torch.float32)
    ours = load_draft(tmp_path / "draft", model)
    hf_target = peers_mod.load_transformers_model(source, torch.float32, torch.device("cpu"))
    theirs = peers_mod.draft_as_transformers(tmp_path / "draft", hf_target)
    ids = torch.tensor([[5, 9, 77, 3, 120, 8]])
    with torch.no_grad():
        want, _ = ours(ids, torch.arange(6)[None], ours.new_cache(1, 6))
        got = theirs(ids).logits
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()
    gen = Generator(model, ByteTokenizer(), source)  # type: ignore[arg-type]
    setup = peers_mod.PeerSetup(source, torch.float32, torch.device("cpu"), 1, ByteTokenizer.eos_ids, 1024, tmp_path / "draft")
    peers = peers_mod.make_peers(["transformers"], setup, [].append)
    assert [p.label for p in peers] == ["transformers", "transformers-pld", "transformers-assisted"]
    rows = run_bench(gen, WORKLOAD, BenchSettings((MethodSpec("ar"),), max_new_tokens=8, warmup=0), tmp_path / "out", RECORD,
                     peers[2:], progress=False)
    assisted = [r for r in rows if r["method"] == "transformers-assisted"]
    assert assisted and all(r["error"] is None and r["exact"] for r in assisted), [r.get("error") for r in assisted]
