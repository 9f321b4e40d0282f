"""The public API: `load()` a model, then `Generator.generate()` / `Generator.stream()`.

This is what users and the CLI call. It turns prompts into token ids, picks the drafter, runs the engine
and turns ids back into text; it must never implement decoding logic itself (engine.py does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastdecode.drafters import Drafter, get_method, make_options
from fastdecode.engine import Engine, GenerationStats, StopConditions
from fastdecode.models.llama import LlamaModel
from fastdecode.models.loader import ModelSource, build_model, load_weights, resolve
from fastdecode.sampling import SamplingParams
from fastdecode.tokenizer import StreamDecoder, Tokenizer

DEFAULT_METHOD = "pld"
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

Prompt = str | Sequence[dict[str, str]]


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX-512-BF16 or AMX); elsewhere bf16 is slower than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"unknown device {device!r}: choose cpu, cuda or auto")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose auto, fp32, bf16 or fp16")
    return DTYPES[dtype]


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # new tokens, EOS included when it ended the answer
    finish_reason: str  # "stop" or "length"
    stats: GenerationStats
    prompt_ids: list[int]
    method: str
    seed: int


class Stream:
    """An iterator of text pieces; `.result` holds the Generation once the iterator is exhausted."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        return self._pieces


class Generator:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, source: ModelSource | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.engine = Engine(model)
        self.engine.tokenizer = tokenizer  # drafters that calibrate on text (layerskip) read it
        self._drafters: dict[tuple[str, Any], Drafter] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def row_invariant(self) -> bool:
        """Whether this model's forwards give a row the same bits at every width, so that every lossless
        drafter's greedy output is bit-identical to `ar`'s: fp32 on any CPU (products of one fixed tile
        shape), bf16 on a CPU that multiplies bf16 natively, bf16/fp16 through the fused kernels on a CUDA
        GPU. Elsewhere (fp16 on a CPU, bf16 on CPUs without native bf16, fp32 on a GPU) a 1-row step and a
        verify round may round differently: identical up to numeric ties."""
        from fastdecode.models import llama

        if self.device.type == "cuda":
            return getattr(self.model, "kernels", None) == "triton"
        if not (llama.ROW_INVARIANT_ON and self.dtype in llama.ROW_INVARIANT_DTYPES):
            return False
        return self.dtype == torch.float32 or cpu_has_fast_bf16()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ------------------------------------------------------------ prompts

    def prompt_ids(self, prompt: Prompt, raw: bool = False) -> list[int]:
        """A string (chat-templated unless raw) or a list of chat messages -> token ids."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("the prompt is empty")
            if raw:
                return self.tokenizer.encode(prompt)
            return self.tokenizer.chat([{"role": "user", "content": prompt}])
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() == 2 and prompt.shape[0] > 1:
                raise ValueError(f"batch size {prompt.shape[0]} is not supported yet: give one prompt")
            return [int(t) for t in prompt.reshape(-1).tolist()]
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("the prompt is empty")
            if all(isinstance(p, str) for p in prompt):
                if len(prompt) > 1:
                    raise ValueError(f"batch size {len(prompt)} is not supported yet: give one prompt")
                return self.prompt_ids(prompt[0], raw)
            if all(isinstance(p, int) for p in prompt):
                return [int(p) for p in prompt]
            if all(isinstance(p, (list, tuple)) for p in prompt):
                if len(prompt) > 1:
                    raise ValueError(f"batch size {len(prompt)} is not supported yet: give one prompt")
                return self.prompt_ids(prompt[0], raw)  # type: ignore[arg-type]
            if all(isinstance(p, dict) for p in prompt):
                if not any(str(m.get("content", "")).strip() for m in prompt):
                    raise ValueError("the prompt is empty")
                return self.tokenizer.chat([dict(m) for m in prompt])
        raise ValueError("the prompt must be a string, a list of chat messages, or a list of token ids")

    # ------------------------------------------------------------ drafters

    def drafter(self, method: str, **options: Any) -> Drafter:
        """The drafter for `method` with these options; kept per process so adaptive state persists."""
        cls = get_method(method)
        opts = make_options(cls, options)
        key = (method, opts)
        if key not in self._drafters:
            self._drafters[key] = cls(opts)
        return self._drafters[key]

    # ------------------------------------------------------------ generation

    def _prepare(
        self, prompt: Prompt, method: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
        seed: int | None, stop: Sequence[str] | None, raw: bool, sampler: str, options: dict[str, Any],
    ) -> tuple[list[int], Drafter, SamplingParams, StopConditions]:
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        params = SamplingParams(temperature, top_k, top_p, seed, sampler).validate()
        if isinstance(stop, str):
            stop = [stop]
        stop_strings = tuple(s for s in (stop or ()) if s)
        drafter = self.drafter(method, **options)
        ids = self.prompt_ids(prompt, raw)
        self.engine.check_request(len(ids), max_new_tokens)
        cond = StopConditions(max_new_tokens, self.tokenizer.eos_ids, stop_strings, self.tokenizer.decode)
        return ids, drafter, params, cond

    def _text(self, ids: list[int], cond: StopConditions) -> str:
        if ids and ids[-1] in cond.eos_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids)
        return _cut_at_stop(text, cond.stop_strings)

    def generate(
        self,
        prompt: Prompt,
        method: str = DEFAULT_METHOD,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        raw: bool = False,
        sampler: str = "gumbel",
        top_logits: int = 0,
        **method_options: Any,
    ) -> Generation:
        """Generate an answer. `prompt` is a string (chat template applied unless `raw`), a list of chat
        messages, or a list of token ids (used as is)."""
        ids, drafter, params, cond = self._prepare(
            prompt, method, max_new_tokens, temperature, top_k, top_p, seed, stop, raw, sampler, method_options
        )
        stats = GenerationStats()
        out: list[int] = []
        for piece in self.engine.generate(ids, drafter, params, cond, stats, top_logits=top_logits):
            out.extend(piece)
        return Generation(self._text(out, cond), out, stats.finish_reason, stats, ids, method, params.seed)

    def stream(
        self,
        prompt: Prompt,
        method: str = DEFAULT_METHOD,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        raw: bool = False,
        sampler: str = "gumbel",
        **method_options: Any,
    ) -> Stream:
        """Like `generate`, but returns text pieces as the steps produce them. Bad input raises here,
        before the first piece."""
        ids, drafter, params, cond = self._prepare(
            prompt, method, max_new_tokens, temperature, top_k, top_p, seed, stop, raw, sampler, method_options
        )
        stream = Stream(iter(()))
        stream._pieces = self._stream(stream, ids, drafter, params, cond, method)
        return stream

    def _stream(
        self, stream: Stream, ids: list[int], drafter: Drafter, params: SamplingParams, cond: StopConditions, method: str
    ) -> Iterator[str]:
        stats = GenerationStats()
        dec = StreamDecoder(self.tokenizer)
        out: list[int] = []
        sent = ""  # text already yielded
        pending = ""  # text held back: it may be the start of a stop string
        for piece in self.engine.generate(ids, drafter, params, cond, stats):
            out.extend(piece)
            visible = [t for t in piece if t not in cond.eos_ids]
            pending += dec.push(visible)
            ready, pending = _split_stop(sent + pending, len(sent), cond.stop_strings)
            if ready:
                sent += ready
                yield ready
        pending += dec.flush()
        final = _cut_at_stop(sent + pending, cond.stop_strings)
        if len(final) > len(sent):
            yield final[len(sent) :]
        stream.result = Generation(self._text(out, cond), out, stats.finish_reason, stats, ids, method, params.seed)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _split_stop(text: str, sent: int, stops: Sequence[str]) -> tuple[str, str]:
    """Split the unsent part of `text` into (safe to send, held back): text from a stop string on is
    never sent, and a tail that could still become a stop string waits."""
    text = _cut_at_stop(text, stops)
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    safe_end = max(sent, len(text) - hold)
    return text[sent:safe_end], text[safe_end:]


def load(
    model: str = "smollm2", device: str | None = None, dtype: str | None = None, context: int | None = None, verbose: bool | None = None
) -> Generator:
    """Load a model by name (`smollm2`), GGUF file or Hugging Face folder. `context` caps the context length.
    `verbose`: on a GPU, a line on stderr per captured CUDA graph (default: $FASTDECODE_VERBOSE=1)."""
    source = resolve(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg, state = load_weights(source)
    if context is not None:
        if context < 2:
            raise ValueError(f"context must be >= 2, got {context}")
        from dataclasses import replace

        cfg = replace(cfg, max_position=min(context, cfg.max_position))
    net = build_model(cfg, state, dt, dev)
    tokenizer = Tokenizer(source)
    if dev.type == "cuda" and os.environ.get("FASTDECODE_CUDA_GRAPHS", "1") != "0":
        from fastdecode.cuda_graphs import GraphRunner

        # forwards replay CUDA graphs: launching kernels one by one costs more than the model itself
        return Generator(GraphRunner(net, verbose=verbose), tokenizer, source)  # type: ignore[arg-type]
    return Generator(net, tokenizer, source)
