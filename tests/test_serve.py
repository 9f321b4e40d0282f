"""`fastdecode serve` (issue 13): the official `openai` client against a real uvicorn server on a free port.

The server runs a tiny random model over SmolLM2's vocabulary with SmolLM2's tokenizer (random tokens make
long, odd texts: a good test of streaming and stop strings), in bf16 where this CPU multiplies bf16 natively
and fp32 elsewhere: both row-invariant, so every lossless method's greedy text is bit-identical to `ar`'s and
the server batches (were they not, each method would be compared with its own batch-1 library run).
References come from the library (`Generator.generate`, batch 1, nothing running beside it).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch
from conftest import make_tiny_model, tiny_config

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import uvicorn  # noqa: E402

from fastdecode.api import Generator, cpu_has_fast_bf16  # noqa: E402
from fastdecode.drafters.base import DraftContext, Proposal, register  # noqa: E402
from fastdecode.drafters.pld import PromptLookup  # noqa: E402
from fastdecode.models.loader import resolve  # noqa: E402
from fastdecode.serve import create_app  # noqa: E402
from fastdecode.serve.metrics import ServerMetrics  # noqa: E402
from fastdecode.tokenizer import Tokenizer  # noqa: E402

MODEL = "tiny"
CONTEXT = 512


@register
class SlowDraft(PromptLookup):
    """Prompt lookup that takes 20 ms to draft: a generation long enough to disconnect from."""

    name = "_slow"
    description = "test drafter: pld, 20 ms a step"

    def propose(self, ctx: DraftContext) -> Proposal:
        time.sleep(0.02)
        return super().propose(ctx)


@pytest.fixture(scope="module")
def gen() -> Generator:
    cfg = tiny_config(vocab_size=49152, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=8, max_position=CONTEXT)
    model = make_tiny_model(cfg, seed=1, logit_scale=1.0)
    if cpu_has_fast_bf16():
        model = model.to(torch.bfloat16)
    return Generator(model, Tokenizer(resolve("smollm2")))


@dataclass
class Server:
    url: str
    app: Any

    def client(self, api_key: str = "none") -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(load: Callable[[], Generator], wait_ready: bool = True, **kw: Any) -> Iterator[Server]:
    kw.setdefault("method", "ar")
    app = create_app(load, MODEL, **kw)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        while wait_ready and httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        yield Server(url, app)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(gen: Generator) -> Iterator[Server]:
    with serving(lambda: gen, max_batch=8) as s:
        yield s


def reference(gen: Generator, prompt: Any, method: str = "ar", **kw: Any) -> Any:
    """The library's batch-1 answer; for a lossless method other than ar, ar's own answer where the forwards
    are row-invariant (then the two are bit-identical by construction)."""
    return gen.generate(prompt, "ar" if gen.row_invariant else method, **kw)


def chat(server: Server, text: str, **kw: Any) -> Any:
    kw.setdefault("temperature", 0)
    return server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kw)


# ------------------------------------------------------------------ answers


def test_chat_and_completion_equal_the_library(server: Server, gen: Generator) -> None:
    r = chat(server, "Hello there", max_tokens=12)
    ref = gen.generate("Hello there", "ar", max_new_tokens=12)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_ids), 12)
    assert r.usage.total_tokens == len(ref.prompt_ids) + 12 and r.model == MODEL

    c = server.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9, temperature=0)
    assert c.choices[0].text == gen.generate("Once upon a time", "ar", raw=True, max_new_tokens=9).text
    ids = gen.tokenizer.encode("Once upon a time")
    c2 = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=9, temperature=0)
    assert c2.choices[0].text == c.choices[0].text and c2.usage.prompt_tokens == len(ids)


def test_streaming_chat_and_completion(server: Server, gen: Generator) -> None:
    ref = gen.generate("Tell me a story", "ar", max_new_tokens=30)
    stream = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=30, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == ref.text and finishes == ["length"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])

    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events) == gen.generate("Once upon a time", "ar", raw=True, max_new_tokens=8).text
    assert [e["choices"][0]["finish_reason"] for e in events].count("length") == 1
    assert all("usage" not in e for e in events)  # no include_usage: no usage chunk


def test_stop_strings_and_seeded_sampling(server: Server, gen: Generator) -> None:
    full = gen.generate("Hi", "ar", max_new_tokens=40)
    stop = full.text[10:13]
    r = chat(server, "Hi", max_tokens=40, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == full.text[: full.text.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(server, "Hi", max_tokens=40, stop=stop, stream=True))
    assert streamed == r.choices[0].message.content

    # Gumbel sampling: the noise is a function of (seed, position), so every method gives the library's text
    for method in ("ar", "pld"):
        r = chat(server, "Hi", max_tokens=20, temperature=0.8, top_p=0.9, seed=5, extra_body={"method": method})
        assert r.choices[0].message.content == reference(gen, "Hi", method, max_new_tokens=20, temperature=0.8, top_p=0.9, seed=5).text


CONCURRENT = [(f"Question {i}: tell me about {w}", m) for i, (w, m) in enumerate(
    zip(["cats", "the sea", "numbers", "trees", "rain", "stars", "bread", "music", "ice", "sand"],
        ["ar", "pld", "ngram", "lookahead", "ar", "pld", "auto", "ngram", "ar", "pld"], strict=True))]


def _ask_all(server: Server, gen: Generator) -> None:
    def ask(job: tuple[str, str]) -> str:
        return chat(server, job[0], max_tokens=24, extra_body={"method": job[1]}).choices[0].message.content

    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        answers = list(pool.map(ask, CONCURRENT))
    for (prompt, method), answer in zip(CONCURRENT, answers, strict=True):
        assert answer == reference(gen, prompt, method, max_new_tokens=24).text, (prompt, method)


def test_concurrent_requests_equal_batch1_ar(server: Server, gen: Generator) -> None:
    """Requests of several methods at once, their verify forwards batched (ragged: each its own draft) where
    the forwards are row-invariant: each greedy answer equals the library's batch-1 answer (ar's where the
    forwards are row-invariant)."""
    _ask_all(server, gen)
    assert server.app.state.scheduler.batching == gen.row_invariant
    if server.app.state.scheduler.batching:  # the verify forwards of several requests (their draft rows too) were batched
        m = server.metrics()
        forwards, sequences = _value(m, "fastdecode_batch_sequences_count"), _value(m, "fastdecode_batch_sequences_sum")
        assert 0 < forwards < sequences and _value(m, "fastdecode_batch_rows_sum") > sequences


def test_concurrent_requests_without_batching(gen: Generator) -> None:
    """The interleaved path (fp32, CPUs without native bf16, the GPU): every forward batch-1, the same answers."""
    with serving(lambda: gen, max_batch=4, batching=False) as s:
        _ask_all(s, gen)
        assert not s.app.state.scheduler.batching and _value(s.metrics(), "fastdecode_batch_sequences_count") == 0
        assert _value(s.metrics(), 'fastdecode_requests_total{outcome="ok"') == len(CONCURRENT)


def test_method_options_and_default_method(gen: Generator) -> None:
    with serving(lambda: gen, method="pld", method_options={"num_draft": "3"}) as s:
        r = chat(s, "Say something", max_tokens=16)
        r2 = chat(s, "Say something", max_tokens=16, extra_body={"method": "pld", "method_options": {"num_draft": 5, "adaptive": False}})
        ref = reference(gen, "Say something", "pld", max_new_tokens=16).text
        assert r.choices[0].message.content == r2.choices[0].message.content == ref
        drafted = [ln for ln in s.metrics().splitlines() if ln.startswith("fastdecode_drafted_tokens_total")]
        assert drafted and float(drafted[0].split()[-1]) > 0  # pld drafted (the default method, not ar)


# ------------------------------------------------------------------ refusals


BAD = [
    ({"extra_body": {"method": "nope"}}, "unknown method 'nope'"),
    ({"extra_body": {"method": "pld", "method_options": {"num_draft": "many"}}}, "num_draft='many'"),
    ({"extra_body": {"method": "pld", "method_options": {"nope": 1}}}, "unknown option 'nope'"),
    ({"max_tokens": CONTEXT}, "exceeds the model's context"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"n": 2}, "n=2 is not supported"),
    ({"logprobs": True}, "logprobs is not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty is not supported"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true"),
    ({"extra_body": {"seed": "x"}}, "seed must be an integer"),
    ({"extra_body": {"sampler": "nope"}}, "unknown sampler"),
    ({"stop": [1, 2]}, "stop must be a string or a list of strings"),
]


@pytest.mark.parametrize("kwargs,needle", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_requests_are_400_in_openai_shape(server: Server, kwargs: dict, needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(server, "Hi", **{"max_tokens": 8, **kwargs})
    err = info.value.body
    assert info.value.status_code == 400 and needle in err["message"] and "\n" not in err["message"]
    assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}


def test_bad_bodies(server: Server) -> None:
    def post(content: bytes, path: str = "/v1/chat/completions") -> httpx.Response:
        return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})

    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), "messages must be a non-empty list"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "  "}]}).encode(), "the prompt is empty"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), "only text"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode(), "exceeds the server's limit"),
    ]
    for content, needle in cases:
        r = post(content)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (needle, r.text[:200])
    r = post(json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), "/v1/completions")
    assert r.status_code == 400 and "a batch of 2 prompts" in r.json()["error"]["message"]
    r = post(json.dumps({"model": MODEL, "prompt": "word " * CONTEXT, "max_tokens": 4}).encode(), "/v1/completions")
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["message"] == "Not Found"


def test_models_route_and_unknown_model(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert "does not exist" in info.value.body["message"] and info.value.body["code"] == "model_not_found"


def test_api_key_on_every_route_but_health(gen: Generator) -> None:
    with serving(lambda: gen, api_key="s3cret") as s:
        assert httpx.get(s.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(s.url + path).status_code == 401
            assert httpx.get(s.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(s.url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for path in ("/v1/chat/completions", "/v1/completions"):
            r = httpx.post(s.url + path, json={"model": MODEL, "prompt": "Hi"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            chat(s, "Hi", max_tokens=4)
        r = s.client("s3cret").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                                       temperature=0)
        assert r.choices[0].message.content == gen.generate("Hi", "ar", max_new_tokens=4).text


def test_health_is_503_while_loading(gen: Generator) -> None:
    release = threading.Event()

    def slow_load() -> Generator:
        release.wait(30)
        return gen

    with serving(slow_load, wait_ready=False) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        with pytest.raises(openai.APIStatusError) as info:
            chat(s, "Hi", max_tokens=4)
        assert info.value.status_code == 503 and "loading" in info.value.body["message"]
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert chat(s, "Hi", max_tokens=4).choices[0].message.content == gen.generate("Hi", "ar", max_new_tokens=4).text


def test_metrics_count_requests_tokens_and_acceptance(gen: Generator) -> None:
    with serving(lambda: gen, method="pld") as s:
        for _ in range(2):
            chat(s, "Repeat: one two three one two three one two three", max_tokens=30)
        with pytest.raises(openai.BadRequestError):
            chat(s, "Hi", n=3)
        values = {}
        for line in s.metrics().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
    assert values['fastdecode_requests_total{outcome="ok",route="chat"}'] == 2
    assert values['fastdecode_requests_total{outcome="error",route="chat"}'] == 1
    assert values["fastdecode_generation_tokens_total"] == 60 and values["fastdecode_prompt_tokens_total"] > 0
    steps = values["fastdecode_steps_total"]
    assert 0 < steps <= 60 and values["fastdecode_step_seconds_count"] == steps
    assert values["fastdecode_drafted_tokens_total"] >= values["fastdecode_accepted_tokens_total"] >= 0
    first = 'at_position_total{position="1"}'
    assert values["fastdecode_drafted_" + first] >= values.get("fastdecode_accepted_" + first, 0)
    assert values['fastdecode_drafted_at_position_total{position="1"}'] <= steps


def _value(text: str, name: str) -> float:
    return sum(float(ln.rpartition(" ")[2]) for ln in text.splitlines() if ln.startswith(name))


def test_disconnect_cancels_the_sequence(gen: Generator) -> None:
    with serving(lambda: gen, method="_slow") as s:
        scheduler = s.app.state.scheduler
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert scheduler.running == 1
        deadline = time.monotonic() + 5
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.running == 0
        m = s.metrics()
        assert _value(m, 'fastdecode_requests_total{outcome="cancelled"') == 1
        assert _value(m, "fastdecode_steps_total") < 100  # stopped long before its 400 tokens

        # a non-streaming request whose client gives up is dropped too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
        deadline = time.monotonic() + 5
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.running == 0 and _value(s.metrics(), 'fastdecode_requests_total{outcome="cancelled"') == 2


# ------------------------------------------------------------------ the command line


def test_cli_serve_bad_arguments(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from fastdecode.cli import main

    for argv, needle in [
        (["serve", "--method", "nope"], "unknown method 'nope'"),
        (["serve", "--opt", "num_draft=x"], "num_draft='x'"),
        (["serve", "--port", "70000"], "--port must be in 0..65535"),
        (["serve", "--max-batch", "0"], "--max-batch must be >= 1"),
        (["serve", "--model", "/nowhere/m.gguf"], "does not exist"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # the serve extra is missing
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'fastdecode[serve]'" in err and len(err.splitlines()) == 1


def test_cli_serve_no_batching_reaches_the_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--no-batching` makes every request take turns with batch-1 forwards (and on a GPU allocates no pool)."""
    from fastdecode.cli import main

    apps: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    for argv, allowed in ((["serve", "--model", "smollm2"], True), (["serve", "--model", "smollm2", "--no-batching"], False)):
        try:
            resolve("smollm2")
        except FileNotFoundError:
            pytest.skip("needs the embedded model's package")
        assert main(argv) == 0
        assert apps[-1].state.scheduler.allow_batching is allowed


