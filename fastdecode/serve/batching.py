"""Batched decode steps: one forward for the verify rows of many sequences — each its own number of rows (the
pending token, its draft tree, lookahead rows: ragged), its own mask and its own cache — whose every row is
bit-identical to that sequence's own batch-1 verify forward. So speculative decoding runs at batch > 1 with
ragged acceptance: each sequence's engine verifies, accepts and compacts its own cache as at batch 1.

Why the bits agree: everything but attention runs on the rows of all the sequences stacked as one (embedding,
RMSNorm, RoPE, the q/k/v and o projections, the MLP, the LM head), and on the CPU's row-invariant path (fp32,
and bf16 on CPUs that multiply bf16 natively: models/llama.py, tests/test_row_invariance.py) a row of an N-row
product is the same bits as in any other width up to ROW_INVARIANT_MAX rows (`narrow_product` cuts chunks);
attention runs per sequence, on its own cache, with the mask and position plan its own forward would build
(`LlamaModel.attention_inputs`). On a GPU the CUDA-graph runner's fused kernels compute every row alone at any
width (cuda_graphs.py), so there the whole batched forward is one captured graph (`GraphRunner.forward_batch`):
each sequence's cache is one of a pool in one storage, which the attention kernel reads at the sequence's own
offset (`PooledTarget`). Where the forwards are not row-invariant (bf16 on CPUs without native bf16, fp16 on a
CPU, the GPU's torch kernels) nothing is batched: `can_batch` says so, and the scheduler steps each sequence alone.

The engine stays unaware of it. Each sequence's generation runs in a `Fiber` (a thread that runs only while
the scheduler waits for it), and its engine's target is the server's `BatchedTarget`: a verify forward called
from a fiber is handed to the scheduler, which runs the forwards of every fiber in one batch and resumes
them; any other call (a prefill, a drafter's partial forward) runs the model right away.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from fastdecode.cache import KVCache
from fastdecode.cuda_graphs import BATCH_WIDTHS, WIDTHS, PoolKVCache, row_paths
from fastdecode.models import llama
from fastdecode.models.llama import Block, LlamaModel, row_invariant

MAX_ROWS = llama.ROW_INVARIANT_MAX  # rows per batched forward on the CPU: the widest that keeps the row-invariant path


def pooled(model: Any) -> bool:
    """A CUDA-graph runner whose fused kernels batch sequences (cuda_graphs.GraphRunner.forward_batch)."""
    return bool(getattr(model, "batches_sequences", False))


def can_batch(model: Any) -> bool:
    """Whether N-row forwards of this model give each row the bits it gets in a forward of its own."""
    if pooled(model):
        return True
    if not isinstance(model, LlamaModel) or model.device.type != "cpu":
        return False
    from fastdecode.api import cpu_has_fast_bf16  # bf16 without native support rounds by width (as Generator.row_invariant)

    native = model.dtype == torch.float32 or cpu_has_fast_bf16()
    return native and row_invariant(torch.empty(1, 1, dtype=model.dtype), MAX_ROWS)


def max_rows(model: Any) -> int:
    """The most rows one batched forward of this model takes."""
    return BATCH_WIDTHS[-1] if pooled(model) else MAX_ROWS


@dataclass
class Rows:
    """One sequence's verify forward: `model(tokens, positions, cache, mask)` as its engine would call it."""

    tokens: torch.Tensor  # (1, T)
    positions: torch.Tensor  # (1, T)
    cache: KVCache  # the rows are written from cache.length, which then grows by T
    mask: torch.Tensor | None  # (1, T, T) among the new rows (the cache visible), or None: causal
    paths: Any = None  # on a GPU: where each row finds its keys (cuda_graphs.row_paths), worked out in the fiber
    result: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits (1, T, V) fp32, hidden (1, T, D))
    argmax: list[int] | None = None  # on a GPU: each row's greedy token, computed in the forward's graph
    error: BaseException | None = None

    @property
    def width(self) -> int:
        return int(self.tokens.shape[1])


def batchable(model: LlamaModel, tokens: torch.Tensor, positions: torch.Tensor, cache: Any, mask: torch.Tensor | None) -> bool:
    """Whether a target call is a verify forward `forward_rows` reproduces (and not a prefill, a partial
    forward through some layers, or a call with a mask over the cache)."""
    if not isinstance(cache, KVCache) or tokens.dim() != 2 or tokens.shape[0] != 1 or positions.shape != tokens.shape:
        return False
    T = int(tokens.shape[1])
    if pooled(model) and (T > WIDTHS[-1] or not isinstance(cache, PoolKVCache)):
        return False
    if not 1 <= T <= MAX_ROWS or tuple(cache.k.shape[:2]) != (model.cfg.num_layers, 1) or cache.length + T > cache.max_len:
        return False
    return mask is None or tuple(mask.shape) == (1, T, T)


