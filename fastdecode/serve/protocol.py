"""The OpenAI wire format, checked: a request body becomes a `RequestSpec`, a result becomes a response body
or a stream chunk, a refusal becomes the OpenAI error shape.

Pure Python: no model, no tokenizer, no torch call (the scheduler thread tokenizes and runs the model). Every
refusal is one line, raised as `APIError`; a field that would change the output and that we cannot honour
(n > 1, logprobs, penalties, tools …) is refused rather than ignored.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastdecode.drafters import get_method, make_options
from fastdecode.sampling import SamplingParams

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """A request the server refuses: HTTP `status` and the OpenAI error body."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(" ".join(message.split()))  # one line, whatever the message held
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class RequestSpec:
    """One checked request: what the scheduler needs to run it and the route needs to answer it."""

    kind: str  # "chat" or "completion"
    prompt: Any  # chat: a list of {"role", "content"}; completion: a string or a list of token ids
    method: str
    options: Any  # the method's frozen options dataclass
    params: SamplingParams
    max_tokens: int | None  # None: the server's default, cut to what the context leaves
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    model: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def raw(self) -> bool:
        """Completions continue the text as is; chat prompts go through the chat template."""
        return self.kind == "completion"


# fields that change the output and that this server cannot honour: refused when set to anything but their default
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


def _number(body: dict[str, Any], key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
        raise APIError(f"{key} must be a number, got {v!r}", param=key)
    return float(v)


def _integer(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(f"{key} must be an integer, got {v!r}", param=key)
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise APIError("stop must be a string or a list of strings", param="stop")
    if len(items) > MAX_STOP_STRINGS:
        raise APIError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(items)}", param="stop")
    return tuple(s for s in items if s)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(f"messages[{i}] must be an object with a 'role' and a 'content'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        raise APIError("the prompt is empty", param="messages")
    return out


def _prompt(body: dict[str, Any]) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p.strip():
            raise APIError("the prompt is empty", param="prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [int(t) for t in p]
    if isinstance(p, list) and len(p) > 1 and all(isinstance(t, (str, list)) for t in p):
        raise APIError(f"a batch of {len(p)} prompts is not supported: send one prompt per request", param="prompt")
    raise APIError("prompt must be a non-empty string or a list of token ids", param="prompt")


def _method(body: dict[str, Any], default_method: str, default_options: dict[str, str]) -> tuple[str, Any]:
    """The request's method and options, through the same option parsing as the CLI's --opt."""
    method = body.get("method", default_method)
    if not isinstance(method, str):
        raise APIError(f"method must be a string, got {method!r}", param="method")
    options = body.get("method_options")
    if options is None:
        options = default_options if method == default_method else {}
    if not isinstance(options, dict):
        raise APIError("method_options must be an object of option: value", param="method_options")
    as_text = {str(k): ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in options.items()}
    try:
        return method, make_options(get_method(method), as_text)
    except (ValueError, TypeError) as e:
        raise APIError(str(e), param="method" if "method" in str(e) and "option" not in str(e) else "method_options") from None


def parse_request(body: Any, kind: str, served_model: str, default_method: str, default_options: dict[str, str]) -> RequestSpec:
    """Check an OpenAI chat-completion (`kind="chat"`) or completion request body."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = body.get("model", served_model)
    if model != served_model:  # a request never makes the server load a model
        raise APIError(f"the model {model!r} does not exist: this server serves {served_model!r}", status=404, param="model",
                       code="model_not_found")
    for key, defaults in _UNSUPPORTED.items():
        if body.get(key) not in defaults:
            raise APIError(f"{key} is not supported by this server", param=key)
    n = _integer(body, "n")
    if n not in (None, 1):
        raise APIError(f"n={n} is not supported: this server returns one choice per request", param="n")
    prompt: Any = _messages(body) if kind == "chat" else _prompt(body)
    max_tokens = _integer(body, "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    top_k = _integer(body, "top_k") or 0
    if top_k == -1:  # vLLM's spelling of "off"
        top_k = 0
    seed = _integer(body, "seed")
    sampler = body.get("sampler", "gumbel")
    if not isinstance(sampler, str):
        raise APIError(f"sampler must be a string, got {sampler!r}", param="sampler")
    # OpenAI's default temperature is 1: a client that wants greedy (lossless, token-identical to ar) sends 0
    params = SamplingParams(_number(body, "temperature", 1.0), top_k, _number(body, "top_p", 1.0), 0 if seed is None else seed, sampler)
    try:
        params.validate()
    except ValueError as e:
        raise APIError(str(e)) from None
    if seed is None:  # a fresh seed per request, as the library does
        params = SamplingParams(params.temperature, params.top_k, params.top_p, int.from_bytes(uuid.uuid4().bytes[:4], "little"),
                                params.sampler)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("stream must be true or false", param="stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise APIError("stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(stream_options, dict) or not isinstance(stream_options.get("include_usage", False), bool):
            raise APIError("stream_options must be an object such as {\"include_usage\": true}", param="stream_options")
        include_usage = bool(stream_options.get("include_usage", False))
    method, options = _method(body, default_method, default_options)
    return RequestSpec(kind, prompt, method, options, params, max_tokens, _stop(body), stream, include_usage, served_model)


# ------------------------------------------------------------------ responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _head(spec: RequestSpec, chunk: bool) -> dict[str, Any]:
    if spec.kind == "chat":
        obj, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl-"
    else:
        obj, prefix = "text_completion", "cmpl-"
    return {"id": prefix + spec.id, "object": obj, "created": spec.created, "model": spec.model}


def response(spec: RequestSpec, text: str, finish_reason: str, use: dict[str, int]) -> dict[str, Any]:
    """The whole answer of a non-streaming request."""
    if spec.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**_head(spec, False), "choices": [choice], "usage": use}


def chunk(spec: RequestSpec, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
    """One stream chunk: a text piece, or (text None) the closing chunk that carries the finish reason."""
    if spec.kind == "chat":
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out = {**_head(spec, True), "choices": [choice]}
    if spec.include_usage:
        out["usage"] = None
    return out


def usage_chunk(spec: RequestSpec, use: dict[str, int]) -> dict[str, Any]:
    """The last chunk before [DONE] when stream_options.include_usage is set: no choices, the usage."""
    return {**_head(spec, True), "choices": [], "usage": use}