# ------------------------------------------------------------------ batched verify forwards


def _tree(g: torch.Generator, m: int) -> list[int]:
    """Parents of a random tree of m draft nodes in topological order (-1: the pending token)."""
    return [int(torch.randint(-1, j, (1,), generator=g)) for j in range(m)]


def test_batching_only_where_the_cpu_multiplies_bf16_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on a CPU without AVX-512-BF16/AMX rounds a row by the width of its product (measured on an AMD EPYC):
    there the server must step each request alone, or batched answers could differ from batch 1. fp32 (fixed
    product tiles) and fp16 (not row-invariant on a CPU) do not depend on it."""
    from fastdecode import api
    from fastdecode.serve.batching import can_batch

    cfg = tiny_config(vocab_size=64, max_position=256)
    model, fp32, fp16 = (make_tiny_model(cfg, seed=3).to(dt) for dt in (torch.bfloat16, torch.float32, torch.float16))
    assert can_batch(model) == cpu_has_fast_bf16()
    monkeypatch.setattr(api, "cpu_has_fast_bf16", lambda: False)
    assert not can_batch(model) and can_batch(fp32) and not can_batch(fp16)
    monkeypatch.setattr(api, "cpu_has_fast_bf16", lambda: True)
    assert can_batch(model) and can_batch(fp32) and not can_batch(fp16)


NATIVE_BF16 = pytest.mark.skipif(not cpu_has_fast_bf16(), reason="bf16 is row-invariant where the CPU multiplies it natively")
BATCH_DTYPES = [pytest.param(torch.bfloat16, id="bf16", marks=NATIVE_BF16), pytest.param(torch.float32, id="fp32")]


@pytest.mark.parametrize("dtype", BATCH_DTYPES)
def test_batched_rows_bitwise_equal_the_1_row_steps(dtype: torch.dtype) -> None:
    """Ragged verify forwards (each sequence its own tree, chain or single row, its own cache length, including
    lengths across attention blocks) batched into one forward give every row the bits of the sequence's own
    forward, and write the same K/V rows; a batch wider than MAX_ROWS is refused, `chunks` cuts it."""
    from fastdecode.engine import tree_mask
    from fastdecode.serve.batching import MAX_ROWS, Rows, can_batch, chunks, forward_rows

    cfg = tiny_config(vocab_size=64, max_position=256)
    model = make_tiny_model(cfg, seed=3).to(dtype)
    model.fuse_projections()
    assert can_batch(model) and not can_batch(make_tiny_model(cfg, seed=3).half())  # fp16 on a CPU: never batched
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (2, 63, 64, 65, 130)]
    batched, alone = [], []
    with torch.inference_mode():
        for p in prompts:
            for caches in (batched, alone):
                c = model.new_cache(1, 256)
                model(torch.tensor([p[:-1]]), torch.arange(len(p) - 1)[None], c, hidden_only=True)
                caches.append(c)
        pending = [p[-1] for p in prompts]
        for step in range(6):
            requests = []
            for b in range(len(prompts)):
                m = (0, 1, 4, 7, 12)[(b + step) % 5]  # ragged: a 1-row step beside trees of 1 to 12 nodes
                parents = list(range(-1, m - 1)) if (b + step) % 2 else _tree(g, m)
                depth = [0] * (m + 1)
                for j, par in enumerate(parents):
                    depth[j + 1] = depth[par + 1] + 1
                start = batched[b].length
                tokens = torch.tensor([[pending[b], *torch.randint(0, 64, (m,), generator=g).tolist()]])
                positions = torch.tensor([[start + d for d in depth]])
                mask = tree_mask(parents)
                requests.append(Rows(tokens, positions, batched[b], None if mask is None else mask[None]))
            forward_rows(model, requests)
            for b, r in enumerate(requests):
                start = alone[b].length
                ref_logits, ref_hidden = model(r.tokens, r.positions, alone[b], r.mask)
                assert r.result is not None
                logits, hidden = r.result
                assert torch.equal(logits, ref_logits) and torch.equal(hidden, ref_hidden), (b, step)
                assert batched[b].length == alone[b].length == start + r.width
                assert torch.equal(batched[b].k[:, :, :, : alone[b].length], alone[b].k[:, :, :, : alone[b].length])
                assert torch.equal(batched[b].v[:, :, :, : alone[b].length], alone[b].v[:, :, :, : alone[b].length])
                # keep the pending row and the path to node 0 (where there is one), as the engine's compact does
                keep = [start] if r.width == 1 else [start, start + 1]
                for c in (batched[b], alone[b]):
                    c.compact(start, keep)
                pending[b] = int(logits[0, -1].argmax())
        wide = [Rows(torch.zeros(1, 100, dtype=torch.long), torch.arange(100)[None], model.new_cache(1, 256), None) for _ in range(3)]
        with pytest.raises(ValueError, match="at most"):
            forward_rows(model, wide)
        assert [len(group) for group in chunks(wide)] == [2, 1] and MAX_ROWS == 256


def test_record_step_counts_each_position() -> None:
    """Acceptance per draft position: a step counts at every depth its draft reached (deeper ones under the last
    label) and at every depth it accepted."""
    m = ServerMetrics()
    m.record_step(40, 50, 3, 0.01)
    m.record_step(2, 2, 0, 0.01)
    text = m.exposition().decode()
    assert _value(text, 'fastdecode_drafted_at_position_total{position="1"}') == 2
    assert _value(text, 'fastdecode_drafted_at_position_total{position="3"}') == 1
    assert _value(text, 'fastdecode_drafted_at_position_total{position="32"}') == 1
    assert 'position="33"' not in text
    assert _value(text, 'fastdecode_accepted_at_position_total{position="3"}') == 1
    assert _value(text, 'fastdecode_accepted_at_position_total{position="4"}') == 0
    assert _value(text, "fastdecode_steps_total") == 2 and _value(text, "fastdecode_drafted_tokens_total") == 52