@torch.inference_mode()
def forward_rows(model: Any, batch: list[Rows], keep: bool = False) -> None:
    """One forward for the rows of every request in `batch` (at most `max_rows(model)` in all): sets each
    request's `result` to what `model(r.tokens, r.positions, r.cache, r.mask)` returns, bit for bit, and writes
    the K/V rows into each cache as that call does. On a GPU the runner's fused kernels run it
    (GraphRunner.forward_batch); on the CPU the code below."""
    if not batch:
        return
    if pooled(model):  # views of the graph's outputs; `keep`: copies, for when another batch runs before they are read
        for r, (logits, hidden, greedy) in zip(batch, model.forward_batch(batch), strict=True):
            if keep:
                logits, hidden = logits.clone(), hidden.clone()
            r.result, r.argmax = (logits[None], hidden[None]), greedy
        return
    widths = [r.width for r in batch]
    if sum(widths) > MAX_ROWS:
        raise ValueError(f"a batched forward takes at most {MAX_ROWS} rows, got {sum(widths)}")
    for r in batch:
        if r.cache.length + r.width > r.cache.max_len:
            raise ValueError(f"the KV cache holds {r.cache.max_len} rows; {r.cache.length} used, {r.width} more asked")
    x = model.embed_tokens(torch.cat([r.tokens for r in batch], 1))  # (1, N, D)
    cuts = [0]
    for w in widths:
        cuts.append(cuts[-1] + w)
    spans = list(zip(cuts[:-1], cuts[1:], strict=True))
    starts = [r.cache.length for r in batch]
    cos = [model.rope_cos[r.positions].to(x.dtype)[:, None] for r in batch]  # (1, 1, T, hd) each
    sin = [model.rope_sin[r.positions].to(x.dtype)[:, None] for r in batch]
    setup = [model.attention_inputs(x[:, a:b], r.positions, s, r.mask) for r, (a, b), s in zip(batch, spans, starts, strict=True)]
    for li in range(model.cfg.num_layers):
        block = cast(Block, model.layers[li])
        h = block.input_layernorm(x)  # (1, N, D)
        att = torch.cat([
            block.self_attn(h[:, a:b], cos[i], sin[i], r.cache.k[li], r.cache.v[li], starts[i], setup[i][0], setup[i][1])
            for i, (r, (a, b)) in enumerate(zip(batch, spans, strict=True))
        ], 1)  # (1, N, D)
        x = x + att
        x = x + block.mlp(block.post_attention_layernorm(x))
    hidden = model.norm(x)  # (1, N, D)
    logits = model.lm_head(hidden).float()  # (1, N, V)
    for r, (a, b), s in zip(batch, spans, starts, strict=True):
        r.cache.length = s + r.width
        r.result = (logits[:, a:b], hidden[:, a:b])


def chunks(batch: list[Rows], limit: int = MAX_ROWS) -> Iterator[list[Rows]]:
    """The requests in order, cut into groups of at most `limit` rows."""
    group: list[Rows] = []
    rows = 0
    for r in batch:
        if group and rows + r.width > limit:
            yield group
            group, rows = [], 0
        group.append(r)
        rows += r.width
    if group:
        yield group


class Cancelled(BaseException):
    """Raised inside a fiber whose sequence the scheduler dropped (a BaseException: no drafter catches it)."""


_current = threading.local()  # .fiber: the Fiber this thread runs, if any


