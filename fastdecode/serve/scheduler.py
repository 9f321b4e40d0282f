"""The scheduler: one thread owns the model; requests reach it through a queue and their text goes back
through each job's `emit` callback (the routes hand it to the event loop thread-safely).

Every request is an ordinary `Generator.stream` of its own (its own engine, cache and drafter, so any
registered method serves, with the library's prompt handling, stop strings and streaming text). A new request
joins at the next round; it never waits for others to finish (up to `max_batch` running, the rest queue).

Where the model's forwards are row-invariant (bf16 on a CPU with native bf16, bf16/fp16 through the fused
kernels on a GPU: batching.can_batch) the scheduler runs rounds: every running sequence, each in its fiber,
drafts and asks for its verify forward; the verify rows of all of them (ragged: each its own tree) run as one
batched forward (batching.py); then
each sequence verifies, accepts (its own number of tokens), compacts its cache and emits. Every row has the
bits of the sequence's own batch-1 forward, so each greedy answer is token-identical to the library's batch-1
answer, whatever runs beside it. Elsewhere (fp32, the GPU's torch kernels) the thread interleaves the sequences
instead, advancing each by one piece of text in turn with batch-1 forwards.

What it must never do: run on the event loop, load a model a request names, or let one request's error
or disconnect stop the others.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdecode.api import Generator, Stream
from fastdecode.drafters import Drafter, StepResult, get_method
from fastdecode.engine import Engine, StopConditions
from fastdecode.serve.batching import BatchedTarget, Fiber, Rows, can_batch, chunks, forward_rows, make_target, max_rows
from fastdecode.serve.metrics import ServerMetrics
from fastdecode.serve.protocol import APIError, RequestSpec, usage


@dataclass
class Event:
    """What the scheduler tells a request: a piece of text, the end, or an error (before any text)."""

    kind: str  # "text", "done" or "error"
    text: str = ""
    finish_reason: str = ""
    usage: dict[str, int] | None = None
    error: APIError | None = None


@dataclass
class Job:
    spec: RequestSpec
    emit: Callable[[Event], object]  # called on the scheduler thread; must not block
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Sequence:
    job: Job
    stream: Stream = field(default_factory=lambda: Stream(iter(())))
    pieces: Iterator[str] = field(default_factory=lambda: iter(()))
    engine: Engine | None = None
    fiber: Fiber | None = None  # batched rounds: the thread its generation runs in
    rows: Rows | None = None  # batched rounds: the verify forward it waits for
    saved: Any = None  # a CUDA-graph runner's cache rows of this sequence while others step (RunnerCaches)


class RunnerCaches:
    """A CUDA-graph runner keeps the target's cache (and a layer-skip drafter's, and a draft model's) in storage
    its graphs point at, shared by every generation. To interleave sequences, the resident sequence's rows are
    copied out and the next one's copied in when the turn passes to another sequence (nothing is copied while
    one sequence runs alone). On a plain model (the CPU) every sequence has its own cache: this does nothing."""

    def __init__(self, model: Any, target: bool = True):
        self.model = model if hasattr(model, "new_target_cache") else None
        self.target = target  # False in batched rounds on a GPU: each sequence's target cache is its own (a pool's)
        self.resident: _Sequence | None = None  # whose rows the storages hold

    def _storages(self) -> list[torch.Tensor]:
        m = self.model
        if m is None:
            return []
        pairs = [m._storage] if m._storage is not None and self.target else []
        pairs += list(m._draft_storage.values())
        from fastdecode.drafters.sps import _LOADED  # draft models of this target (sps, bild, eagle), each its own runner

        pairs += [d._storage for d in _LOADED.get(m, {}).values() if getattr(d, "_storage", None) is not None]
        return [t for pair in pairs for t in pair]

    def activate(self, seq: _Sequence, running: list[_Sequence]) -> None:
        if self.model is None or self.resident is seq:
            return
        live = self._storages()
        old = self.resident
        if old is not None and old in running:
            if old.saved is None or len(old.saved) != len(live):
                old.saved = [t.clone() for t in live]
            else:
                for dst, src in zip(old.saved, live, strict=True):
                    dst.copy_(src)
        if seq.saved is not None:  # a new sequence needs nothing: its prefill writes from slot 0
            for dst, src in zip(live, seq.saved, strict=False):
                dst.copy_(src)  # (its buffers stay, for its next turn out)
        self.resident = seq


def _watch_steps(drafter: Drafter, metrics: ServerMetrics, seq: _Sequence) -> None:
    """Count every step of this drafter's generation in the metrics (drafted depth and nodes, accepted, time),
    from the StepResult the engine hands the drafter: the engine itself stays unaware of the server."""
    learn = drafter.learn

    def counted(result: StepResult) -> None:
        metrics.record_step(max(result.proposal.depths(), default=0), len(result.proposal), len(result.verdict.path),
                            result.step_seconds)
        learn(result)

    drafter.learn = counted  # type: ignore[method-assign]


class Scheduler:
    def __init__(self, load: Callable[[], Generator], metrics: ServerMetrics, max_batch: int = 64, max_tokens: int = 256,
                 allow_batching: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self._load = load
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_tokens = max_tokens  # the default answer length, where a request gives none
        self.allow_batching = allow_batching
        self.batching = False  # whether steps run in batched rounds: known once the model is loaded (batching.can_batch)
        self._target: BatchedTarget | None = None  # the engines' target in batched rounds
        self.generator: Generator | None = None
        self.ready = threading.Event()
        self.failed: str | None = None  # why the model did not load
        self._queue: queue.Queue[Job] = queue.Queue()
        self._running: list[_Sequence] = []
        self._stop = threading.Event()
        self._caches = RunnerCaches(None)
        self._thread = threading.Thread(target=self._run, name="fastdecode-scheduler", daemon=True)

    # ------------------------------------------------------------ the event loop's side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        if self.failed is not None:
            raise APIError(f"the model failed to load: {self.failed}", status=503, type_="server_error")
        if not self.ready.is_set():
            raise APIError("the model is still loading: retry shortly", status=503, type_="server_error")
        self._queue.put(job)
        self.metrics.waiting.set(self._queue.qsize())

    # ------------------------------------------------------------ the scheduler thread

    def _run(self) -> None:
        try:
            self.generator = self._load()
        except Exception as e:  # noqa: BLE001  (any failure to load is reported by /health and every request)
            self.failed = " ".join(f"{type(e).__name__}: {e}".split())
            print(f"fastdecode serve: the model failed to load: {self.failed}", file=sys.stderr)
            return
        self.batching = self.allow_batching and can_batch(self.generator.model)
        # a drafter's caches in storage of a runner's are swapped per sequence; in batched rounds the target's are not
        self._caches = RunnerCaches(self.generator.model, target=not self.batching)
        if self.batching:
            try:
                self._target = make_target(self.generator.model, self.max_batch)
            except Exception as e:  # noqa: BLE001  (a pool too large for the GPU: say so, like any failure to load)
                self.failed = " ".join(f"{type(e).__name__}: {e}".split())
                print(f"fastdecode serve: cannot set up batching: {self.failed}", file=sys.stderr)
                return
        self.ready.set()
        while not self._stop.is_set():
            self._admit()
            if self.batching:
                self._round()
            else:
                for seq in list(self._running):
                    self._turn(seq)
            self.metrics.running.set(len(self._running))
        for seq in self._running:  # shutting down: nobody waits forever
            if seq.fiber is not None:
                seq.fiber.close()
            seq.job.emit(Event("error", error=APIError("the server is shutting down", status=503, type_="server_error")))

    def _admit(self) -> None:
        """Start queued requests while there is room; wait for one when nothing runs."""
        block = not self._running
        while len(self._running) < self.max_batch:
            try:
                job = self._queue.get(timeout=0.1) if block else self._queue.get_nowait()
            except queue.Empty:
                break
            block = False
            self._start(job)
        self.metrics.waiting.set(self._queue.qsize())

    def _start(self, job: Job) -> None:
        spec = job.spec
        if job.cancelled.is_set():
            self.metrics.requests.labels(spec.kind, "cancelled").inc()
            return
        try:
            seq = self._sequence(job)
        except ValueError as e:  # context overflow, an empty prompt, a bad chat: the client's error
            self.metrics.requests.labels(spec.kind, "error").inc()
            job.emit(Event("error", error=APIError(str(e))))
            return
        except Exception as e:  # noqa: BLE001  (a bug must not take the scheduler down)
            self._internal_error(job, e)
            return
        self._running.append(seq)

    def _sequence(self, job: Job) -> _Sequence:
        """What `Generator.stream` does, on a Generator of the request's own: its own engine (whose cache the
        drafters read) and a fresh drafter. The method's options go to the drafter as the checked dataclass
        (passed as keywords they could collide with stream()'s own: ngram's `prompt`, lookahead's `seed`)."""
        spec, base = job.spec, self.generator
        assert base is not None
        seq = _Sequence(job)
        gen = Generator(base.model if self._target is None else self._target, base.tokenizer, base.source)  # type: ignore[arg-type]
        ids = gen.prompt_ids(spec.prompt, raw=spec.raw)
        room = gen.engine.context_length - len(ids)
        if room < 1:
            raise ValueError(f"the prompt ({len(ids)} tokens) fills the model's context of {gen.engine.context_length} tokens")
        max_new = min(self.max_tokens, room) if spec.max_tokens is None else spec.max_tokens
        gen.engine.check_request(len(ids), max_new)
        drafter = get_method(spec.method)(spec.options)
        _watch_steps(drafter, self.metrics, seq)
        tok = gen.tokenizer
        cond = StopConditions(max_new, tok.eos_ids, spec.stop, tok.decode)
        seq.stream._pieces = gen._stream(seq.stream, ids, drafter, spec.params, cond, spec.method)
        seq.pieces, seq.engine = iter(seq.stream), gen.engine
        if self.batching:
            job = seq.job
            seq.fiber = Fiber(seq.pieces, on_piece=lambda piece: job.emit(Event("text", piece)))
        self.metrics.prompt_tokens.inc(len(ids))
        return seq

    # ------------------------------------------------------------ batched rounds

    def _round(self) -> None:
        """One step of every running sequence: each drafts (in its fiber) up to its verify forward, then the
        forwards of all of them run batched, in groups of at most MAX_ROWS rows. The sequences take their
        rows (verify, accept, emit) at the start of the next round."""
        assert self.generator is not None
        for seq in list(self._running):
            self._advance(seq)
        waiting = [s.rows for s in self._running if s.rows is not None]
        groups = list(chunks(waiting, max_rows(self.generator.model)))
        for group in groups:
            try:
                forward_rows(self.generator.model, group, keep=len(groups) > 1)
            except Exception as e:  # noqa: BLE001  (each sequence of the group fails alone, in its fiber)
                traceback.print_exc(file=sys.stderr)
                for r in group:
                    r.error = e
                continue
            self.metrics.batch_sequences.observe(len(group))
            self.metrics.batch_rows.observe(sum(r.width for r in group))

    def _advance(self, seq: _Sequence) -> None:
        """Run a sequence's fiber until it waits for a verify forward, ends or fails, emitting its text."""
        assert seq.fiber is not None
        self._caches.activate(seq, self._running)  # a drafter's caches in a runner's storage (GPU), if any
        while True:
            if seq.job.cancelled.is_set():  # the client went away: stop the generation, drop its cache
                seq.fiber.close()
                self._drop(seq)
                self.metrics.requests.labels(seq.job.spec.kind, "cancelled").inc()
                return
            seq.rows = None
            kind, value = seq.fiber.resume()
            if kind == "forward":
                seq.rows = value
                return
            if kind == "piece":
                seq.job.emit(Event("text", value))
                continue
            self._drop(seq)
            if kind == "error":
                self._internal_error(seq.job, value)
            else:
                self._finish(seq)
            return

    def _drop(self, seq: _Sequence) -> None:
        """A batched sequence has ended: out of the running list, its pool cache (GPU) back."""
        self._running.remove(seq)
        if self._target is not None:
            self._target.release(seq.fiber)

    def _internal_error(self, job: Job, e: BaseException) -> None:
        traceback.print_exception(e, file=sys.stderr)
        self.metrics.requests.labels(job.spec.kind, "error").inc()
        job.emit(Event("error", error=APIError(f"internal error: {type(e).__name__}: {e}", status=500, type_="server_error")))

    def _turn(self, seq: _Sequence) -> None:
        """Advance one sequence by one piece of text (one step, or the few until the piece is ready)."""
        kind = seq.job.spec.kind
        if seq.job.cancelled.is_set():  # the client went away: drop the sequence and its cache
            self._running.remove(seq)
            self.metrics.requests.labels(kind, "cancelled").inc()
            return
        try:
            self._caches.activate(seq, self._running)
            piece = next(seq.pieces, None)
        except Exception as e:  # noqa: BLE001  (a bug must not take the other requests down)
            self._running.remove(seq)
            self._internal_error(seq.job, e)
            return
        if piece is not None:
            seq.job.emit(Event("text", piece))
            return
        self._running.remove(seq)
        self._finish(seq)

    def _finish(self, seq: _Sequence) -> None:
        kind = seq.job.spec.kind
        res = seq.stream.result
        assert res is not None
        self.metrics.prefill_seconds.observe(res.stats.prefill_s)
        self.metrics.generation_tokens.inc(res.stats.new_tokens)
        self.metrics.requests.labels(kind, "ok").inc()
        seq.job.emit(Event("done", finish_reason=res.finish_reason, usage=usage(res.stats.prompt_tokens, res.stats.new_tokens)))


def wait_ready(scheduler: Scheduler, timeout: float) -> bool:
    """For scripts and tests: wait until the model is loaded (True) or failed / timed out (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and scheduler.failed is None:
        if scheduler.ready.wait(0.05):
            return True
    return False
