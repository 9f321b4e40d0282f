"""Static shapes and CUDA graphs for the target's forward on a GPU.

On a GPU the model is small next to the host's cost of launching its ~750 kernels one by one (~20 ms a
forward on the H200 machine, whatever the width), so every forward the decode loop runs is replayed from a
captured CUDA graph instead. `GraphRunner` wraps a `LlamaModel` and keeps its call signature
(`runner(tokens, positions, cache, mask) -> (logits, hidden)`, plus `.cfg`, `.device`, `.dtype`,
`.new_cache`), so the drafters and the verifier do not know it is there; the engine asks it for the target's
cache with `new_target_cache`.

How a forward becomes static:
- Width buckets: a forward of T rows runs the graph of the smallest bucket >= T (1, 2, 4, … 64; prefill
  chunks 128 … 2048). Padded rows read token 0 at position 0 and write their K/V to a scratch slot past the
  end of the cache, which no real row ever attends to and nothing ever keeps.
- Attention covers the cache in use, never the whole preallocated cache: the fused decode kernels read
  each row's position on the device and stop there (a row reads its keys in position order, a tree row its
  ancestors through the `anc` table: row-invariant); the torch path reads up to a span bucket (a power of
  two >= 256 covering start + T) with an additive bias that hides the rows past the end.
- Static inputs: token ids, positions, write slots and (for trees) the mask and each row's ancestor slots
  by depth live in one device buffer, filled by one host-to-device copy per forward; the K/V rows are
  written with `index_copy_` at the slots.
- One KV storage per runner: `new_target_cache` hands out a `KVCache` over it, so the captured graphs keep
  pointing at the same memory from one generation to the next. `new_cache` (what drafters call for caches
  of their own) gives a separate plain cache, and forwards into it run the model without graphs.
- Fusion: decode forwards (<= 64 rows) in bf16/fp16 run the fused Triton kernels of triton_kernels.py, five
  per layer, with fp32 logits; other forwards (prefill chunks, fp32) run PyTorch's kernels with RMSNorm, RoPE,
  SiLU·mul and the attention bias fused by `torch.compile` (default mode). q/k/v and gate/up use one
  concatenated weight each. Each graph also takes every row's argmax of the fp32 logits, which
  `greedy_tokens` reads back (a greedy step then costs no separate argmax launch).
- Layer subsets: `new_cache(..., layers=n)` hands a drafter (layer-skip) a cache over storage of the
  runner's with n layers, and `layers=` forwards into it replay graphs keyed by the layer tuple.

What it must never do: decide anything about drafting, or change what the model computes (only how its
kernels are launched). On the CPU it runs the same static code eagerly (no capture), which is how the
tests check it against `LlamaModel` there; forwards into caches that are not the runner's fall back to the
model itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from fastdecode.cache import KVCache
from fastdecode.models.llama import Block, LlamaModel, ModelConfig
from fastdecode.tokenizer import cache_dir

# Compiled Triton kernels and torch.compile's artifacts live with fastdecode's other caches, so a second
# process on the machine loads them instead of compiling again (unless the user points them elsewhere).
os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir() / "triton"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))

WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # verify / AR forwards, padded up to one of these
PREFILL_WIDTHS = (128, 256, 512, 1024, 2048)  # prefill chunks; longer prompts run in several chunks
MIN_SPAN = 256  # the smallest cache span attention reads; spans are powers of two from here
MAX_ATTN_SPLITS = 64  # splits of the fused attention (longer contexts get longer splits, never more)
BATCH_WIDTHS = (16, 32, 64, 128, 256, 512)  # forwards of several sequences' rows (the server's batches), padded up


# How each fused linear launches (triton_kernels.fused_linear): columns per program, K chunk, tensor cores or
# CUDA cores, warps, pipeline stages. One launch per projection serves every decode width (1 to 64 rows), and
# both kernels compute a row the same way whatever the number of rows (tensor cores in 16-row tiles, the
# CUDA-core kernel a program per row), so the AR step and a verify round of any width agree to the bit and
# greedy speculative decoding stays token-identical in bf16. No tuning can break that: there is nothing
# per width to tune (a `wide` group once served 32 and 64 rows and made `ngram` and `lookahead` part from
# `ar` on 59% and 72% of prompts in bf16 on an H100). Measured on the H200 by scripts/gpu_kernel_sweep.py;
# FASTDECODE_TUNING (JSON, or a JSON file) overrides any part, on any GPU.
LINEARS = ("qkv", "o", "gu", "down", "lm")
_TC = {"dot": True, "num_warps": 4, "num_stages": 3}
DEFAULT_TUNING: dict[str, Any] = {
    "decode": {
        "qkv": {"block_n": 8, "block_k": 1024, "dot": False, "num_warps": 8, "num_stages": 3},  # 3.2 us at 1 row, not 7.7
        "o": {"block_n": 32, "block_k": 256, **_TC},
        "gu": {"block_n": 32, "block_k": 128, **_TC},
        "down": {"block_n": 32, "block_k": 256, **_TC},
        "lm": {"block_n": 128, "block_k": 64, **_TC},
    },
}
# where a CUDA-core launch cannot hold a (wider) model's K in one block: tensor cores, at every width alike
TENSOR_CORE_FALLBACK: dict[str, dict[str, Any]] = {
    "qkv": {"block_n": 16, "block_k": 128, **_TC},
    "o": {"block_n": 16, "block_k": 256, **_TC},
    "gu": {"block_n": 16, "block_k": 128, **_TC},
    "down": {"block_n": 16, "block_k": 256, **_TC},
    "lm": {"block_n": 256, "block_k": 64, **_TC},
}
_LAUNCH_KEYS = {"block_n", "block_k", "dot", "num_warps", "num_stages"}


def load_tuning(spec: str | None = None) -> dict[str, Any]:
    """DEFAULT_TUNING with `spec` (JSON text or a JSON file's path; default $FASTDECODE_TUNING) merged over it.
    `narrow`, the name of the group in files written before issue 10, is read as `decode`."""
    spec = os.environ.get("FASTDECODE_TUNING", "") if spec is None else spec
    tuning = json.loads(json.dumps(DEFAULT_TUNING))
    if not spec:
        return tuning
    try:
        text = spec if spec.lstrip().startswith("{") else open(spec).read()
        over = json.loads(text)
    except (OSError, ValueError) as e:
        raise ValueError(f"FASTDECODE_TUNING: cannot read {spec!r}: {e}") from None
    if isinstance(over, dict) and "wide" in over:
        raise ValueError("FASTDECODE_TUNING: there is no `wide` group any more: one `decode` launch per projection serves every width")
    if not isinstance(over, dict) or set(over) - {"decode", "narrow"}:
        raise ValueError(f"FASTDECODE_TUNING: expected the key decode; got {spec!r}")
    for group, kinds in over.items():
        if not isinstance(kinds, dict) or not all(isinstance(c, dict) for c in kinds.values()):
            raise ValueError(f"FASTDECODE_TUNING: {group} must map projections to launch settings; got {kinds!r}")
        for kind, cfg in kinds.items():
            if kind not in LINEARS:
                raise ValueError(f"FASTDECODE_TUNING: unknown linear {kind!r} (one of {', '.join(LINEARS)})")
            if set(cfg) - _LAUNCH_KEYS:
                raise ValueError(f"FASTDECODE_TUNING: unknown launch keys {sorted(set(cfg) - _LAUNCH_KEYS)} for {kind!r}")
            tuning["decode"][kind].update(cfg)
    return tuning


def width_bucket(t: int) -> int:
    for w in (*WIDTHS, *PREFILL_WIDTHS):
        if t <= w:
            return w
    raise ValueError(f"no width bucket holds {t} rows (max {PREFILL_WIDTHS[-1]})")


def span_bucket(need: int, cap: int) -> int:
    s = MIN_SPAN
    while s < need:
        s *= 2
    return min(s, cap)


def tree_paths(mask: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each new row finds its keys among the new rows, for the fused attention: (t, d, j) triples, row t
    sees row j at depth d (its position minus the forward's start). The rows must be tree paths: row t sees
    depth[t] + 1 rows, one at each depth 0 .. depth[t] (a chain, a draft tree, lookahead rows); else ValueError."""
    T = mask.shape[0]
    tt, jj = np.nonzero(mask)
    ok = T > 0 and depth.min() >= 0 and depth.max() < T and np.array_equal(np.bincount(tt, minlength=T), depth + 1)
    if ok and (depth[jj] <= depth[tt]).all():
        seen = np.zeros((T, T), dtype=bool)
        seen[tt, depth[jj]] = True
        ok = bool((seen.sum(1) == depth + 1).all())
    else:
        ok = False
    if not ok:
        raise ValueError("a forward's rows must be tree paths: each row sees one new row per position up to its own")
    return tt, depth[jj], jj


def row_paths(mask: torch.Tensor | None, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`tree_paths` of a forward's rows: `mask` (1, T, T) among them, or None for a chain (row t at depth t)."""
    if mask is None:
        tt, jj = np.tril_indices(len(depth))
        if not np.array_equal(depth, np.arange(len(depth))):
            raise ValueError("a causal forward's rows must sit at consecutive positions from the cache's length")
        return tt, jj, jj
    return tree_paths(mask.reshape(mask.shape[-2], mask.shape[-1]).to("cpu", torch.int64).numpy(), depth)


# ---------------------------------------------------------------- the fusable pieces (pure functions)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # fp32 statistics, cast back before the weight, as the reference does
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + h
    return x, rms_norm(x, w, eps)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def rope_split(
    qkv: torch.Tensor,  # (T, (h + 2·kvh)·hd)
    cos: torch.Tensor,  # (T, hd)
    sin: torch.Tensor,
    h: int,
    kvh: int,
    hd: int,
    qn: torch.Tensor | None,  # Qwen3's per-head norms of q and k, or None
    kn: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q grouped by kv head (1, kvh, T·rep, hd), k (1, kvh, T, hd) rotated, v (1, kvh, T, hd)."""
    T = qkv.shape[0]
    q = qkv[:, : h * hd].view(T, h, hd)
    k = qkv[:, h * hd : (h + kvh) * hd].view(T, kvh, hd)
    v = qkv[:, (h + kvh) * hd :].view(T, kvh, hd)
    if qn is not None and kn is not None:
        q, k = rms_norm(q, qn, eps), rms_norm(k, kn, eps)
    c, s = cos[:, None], sin[:, None]  # (T, 1, hd)
    q = q * c + torch.cat((-q[..., hd // 2 :], q[..., : hd // 2]), dim=-1) * s
    k = k * c + torch.cat((-k[..., hd // 2 :], k[..., : hd // 2]), dim=-1) * s
    rep = h // kvh
    # query head j·rep + r shares kv head j: rows (t, r) of kv head j become one sequence of T·rep rows,
    # so attention runs as plain multi-head attention over the cache without copying K/V per query head
    qg = q.view(T, kvh, rep, hd).permute(1, 0, 2, 3).reshape(1, kvh, T * rep, hd).contiguous()
    return qg, k.transpose(0, 1)[None], v.transpose(0, 1)[None]


def attention_bias(
    start: torch.Tensor,  # () int64: the first slot the new rows write
    tmask: torch.Tensor,  # (Tb, Tb) bool: which new rows each new row sees
    cols: torch.Tensor,  # (S,) int64: 0 .. S-1
    rep: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(1, 1, Tb·rep, S) additive bias: 0 where row i may attend to cache slot c, -inf elsewhere."""
    Tb = tmask.shape[0]
    rel = cols - start  # (S,) position among the new rows
    inside = (rel >= 0) & (rel < Tb)
    seen = tmask[:, rel.clamp(0, Tb - 1)] & inside  # (Tb, S)
    seen = seen | (rel < 0)  # the cache before `start` is always visible
    bias = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, float("-inf"))
    return bias.repeat_interleave(rep, dim=0)[None, None]  # (1, 1, Tb·rep, S)


def out_merge(o: torch.Tensor, T: int) -> torch.Tensor:
    """(1, kvh, T·rep, hd) attention output -> (T, h·hd) in the model's head order."""
    _, kvh, Tr, hd = o.shape
    return o.view(kvh, T, Tr // T, hd).permute(1, 0, 2, 3).reshape(T, -1)


# ---------------------------------------------------------------- the cache the graphs point at


class StaticKVCache(KVCache):
    """A `KVCache` over the runner's storage (the last slot is the scratch row of padded writes)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, max_len: int):  # the fields of KVCache, over given storage
        self.k, self.v = k, v
        self.max_len = max_len
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class PoolKVCache(StaticKVCache):
    """One sequence's cache in the runner's pool (`GraphRunner.new_pool`): views of the pool's storage, whose
    slot `base + c` holds position c. Batched forwards (`forward_batch`) write and read it there."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, max_len: int, index: int, base: int):
        super().__init__(k, v, max_len)
        self.index = index  # which of the pool's caches
        self.base = base  # its first slot in the pool's storage


GraphKey = tuple[int, int, bool, bool, tuple[int, ...] | None]  # (width, span, causal, logits, layers or None = all)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph, or None where forwards run eagerly
    run: Callable[[], tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]]
    logits: torch.Tensor | None  # (Tb, V) fp32, the captured output
    hidden: torch.Tensor  # (Tb, D)
    argmax: torch.Tensor | None  # (Tb,) int64: each row's greedy token, computed in the graph


class GraphRunner:
    """A `LlamaModel` whose forwards replay CUDA graphs; same call signature as the model."""

    def __init__(
        self,
        model: LlamaModel,
        use_graphs: bool | None = None,
        compile: bool | None = None,
        kernels: str | None = None,  # "triton" (fused decode kernels) or "torch"; default: triton where it can run
        verbose: bool | None = None,  # print a line per captured graph (default: $FASTDECODE_VERBOSE=1)
    ):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        on_gpu = model.device.type == "cuda"
        self.use_graphs = on_gpu if use_graphs is None else use_graphs
        if compile is None:
            compile = on_gpu and os.environ.get("FASTDECODE_COMPILE", "1") != "0"
        if kernels is None:
            kernels = os.environ.get("FASTDECODE_KERNELS", "triton" if on_gpu else "torch")
        if kernels == "triton" and not self._triton_fits(model):
            kernels = "torch"
        self.kernels = kernels
        # tuning of the fused kernels (measured on the H200: scripts/gpu_kernel_sweep.py, gpu_forward_timing.py)
        self.attn_block_s = int(os.environ.get("FASTDECODE_ATTN_BLOCK", "32"))
        # positions per attention split (a multiple of the block): fixed, so a row's splits never depend on the width
        self.attn_share = int(os.environ.get("FASTDECODE_ATTN_SHARE", "128"))
        if self.attn_share < self.attn_block_s or self.attn_share % self.attn_block_s:
            raise ValueError(f"FASTDECODE_ATTN_SHARE {self.attn_share} must be a multiple of FASTDECODE_ATTN_BLOCK {self.attn_block_s}")
        self.triton_max_width = int(os.environ.get("FASTDECODE_TRITON_MAX_WIDTH", "64"))  # wider forwards: torch kernels
        self.tuning = load_tuning()
        self.verbose = os.environ.get("FASTDECODE_VERBOSE", "0") == "1" if verbose is None else verbose
        self.capture_seconds = 0.0  # capture + compilation, all graphs so far
        self.graphs: dict[GraphKey, _Graph] = {}
        self.last_key: GraphKey | None = None
        self._argmax: torch.Tensor | None = None  # the last forward's per-row argmax (a graph output), if it had logits
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._storage: tuple[torch.Tensor, torch.Tensor] | None = None  # the target's cache
        self._seq_pool: tuple[torch.Tensor, torch.Tensor] | None = None  # many sequences' caches (new_pool), for forward_batch
        self.batch_graphs: dict[int, _Graph] = {}  # forward_batch's graphs, by rows bucket
        self._draft_storage: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer-subset caches, by layer count
        cfg = self.cfg
        d = cfg.hidden_size
        self._k_of = {"qkv": d, "o": cfg.num_heads * cfg.head_dim, "gu": d, "down": cfg.intermediate_size, "lm": d}  # K per projection
        blocks = self._blocks = cast("list[Block]", list(model.layers))
        with torch.no_grad():
            self._w_qkv = [
                torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight]) for b in blocks
            ]
            self._b_qkv = (
                [torch.cat([b.self_attn.q_proj.bias, b.self_attn.k_proj.bias, b.self_attn.v_proj.bias]) for b in blocks]
                if cfg.attention_bias
                else [None] * cfg.num_layers
            )
            self._w_gu = [torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]) for b in blocks]
            if self.kernels == "triton":  # the fused kernels take RMSNorm weights folded into the next matmul
                self._w_qkv_n = [w * b.input_layernorm.weight[None, :] for w, b in zip(self._w_qkv, blocks, strict=True)]
                self._w_gu_n = [w * b.post_attention_layernorm.weight[None, :] for w, b in zip(self._w_gu, blocks, strict=True)]
                self._w_lm_n = model.lm_head.weight * model.norm.weight[None, :]
        self._cap = -(-cfg.max_position // 64) * 64  # cache slots attention may read; slot `_cap` is scratch
        maxw = PREFILL_WIDTHS[-1]
        n_ints = 3 * maxw + 2 * WIDTHS[-1] ** 2
        self._ints = torch.zeros(n_ints, dtype=torch.int64, device=model.device)  # ids|pos|slots|mask|ancestor slots
        # the host side of `_ints`: filled through numpy, sent by one asynchronous copy (pinned memory on a GPU)
        self._host = torch.zeros(n_ints, dtype=torch.int64, pin_memory=model.device.type == "cuda")
        self._host_np = self._host.numpy()
        self._copied = torch.cuda.Event() if model.device.type == "cuda" else None  # the last copy out of _host
        self._cols = torch.arange(self._cap, device=model.device)
        self._tril: dict[int, torch.Tensor] = {}
        fns: dict[str, Callable[..., Any]] = dict(
            rms_norm=rms_norm, add_rms_norm=add_rms_norm, silu_mul=silu_mul, rope_split=rope_split, attention_bias=attention_bias
        )
        if compile:
            fns = {name: torch.compile(cast(Callable[..., Any], fn), dynamic=True) for name, fn in fns.items()}
        self._fn = fns

    # ------------------------------------------------------------ what the engine and drafters see

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def input_device(self) -> torch.device:
        """Where the engine should build token ids and positions: the host, so one copy carries them all."""
        return torch.device("cpu")

    def __getattr__(self, name: str) -> Any:  # layers, embed_tokens, lm_head, rope tables …
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def eager_model(self) -> LlamaModel:
        """The model itself, for one-off forwards not worth a graph (a drafter's calibration)."""
        return self.model

    def new_cache(self, batch: int, length: int, layers: int | None = None) -> KVCache:
        """A cache for a drafter. One over a subset of the layers (layer-skip drafts) lives in storage of the
        runner's, so forwards into it with `layers=` replay graphs too; any other is a plain cache, and
        forwards into it run the model without graphs. Each call for the same layer count hands the same
        storage out again."""
        if batch != 1 or layers is None:
            return self.model.new_cache(batch, length, layers)
        if layers not in self._draft_storage:
            self._draft_storage[layers] = self._new_storage(layers)
        k, v = self._draft_storage[layers]
        return StaticKVCache(k, v, min(length, self.cfg.max_position))

    def new_target_cache(self, batch: int, length: int) -> KVCache:
        """The target's cache, over the runner's own storage, which the graphs point at (the engine's).
        Each call hands the same storage out again: the previous generation's cache is then stale."""
        if batch != 1:
            return self.model.new_cache(batch, length)
        if self._storage is None:
            self._storage = self._new_storage(self.cfg.num_layers)
        k, v = self._storage
        return StaticKVCache(k, v, min(length, self.cfg.max_position))

    def _new_storage(self, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        shape = (num_layers, 1, cfg.num_kv_heads, self._cap + 1, cfg.head_dim)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))

    def _storage_of(self, cache: KVCache, layers: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if layers is None:
            return self._storage if self._storage is not None and cache.k is self._storage[0] else None
        st = self._draft_storage.get(len(layers))
        return st if st is not None and cache.k is st[0] else None

    def greedy_tokens(self, rows: int) -> list[int] | None:
        """The argmax of the first `rows` logits rows of the last forward, computed inside its graph (one small
        read instead of a separate argmax launch); None when the last forward had no logits."""
        return None if self._argmax is None else self._argmax[:rows].tolist()

    def __call__(
        self,
        tokens: torch.Tensor,  # (1, T)
        positions: torch.Tensor,  # (1, T)
        cache: KVCache,
        mask: torch.Tensor | None = None,  # (1, T, T) bool among the new rows; None = causal
        num_logits: int | None = None,
        layers: Sequence[int] | None = None,
        hidden_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Same contract as `LlamaModel.forward`. The returned tensors are views of the graph's outputs:
        valid until the next call."""
        B, T = tokens.shape
        storage = self._storage_of(cache, layers) if B == 1 else None
        self._argmax = None
        if storage is None or (mask is not None and T > WIDTHS[-1]):
            return self.model(tokens.to(self.device), positions.to(self.device), cache, None if mask is None else mask.to(self.device),
                              num_logits, layers, hidden_only)
        lkey = None if layers is None else tuple(int(li) for li in layers)
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} rows; {start} used, {T} more asked")
        with torch.no_grad():
            if T <= WIDTHS[-1]:
                logits, hidden = self._forward(tokens[0], positions[0], start, mask, not hidden_only, lkey)
                cache.length = start + T
            else:  # prefill: chunks of at most PREFILL_WIDTHS[-1] rows, each causal over the cache before it
                hs = []
                step = PREFILL_WIDTHS[-1]
                for a in range(0, T, step):
                    _, h = self._forward(tokens[0, a : a + step], positions[0, a : a + step], cache.length, None, False, lkey)
                    cache.length += h.shape[0]
                    hs.append(h if T <= step else h.clone())
                hidden = hs[0] if len(hs) == 1 else torch.cat(hs)
                logits = None
                if not hidden_only:
                    rows = hidden if num_logits is None else hidden[-num_logits:]
                    logits = self.model.lm_head(rows).float()
                    num_logits = None
        hidden = hidden[None]
        if hidden_only:
            return None, hidden
        assert logits is not None
        logits = logits[None]
        if num_logits is not None:
            logits = logits[:, -num_logits:]
        return logits, hidden

    # ------------------------------------------------------------ many sequences in one forward (the server)

    @property
    def batches_sequences(self) -> bool:
        """Whether `forward_batch` runs here: the fused kernels compute every row alone (tensor cores in 16-row
        tiles, attention a program per row), so rows of several sequences can share a forward and each keeps
        the bits of its sequence's own batch-1 forward."""
        return self.kernels == "triton" and self._fused(WIDTHS[-1])

    def new_pool(self, size: int) -> list[PoolKVCache]:
        """`size` caches of the model's whole context in one storage, for sequences whose verify forwards run
        together (`forward_batch`). Calling it again hands out the same storage (a new size: a new storage)."""
        if not self.batches_sequences:
            raise ValueError("batched forwards need the fused Triton kernels (a CUDA GPU, bf16 or fp16)")
        if size < 1:
            raise ValueError(f"a pool holds at least 1 cache, got {size}")
        cfg, per = self.cfg, self._cap + 1
        pool = self._seq_pool
        if pool is None or pool[0].shape[3] != size * per:
            pool = self._seq_pool = None  # the old storage goes before the new one comes
            shape = (cfg.num_layers, 1, cfg.num_kv_heads, size * per, cfg.head_dim)
            pool = self._seq_pool = (torch.zeros(shape, dtype=self.dtype, device=self.device),
                                     torch.zeros(shape, dtype=self.dtype, device=self.device))
            n = (5 + WIDTHS[-1]) * BATCH_WIDTHS[-1]
            self._bints = torch.zeros(n, dtype=torch.int64, device=self.device)  # ids|pos|slots|start|base|ancestor slots
            self._bhost = torch.zeros(n, dtype=torch.int64, pin_memory=self.device.type == "cuda")
            self._bhost_np = self._bhost.numpy()
            self._bcopied = torch.cuda.Event() if self.device.type == "cuda" else None
            self.batch_graphs.clear()
        k, v = pool
        return [PoolKVCache(k[:, :, :, i * per : (i + 1) * per], v[:, :, :, i * per : (i + 1) * per], cfg.max_position, i, i * per)
                for i in range(size)]

    def run_in_storage(self, cache: PoolKVCache, call: Callable[[KVCache], Any]) -> Any:
        """A batch-1 forward of a pooled sequence (its prefill, a forward wider than a batch takes): run in the
        runner's own cache, by the graphs and kernels of every batch-1 forward, so its K/V rows get the bits
        they get there. The sequence's rows are copied in first and the new ones back after."""
        rc = self.new_target_cache(1, cache.max_len)
        n0 = cache.length
        if n0:
            rc.k[:, :, :, :n0].copy_(cache.k[:, :, :, :n0])
            rc.v[:, :, :, :n0].copy_(cache.v[:, :, :, :n0])
        rc.length = n0
        out = call(rc)
        n1 = rc.length
        if n1 > n0:
            cache.k[:, :, :, n0:n1].copy_(rc.k[:, :, :, n0:n1])
            cache.v[:, :, :, n0:n1].copy_(rc.v[:, :, :, n0:n1])
        cache.length = n1
        return out

    def forward_batch(self, rows: Sequence[Any]) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """One forward for the verify rows of several pooled sequences. Each entry has `tokens` and `positions`
        (1, T) on the host, `cache` (a PoolKVCache of this runner's pool), `mask` (1, T, T) or None (a chain) and
        `paths` (`row_paths` of them, or None), T <= 64 and BATCH_WIDTHS[-1] rows in all. Writes each sequence's
        K/V rows at its slots and returns per entry (fp32 logits (T, V), hidden (T, D), the rows' greedy tokens):
        the tensors are views of the graph's outputs, valid until the next batched forward. Every row is bit-identical to the same row
        of its sequence's batch-1 forward: no kernel lets one row's arithmetic depend on the others."""
        if self._seq_pool is None:
            raise ValueError("forward_batch: no pool (new_pool) to run in")
        widths = [int(r.tokens.shape[1]) for r in rows]
        N, W = sum(widths), WIDTHS[-1]
        if not rows or N > BATCH_WIDTHS[-1] or max(widths) > W:
            raise ValueError(f"forward_batch takes 1 to {BATCH_WIDTHS[-1]} rows, at most {W} a sequence; got {widths}")
        Nb = next(w for w in BATCH_WIDTHS if w >= N)
        if self._bcopied is not None:
            self._bcopied.synchronize()  # the previous batch's inputs have left the host buffer
        h = self._bhost_np
        ids, pos, slots, start, base = (h[i * Nb : (i + 1) * Nb] for i in range(5))
        anc = h[5 * Nb : (5 + W) * Nb].reshape(Nb, W)
        anc[:] = -1
        off = 0
        for r, T in zip(rows, widths, strict=True):
            c = r.cache
            if not isinstance(c, PoolKVCache) or c.k.untyped_storage().data_ptr() != self._seq_pool[0].untyped_storage().data_ptr():
                raise ValueError("forward_batch: every cache must come from this runner's pool")
            s0 = c.length
            if s0 + T > c.max_len:
                raise ValueError(f"the KV cache holds {c.max_len} rows; {s0} used, {T} more asked")
            p = r.positions[0].to("cpu", torch.int64).numpy()
            ids[off : off + T] = r.tokens[0].to("cpu", torch.int64).numpy()
            pos[off : off + T] = p
            slots[off : off + T] = c.base + s0 + np.arange(T)
            start[off : off + T] = s0
            base[off : off + T] = c.base
            tt, dd, jj = r.paths if r.paths is not None else row_paths(r.mask, p - s0)
            anc[off + tt, dd] = c.base + s0 + jj
            off += T
        ids[N:], pos[N:], slots[N:], start[N:], base[N:] = 0, 0, self._cap, 0, 0  # padding: the first cache's scratch row
        anc[N:, 0] = self._cap
        n = (5 + W) * Nb
        self._bints[:n].copy_(self._bhost[:n], non_blocking=True)
        if self._bcopied is not None:
            self._bcopied.record(torch.cuda.current_stream(self.device))
        g = self.batch_graphs.get(Nb)
        if g is None:
            g = self.batch_graphs[Nb] = self._capture_run(lambda: self._batch_static(Nb), f"batch of {Nb} rows")
        if g.graph is not None:
            g.graph.replay()
            logits, hidden, argmax = g.logits, g.hidden, g.argmax
        else:
            logits, hidden, argmax = g.run()
        assert logits is not None and argmax is not None
        greedy = argmax[:N].tolist()  # one read for every sequence's greedy tokens
        out, off = [], 0
        for r, T in zip(rows, widths, strict=True):
            r.cache.length += T
            out.append((logits[off : off + T], hidden[off : off + T], greedy[off : off + T]))
            off += T
        return out

    def _batch_static(self, Nb: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """forward_batch's static forward over its inputs, for a bucket of Nb rows: what its graph captures."""
        assert self._seq_pool is not None
        b, W = self._bints, WIDTHS[-1]
        ids, pos, slots, start, base = (b[i * Nb : (i + 1) * Nb] for i in range(5))
        anc = b[5 * Nb : (5 + W) * Nb].view(Nb, W)
        plan = [(li, li) for li in range(self.cfg.num_layers)]
        logits, hidden = self._fused_forward(ids, pos, slots, anc, (start, base), plan, self._seq_pool, True)
        assert logits is not None
        return logits, hidden, logits.argmax(-1)

    # ------------------------------------------------------------ static forwards

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        want_logits: bool,
        layers: tuple[int, ...] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Fill the static inputs, run (capturing first if new) the graph of this bucket; -> views (T, …)."""
        T = tokens.shape[0]
        Tb = width_bucket(T)
        # the fused attention reads `start` on the device and covers exactly the cache in use: no span buckets
        Sb = 0 if self._fused(Tb) else span_bucket(start + T, self._cap)
        causal = mask is None
        if self._copied is not None:
            self._copied.synchronize()  # the previous forward's inputs have left the host buffer
        h = self._host_np
        h[:T] = tokens.to("cpu", torch.int64).numpy()
        h[T:Tb] = 0  # padded rows: token 0 at position 0, written to the scratch slot
        h[Tb : Tb + T] = positions.to("cpu", torch.int64).numpy()
        h[Tb + T : 2 * Tb] = 0
        h[2 * Tb : 2 * Tb + T] = np.arange(start, start + T)
        h[2 * Tb + T : 3 * Tb] = self._cap
        n = 3 * Tb
        if not causal:
            assert mask is not None
            m = h[n : n + Tb * Tb].reshape(Tb, Tb)
            m[:] = np.eye(Tb, dtype=np.int64)
            m[:T, :T] = mask.reshape(T, T).to("cpu", torch.int64).numpy()
            n += Tb * Tb
            # each row's keys in position order (the fused attention): anc[t, d] = slot of the row that row t
            # sees at position start + d
            anc = h[n : n + Tb * Tb].reshape(Tb, Tb)
            anc[:] = -1
            tt, dd, jj = tree_paths(m[:T, :T], h[Tb : Tb + T] - start)
            anc[tt, dd] = start + jj
            anc[T:, 0] = self._cap  # padded rows (position 0): their own scratch row when start is 0, else slot 0
            n += Tb * Tb
        self._ints[:n].copy_(self._host[:n], non_blocking=True)
        if self._copied is not None:
            self._copied.record(torch.cuda.current_stream(self.device))
        key = self.last_key = (Tb, Sb, causal, want_logits, layers)
        g = self.graphs.get(key)
        if g is None:
            try:
                g = self._capture(key)
            except Exception as e:  # noqa: BLE001 - a kernel that cannot build here must not stop generation
                if self.kernels != "triton":
                    raise
                msg = f"fastdecode: fused Triton kernels failed ({type(e).__name__}: {e}); using torch kernels"
                print(msg, file=sys.stderr, flush=True)
                self.kernels = "torch"
                self.graphs.clear()
                return self._forward(tokens, positions, start, mask, want_logits, layers)
        if g.graph is not None:
            g.graph.replay()
            logits, hidden, self._argmax = g.logits, g.hidden, g.argmax
        else:
            logits, hidden, self._argmax = g.run()
        return (None if logits is None else logits[:T]), hidden[:T]

    def _attn_splits(self) -> tuple[int, int]:
        """(splits, positions per split) of the fused attention: a power of two, at most MAX_ATTN_SPLITS, covering
        the context — fixed per runner, never per width or per forward, so a row's splits never change."""
        ns = min(MAX_ATTN_SPLITS, 1 << (-(-self._cap // self.attn_share) - 1).bit_length())
        bs = self.attn_block_s
        per_split = -(-self._cap // ns)
        return ns, max(self.attn_share, -(-per_split // bs) * bs)

    def _fused(self, Tb: int) -> bool:
        return self.kernels == "triton" and Tb <= min(WIDTHS[-1], self.triton_max_width)

    @staticmethod
    def _triton_fits(model: LlamaModel) -> bool:
        from fastdecode import triton_kernels

        cfg = model.cfg
        hd = cfg.head_dim
        return (
            triton_kernels.available()
            and model.device.type == "cuda"
            and model.dtype in (torch.bfloat16, torch.float16)
            and not cfg.qk_norm
            and not cfg.attention_bias
            and hd >= 32
            and hd & (hd - 1) == 0
        )

    def _layer_plan(self, layers: tuple[int, ...] | None) -> tuple[list[tuple[int, int]], tuple[torch.Tensor, torch.Tensor]]:
        """[(cache layer, model layer)] to run, and the K/V storage they write: all layers into the target's
        cache, or a subset into the layer-skip cache of that many layers."""
        if layers is None:
            return [(li, li) for li in range(self.cfg.num_layers)], self._storage  # type: ignore[return-value]
        return list(enumerate(layers)), self._draft_storage[len(layers)]

    def _linear(self, kind: str) -> dict[str, Any]:
        """The launch of projection `kind`, the same at every width. A CUDA-core launch whose K block does not
        cover the projection's K (a wider model than the tuning's) gives way to tensor cores — at every width."""
        cfg = self.tuning["decode"][kind]
        if not cfg.get("dot", True) and cfg["block_k"] < self._k_of[kind]:
            return TENSOR_CORE_FALLBACK[kind]
        return cfg

    def _triton_forward(
        self, Tb: int, causal: bool, want_logits: bool, layers: tuple[int, ...] | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The decode forward in fused Triton kernels: five launches per layer (see triton_kernels.py)."""
        ints = self._ints
        anc = None if causal else ints[3 * Tb + Tb * Tb : 3 * Tb + 2 * Tb * Tb]
        plan, storage = self._layer_plan(layers)
        return self._fused_forward(ints[:Tb], ints[Tb : 2 * Tb], ints[2 * Tb : 3 * Tb], anc, None, plan, storage, want_logits)

    def _fused_forward(
        self,
        ids: torch.Tensor,  # (Tb,) int64 token ids
        pos: torch.Tensor,  # (Tb,) positions
        slots: torch.Tensor,  # (Tb,) the slots the rows' K/V go to
        anc: torch.Tensor | None,  # ancestor slots (triton_kernels.attention), None: one causal chain
        sequences: tuple[torch.Tensor, torch.Tensor] | None,  # rows of several sequences: each row's (start, base)
        plan: list[tuple[int, int]],
        storage: tuple[torch.Tensor, torch.Tensor],
        want_logits: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        from fastdecode import triton_kernels as tk

        cfg, m = self.cfg, self.model
        h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        Tb = ids.shape[0]
        x = m.embed_tokens(ids)  # (Tb, D), the residual stream, updated in place
        q = torch.empty(Tb, h, hd, dtype=x.dtype, device=x.device)
        o = torch.empty(Tb, h * hd, dtype=x.dtype, device=x.device)
        mid = torch.empty(Tb, cfg.intermediate_size, dtype=x.dtype, device=x.device)
        ns, share = self._attn_splits()
        f32 = dict(dtype=torch.float32, device=x.device)
        partials = (torch.empty(ns, Tb * h, hd, **f32), torch.empty(ns, Tb * h, **f32), torch.empty(ns, Tb * h, **f32))
        lin = {kind: self._linear(kind) for kind in LINEARS}
        k_all, v_all = storage
        for j, li in plan:
            block = self._blocks[li]
            kc, vc = k_all[j, 0], v_all[j, 0]  # (kvh, slots, hd)
            rope = (m.rope_cos, m.rope_sin, pos, slots, kc, vc, h, kvh, hd)
            tk.fused_linear(x, self._w_qkv_n[li], q, tk.ROPE, norm_eps=cfg.rms_eps, rope=rope, **lin["qkv"])
            tk.attention(q, kc, vc, o, pos, slots, anc, partials, share, block_s=self.attn_block_s, sequences=sequences)
            tk.fused_linear(o, block.self_attn.o_proj.weight, x, tk.RESIDUAL, res=x, **lin["o"])
            tk.fused_linear(x, self._w_gu_n[li], mid, tk.SILU, norm_eps=cfg.rms_eps, **lin["gu"])
            tk.fused_linear(mid, block.mlp.down_proj.weight, x, tk.RESIDUAL, res=x, **lin["down"])
        hidden = self._fn["rms_norm"](x, m.norm.weight, cfg.rms_eps)
        logits = None
        if want_logits:  # fp32 logits straight from the fp32 accumulator: bf16 rounding would tie near-equal logits
            logits = torch.empty(Tb, cfg.vocab_size, dtype=torch.float32, device=x.device)
            tk.fused_linear(x, self._w_lm_n, logits, tk.STORE, norm_eps=cfg.rms_eps, **lin["lm"])
        return logits, hidden

    def _static_forward(
        self, Tb: int, Sb: int, causal: bool, want_logits: bool, layers: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The forward of the model over the static inputs of bucket (Tb, Sb): what a graph captures.
        -> (fp32 logits or None, hidden, each row's argmax or None)."""
        if self._fused(Tb):
            logits, hidden = self._triton_forward(Tb, causal, want_logits, layers)
        else:
            logits, hidden = self._torch_forward(Tb, Sb, causal, want_logits, layers)
        return logits, hidden, None if logits is None else logits.argmax(-1)

    def _torch_forward(
        self, Tb: int, Sb: int, causal: bool, want_logits: bool, layers: tuple[int, ...] | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        cfg, fn, m = self.cfg, self._fn, self.model
        h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rep = h // kvh
        ints = self._ints
        ids, pos, slots = ints[:Tb], ints[Tb : 2 * Tb], ints[2 * Tb : 3 * Tb]
        if causal:
            tmask = self._tril.get(Tb)
            if tmask is None:
                tmask = self._tril[Tb] = torch.ones(Tb, Tb, dtype=torch.bool, device=self.device).tril_()
        else:
            tmask = ints[3 * Tb : 3 * Tb + Tb * Tb].view(Tb, Tb).bool()
        bias = fn["attention_bias"](slots[0], tmask, self._cols[:Sb], rep, self.dtype)  # (1, 1, Tb·rep, Sb)
        x = m.embed_tokens(ids)  # (Tb, D)
        cos = m.rope_cos[pos].to(x.dtype)  # (Tb, hd)
        sin = m.rope_sin[pos].to(x.dtype)
        plan, (k_all, v_all) = self._layer_plan(layers)
        res: torch.Tensor | None = None
        for j, li in plan:
            block = self._blocks[li]
            attn = block.self_attn
            if res is None:
                xn = fn["rms_norm"](x, block.input_layernorm.weight, cfg.rms_eps)
            else:
                x, xn = fn["add_rms_norm"](x, res, block.input_layernorm.weight, cfg.rms_eps)
            qkv = F.linear(xn, self._w_qkv[li], self._b_qkv[li])  # (Tb, (h+2kvh)·hd)
            qn = attn.q_norm.weight if cfg.qk_norm else None
            kn = attn.k_norm.weight if cfg.qk_norm else None
            q, k, v = fn["rope_split"](qkv, cos, sin, h, kvh, hd, qn, kn, cfg.rms_eps)
            kc, vc = k_all[j], v_all[j]  # (1, kvh, cap+1, hd)
            kc.index_copy_(2, slots, k)
            vc.index_copy_(2, slots, v)
            o = F.scaled_dot_product_attention(q, kc[:, :, :Sb], vc[:, :, :Sb], attn_mask=bias)  # (1, kvh, Tb·rep, hd)
            a = F.linear(out_merge(o, Tb), attn.o_proj.weight)  # (Tb, D)
            x, xn = fn["add_rms_norm"](x, a, block.post_attention_layernorm.weight, cfg.rms_eps)
            res = F.linear(fn["silu_mul"](F.linear(xn, self._w_gu[li])), block.mlp.down_proj.weight)
        assert res is not None
        _, hidden = fn["add_rms_norm"](x, res, m.norm.weight, cfg.rms_eps)
        logits = F.linear(hidden, m.lm_head.weight).float() if want_logits else None
        return logits, hidden

    def _capture(self, key: GraphKey) -> _Graph:
        Tb, Sb, causal, want_logits, layers = key

        def run() -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
            return self._static_forward(Tb, Sb, causal, want_logits, layers)

        what = f"width {Tb}" + (f" span {Sb}" if Sb else "") + ("" if causal else " tree")
        if layers is not None:
            what += f" ({len(layers)} of {self.cfg.num_layers} layers)"
        g = self.graphs[key] = self._capture_run(run, what)
        return g

    def _capture_run(self, run: Callable[[], tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]], what: str) -> _Graph:
        t0 = time.perf_counter()
        if not self.use_graphs:
            return _Graph(None, run, None, torch.empty(0), None)
        # warm-up on a side stream (compiles the fused pieces); it computes exactly what the replay will
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                run()
        torch.cuda.current_stream(self.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, hidden, argmax = run()
        torch.cuda.synchronize(self.device)
        g = _Graph(graph, run, logits, hidden, argmax)
        dt = time.perf_counter() - t0
        self.capture_seconds += dt
        if self.verbose:
            print(f"fastdecode: captured CUDA graph {what} in {dt:.2f} s", file=sys.stderr, flush=True)
        return g

    def warmup(
        self, widths: Sequence[int] = WIDTHS, spans: Sequence[int] = (MIN_SPAN, 2 * MIN_SPAN, 4 * MIN_SPAN), trees: bool = False
    ) -> float:
        """Capture the graphs of these buckets now (seconds spent returned), so generation never waits on them."""
        t0 = time.perf_counter()
        cache = self.new_target_cache(1, self.cfg.max_position)
        with torch.no_grad():
            for Sb in spans:
                for w in widths:
                    start = max(0, min(Sb, self._cap) - w)
                    for causal in (True, False) if trees else (True,):
                        mask = None if causal else torch.ones(1, w, w, dtype=torch.bool).tril()
                        cache.length = start
                        self._forward(torch.zeros(w, dtype=torch.int64), torch.arange(start, start + w), start, mask, want_logits=True)
        cache.length = 0
        return time.perf_counter() - t0