class Fiber:
    """Runs one sequence's generator in a thread of its own, one slice at a time: `resume()` lets it run
    until it yields a piece of text, asks for a batched forward, ends or fails, and returns that event.
    Only one of the scheduler and its fibers runs at any moment, so nothing is shared concurrently.
    With `on_piece`, pieces of text go to that callback on the fiber's thread instead (the scheduler waits
    meanwhile, so nothing runs concurrently still) and `resume()` returns only at a forward, the end or an error:
    one thread switch each way per step instead of two."""

    def __init__(self, pieces: Iterator[str], name: str = "fastdecode-sequence", on_piece: Callable[[str], object] | None = None):
        self._pieces = pieces
        self._on_piece = on_piece
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._cancel = False
        self.event: tuple[str, Any] = ("start", None)  # ("piece", str) | ("forward", Rows) | ("end", None) | ("error", exc)
        self.finished = False

    def resume(self) -> tuple[str, Any]:
        if self.finished:
            raise RuntimeError("the fiber has finished")
        if not self._thread.is_alive() and self.event[0] == "start":
            self._thread.start()
        else:
            self._go.release()
        self._back.acquire()
        return self.event

    def close(self) -> None:
        """Stop the generator where it waits (a Cancelled exception unwinds it) and let the thread end."""
        if self.finished or self.event[0] == "start":
            self.finished = True
            return
        self._cancel = True
        self._go.release()
        self._back.acquire()
        self.finished = True

    def _main(self) -> None:
        _current.fiber = self
        try:
            for piece in self._pieces:
                if self._on_piece is not None:
                    self._on_piece(piece)
                else:
                    self._pause(("piece", piece))
            self.event = ("end", None)
        except Cancelled:
            self.event = ("end", None)
        except BaseException as e:  # noqa: BLE001  (handed to the scheduler, which reports it)
            self.event = ("error", e)
        finally:
            _current.fiber = None
            self.finished = True
            self._back.release()

    def _pause(self, event: tuple[str, Any]) -> None:
        self.event = event
        self._back.release()
        self._go.acquire()
        if self._cancel:
            raise Cancelled()

    def forward(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """On the fiber's thread: wait until the scheduler has run `rows` in a batch."""
        self._pause(("forward", rows))
        if rows.error is not None:
            raise rows.error
        assert rows.result is not None
        return rows.result


def current_fiber() -> Fiber | None:
    return getattr(_current, "fiber", None)


class BatchedTarget:
    """The target of every batched sequence's engine, called like the model: a verify forward called from a
    fiber waits for the scheduler's next batch; anything else (a prefill, a partial forward, a call from
    outside a fiber) runs the model at once. Equal to and hashed as the model, so that a draft model loaded
    for this target (keyed by it) is the one loaded for the model."""

    def __init__(self, model: Any):
        self.model = model

    def __getattr__(self, name: str) -> Any:  # cfg, device, dtype, new_cache …
        return getattr(self.model, name)

    def __eq__(self, other: object) -> bool:
        return other is self or other is self.model or (isinstance(other, BatchedTarget) and other.model is self.model)

    def __hash__(self) -> int:
        return hash(self.model)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> Any:
        fiber = current_fiber()
        if fiber is None or args or kwargs or not batchable(self.model, tokens, positions, cache, mask):
            return self.model(tokens, positions, cache, mask, *args, **kwargs)
        return fiber.forward(Rows(tokens, positions, cache, mask))

    def release(self, fiber: Fiber | None) -> None:
        """A sequence has ended: give back what it held (nothing here; a pool cache on a GPU)."""


class PooledTarget(BatchedTarget):
    """On a GPU: each sequence's cache is one of the runner's pool (GraphRunner.new_pool), handed out when its
    engine asks for the target's cache and given back when it ends; verify forwards run batched through the
    fused kernels (GraphRunner.forward_batch), anything else (a prefill) by the runner's batch-1 path in its own
    cache, with the rows copied in and out (GraphRunner.run_in_storage), so every K/V row has its batch-1 bits."""

    def __init__(self, model: Any, size: int):
        super().__init__(model)
        self.runner: Any = model  # a cuda_graphs.GraphRunner
        self._free: list[PoolKVCache] = model.new_pool(size)[::-1]
        self._held: dict[Fiber, PoolKVCache] = {}
        self._argmax: dict[Fiber, list[int] | None] = {}  # each fiber's last forward's greedy tokens, if batched

    def new_target_cache(self, batch: int, length: int) -> KVCache:
        fiber = current_fiber()
        if fiber is None or batch != 1:
            return cast(KVCache, self.runner.new_target_cache(batch, length))
        self.release(fiber)  # a second generation in the same fiber reuses nothing stale
        if not self._free:
            raise RuntimeError("every cache of the pool is in use: the scheduler runs more sequences than it has caches")
        cache = self._held[fiber] = self._free.pop()
        cache.max_len, cache.length = min(length, self.runner.cfg.max_position), 0
        return cache

    def release(self, fiber: Fiber | None) -> None:
        if fiber is not None and fiber in self._held:
            self._free.append(self._held.pop(fiber))
        self._argmax.pop(fiber, None)  # type: ignore[arg-type]

    def greedy_tokens(self, rows: int) -> list[int] | None:
        fiber = current_fiber()
        if fiber is None:
            return cast("list[int] | None", self.runner.greedy_tokens(rows))
        greedy = self._argmax.get(fiber)
        return None if greedy is None else greedy[:rows]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> Any:
        fiber = current_fiber()
        if fiber is not None and not args and not kwargs and batchable(self.model, tokens, positions, cache, mask):
            rows = Rows(tokens, positions, cache, mask)
            rows.paths = row_paths(mask, positions[0].to("cpu", torch.int64).numpy() - cache.length)  # a bad tree fails here, alone
            out = fiber.forward(rows)
            self._argmax[fiber] = rows.argmax
            return out
        if fiber is not None:
            self._argmax[fiber] = None
        if isinstance(cache, PoolKVCache):
            return self.runner.run_in_storage(cache, lambda rc: self.runner(tokens, positions, rc, mask, *args, **kwargs))
        return self.model(tokens, positions, cache, mask, *args, **kwargs)


def make_target(model: Any, size: int) -> BatchedTarget:
    """The engines' target for batched rounds over `model`, for up to `size` sequences at once."""
    return PooledTarget(model, size) if pooled(model) else BatchedTarget(model)
