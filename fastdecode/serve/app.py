"""The HTTP side: the OpenAI routes (FastAPI on uvicorn) over the scheduler.

Routes: POST /v1/chat/completions and /v1/completions (JSON, or SSE ending `data: [DONE]` when `stream`),
GET /v1/models, /health (503 while the model loads) and /metrics (Prometheus). With an API key every route
but /health wants `Authorization: Bearer KEY`, compared in constant time.

What it must never do: call the model or the tokenizer (the scheduler thread does), or answer an error in
any shape but OpenAI's `{"error": {"message", "type", "param", "code"}}` with one line of message.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastdecode.api import Generator
from fastdecode.serve.metrics import ServerMetrics
from fastdecode.serve.protocol import APIError, RequestSpec, chunk, parse_request, response, usage_chunk
from fastdecode.serve.scheduler import Event, Job, Scheduler

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused before it is parsed
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refused past `limit` bytes (announced or actual)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(f"the request body ({declared} bytes) exceeds the server's limit of {limit} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(f"the request body exceeds the server's limit of {limit} bytes")
    try:
        return json.loads(body)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both
        raise APIError("the request body is not valid JSON") from None


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(
    load: Callable[[], Generator],
    model_name: str,
    *,
    method: str,
    method_options: dict[str, str] | None = None,
    api_key: str | None = None,
    max_batch: int = 64,
    max_tokens: int = 256,
    max_body: int = MAX_BODY_BYTES,
    batching: bool = True,
) -> FastAPI:
    """The app. `load` runs on the scheduler thread at start-up (the only model this server ever loads).
    `batching=False` keeps every forward batch-1 even where batched forwards are row-invariant."""
    metrics = ServerMetrics()
    scheduler = Scheduler(load, metrics, max_batch, max_tokens, allow_batching=batching)
    options = dict(method_options or {})
    key = api_key.encode() if api_key else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="fastdecode", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.metrics = metrics

    def check_key(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), key):
            raise APIError("invalid or missing API key: send Authorization: Bearer KEY", status=401, code="invalid_api_key")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(str(exc.detail), status=exc.status_code, code=None))

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:  # a route's refusal (e.g. check_key)
        return error_response(exc)

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.failed is not None:
            return JSONResponse({"status": "failed", "error": scheduler.failed}, status_code=503)
        if not scheduler.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        check_key(request)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_key(request)
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "fastdecode"}]})

    async def watch_client(request: Request, job: Job, events: asyncio.Queue[Event]) -> None:
        """Until cancelled: when the client disconnects, cancel the job and wake its handler. (While a response
        streams, Starlette watches instead and cancels the stream: only one of them may read the connection.)"""
        while True:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                job.cancelled.set()
                events.put_nowait(Event("error", error=APIError("the client disconnected", status=499)))
                return

    async def stream_events(spec: RequestSpec, first: Event, events: asyncio.Queue[Event], job: Job) -> AsyncIterator[str]:
        try:
            if spec.kind == "chat":
                yield _sse(chunk(spec, "", first=True))
            ev = first
            while ev.kind == "text":
                yield _sse(chunk(spec, ev.text))
                ev = await events.get()  # a disconnect cancels this generator (Starlette)
            if ev.kind == "error":
                assert ev.error is not None
                yield _sse(ev.error.body())
            else:
                yield _sse(chunk(spec, None, ev.finish_reason))
                if spec.include_usage:
                    assert ev.usage is not None
                    yield _sse(usage_chunk(spec, ev.usage))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a finished job is gone already; a running one is dropped at its next turn

    async def complete(request: Request, kind: str) -> Response:
        job: Job | None = None
        watcher: asyncio.Task[None] | None = None
        try:
            check_key(request)
            spec = parse_request(await read_json(request, max_body), kind, model_name, method, options)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Event] = asyncio.Queue()
            job = Job(spec, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
            scheduler.submit(job)
            watcher = asyncio.create_task(watch_client(request, job, events))
            first = await events.get()  # errors found on the scheduler side still get a status
            if first.kind == "error":
                assert first.error is not None
                return error_response(first.error)
            if spec.stream:
                watcher.cancel()
                started, job = job, None  # the stream's generator owns the job from here
                return StreamingResponse(stream_events(spec, first, events, started), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            texts, ev = [], first
            while ev.kind == "text":
                texts.append(ev.text)
                ev = await events.get()
            if ev.kind == "error":
                assert ev.error is not None
                return error_response(ev.error)
            assert ev.usage is not None
            job = None
            return JSONResponse(response(spec, "".join(texts), ev.finish_reason, ev.usage))
        except APIError as e:
            if e.status != 401:
                metrics.requests.labels(kind, "error").inc()
            return error_response(e)
        finally:
            if watcher is not None:
                watcher.cancel()
            if job is not None:
                job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, "completion")

    return app
