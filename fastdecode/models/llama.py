"""Native Llama-family transformer (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5, Qwen3).

The forward takes explicit positions, a preallocated KV cache and an explicit attention mask over the new
rows, so chains and trees verify in one call. It must never know about drafting: no drafter, verifier or
engine import lives here.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdecode.cache import KVCache


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_position: int = 4096  # the context: prompt + new tokens + draft rows never exceed it
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q, k, v
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    rope_scaling: tuple[tuple[str, float], ...] | None = None  # Llama 3.x frequency scaling, as (key, value) pairs
    arch: str = "llama"


def _rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv_freq.float()
    s = dict(cfg.rope_scaling)
    kind = s.get("rope_type", "default")
    if kind == "linear":
        return (inv_freq / s["factor"]).float()
    if kind == "llama3":
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, mid, scaled).float()
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


ROW_INVARIANT_DTYPES = (torch.bfloat16, torch.float32)  # fp16 on CPU: oneDNN rounds by width there too (measured)
ROW_INVARIANT_MAX = 256  # forwards of at most this many rows (every decode step) take the row-invariant path
LINEAR_CHUNK = 64  # rows per narrow product
# fp32 on the CPU: MKL's sgemm sums a row in an order that depends on how many rows share the product (row 0
# of `W @ x.T` falls in classes [1], [2, 3], [4..11 in part], [12..] by width; measured on an AMD EPYC), but
# a product of one fixed shape computes every row alike, wherever it sits and whatever the other rows hold.
# So fp32 decode-path linears run on tiles of exactly FP32_TILE rows, zero-padded, up to
# FP32_TILES_PER_PRODUCT tiles at once where the probe finds the wider shape rounds as the tile does;
# fp32 attention runs row by row (attend_each_row).
FP32_TILE = 4
FP32_TILES_PER_PRODUCT = 2
_prefill = threading.local()  # .on while this thread runs a prefill (hidden_only): shared by every method, no tiles


# FASTDECODE_ROW_INVARIANT=0 takes the width-dependent CPU kernels instead (for measuring what invariance costs:
# scripts/row_invariance_cost.py); drafters are then exact only up to numeric ties in bf16
ROW_INVARIANT_ON = os.environ.get("FASTDECODE_ROW_INVARIANT", "1") != "0"


def row_invariant(x: torch.Tensor, rows: int) -> bool:
    """Whether a CPU forward of `rows` rows takes the row-invariant path (bf16 or fp32, decode-sized)."""
    return ROW_INVARIANT_ON and x.device.type == "cpu" and x.dtype in ROW_INVARIANT_DTYPES and rows <= ROW_INVARIANT_MAX


def narrow_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` on CPU, row-invariant in bf16: `(W @ x.T).T` in chunks of LINEAR_CHUNK rows (see Linear)."""
    rows = x.numel() // x.shape[-1]
    # row-major, whatever x's layout (an elementwise op on a narrow product's output, itself a transposed view,
    # keeps that column-major layout): oneDNN may take another kernel for a column-major right operand, and did
    # on an AMD EPYC without native bf16 (the MLP's down product of a 23-row verify rounded row 22 unlike the
    # 1-row step). A 1-row x is always row-major, so the 1-row step never copies.
    flat = x.reshape(rows, -1).contiguous()
    if x.dtype == torch.float32 and ROW_INVARIANT_ON and not getattr(_prefill, "on", False):
        # row-major out, as the 1-row step's: a vectorised elementwise op (silu, RoPE) on a column-major view
        # may run a row's elements through its scalar tail loop, whose exp rounds unlike the vector one
        out = in_tiles(flat, lambda t: (weight @ t.T).T, _fp32_span(weight)).contiguous()
        return out.reshape(*x.shape[:-1], -1)
    parts = [(weight @ flat[i : i + LINEAR_CHUNK].T).T for i in range(0, rows, LINEAR_CHUNK)]  # (rows', out)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(*x.shape[:-1], -1)


def in_tiles(a: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], span: int = 1) -> torch.Tensor:
    """`f` over the rows of `a` (..., R, K) in products of FP32_TILE rows (the last one zero-padded), `span`
    tiles at a time where that many remain: (..., R, N). f must treat rows independently."""
    R, tile = a.shape[-2], FP32_TILE
    parts = []
    for i in range(0, R, tile * span):
        piece = a[..., i : i + tile * span, :]
        n = piece.shape[-2]
        width = -(-n // tile) * tile
        if width != n:
            piece = F.pad(piece, (0, 0, 0, width - n))
        else:  # every tile a fresh row-major buffer, padded or not: BLAS kernels may depend on layout and alignment
            piece = piece.clone(memory_format=torch.contiguous_format)
        parts.append(f(piece)[..., :n, :])
    return parts[0] if len(parts) == 1 else torch.cat(parts, -2)


_SPANS: dict[tuple[int, ...], int] = {}


def _fp32_span(weight: torch.Tensor) -> int:
    """How many fp32 tiles one product of `weight` may take: FP32_TILES_PER_PRODUCT where a product of that many
    tiles gives every row the bits of a 1-tile product (probed once per shape on random rows), else 1."""
    key = (*weight.shape, *weight.stride())
    if key not in _SPANS:
        span = FP32_TILES_PER_PRODUCT
        g = torch.Generator().manual_seed(0)
        x = torch.randn(FP32_TILE * span, weight.shape[1], generator=g)
        wide = (weight @ x.T).T
        ok = all(torch.equal(wide[i : i + FP32_TILE], (weight @ x[i : i + FP32_TILE].T).T) for i in range(0, len(x), FP32_TILE))
        _SPANS[key] = span if ok else 1
    return _SPANS[key]


class Linear(nn.Linear):
    """nn.Linear whose CPU result for a row does not depend on how many rows share the call.

    On CPU `x @ W.T` picks a kernel by the number of rows: in bf16 a 33-row product rounds a row
    differently from a 1-row one, and in fp32 every width differs from a 1-row GEMV. Computing
    `(W @ x.T).T` instead keeps W as the left operand, whose shape never changes: measured on this
    project's AVX-512-BF16 CPU, bf16 rows then come out bit-identical for every width 1..64 (oneDNN),
    and cost what a 1-row product does up to ~16 rows. So in bf16 every forward of at most 256 rows runs
    it for every width, one included, in chunks of 64 rows (fp16 on a CPU rounds by width here too). In
    fp32 (what CPUs without fast bf16 run) MKL's sgemm rounds by width in both orientations, but one
    product shape computes each of its rows alike: the product runs on zero-padded tiles of FP32_TILE rows
    (`in_tiles`), two tiles at once where `_fp32_span` finds that shape rounds as one tile does. On an AMD
    EPYC (2 cores, AVX2) a 4-row `W @ x.T` costs 0.8x the 1-row GEMV it replaces, an 8-row one 1.3x.
    Prefill (longer inputs) keeps the ordinary kernel: its rows are shared by every method.
    """

    NARROW = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if not (row_invariant(x, rows) or 1 < rows <= self.NARROW):
            return F.linear(x, self.weight, self.bias)
        y = narrow_product(x, self.weight)
        return y if self.bias is None else y + self.bias


def fuse(linears: Sequence[Linear]) -> torch.Tensor | None:
    """Re-point the weights of `linears` (same input, no bias) to views of one (sum of outs, in) tensor and
    return it: a CPU decode step then runs one product for q, k and v (and one for gate and up), which
    saves more time than the row-invariant attention costs. No copy is kept: the modules' weights are the
    views. None (nothing changed) where a linear has a bias."""
    if any(lin.bias is not None for lin in linears):
        return None
    fused = torch.cat([lin.weight.detach() for lin in linears])  # (sum out, in)
    row = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(fused[row : row + n], requires_grad=False)
        row += n
    return fused


def _fused_or_none(fused: torch.Tensor | None, linears: Sequence[Linear], x: torch.Tensor) -> torch.Tensor | None:
    """`fused` if it still holds the linears' weights (not moved or replaced since) and x takes the narrow path."""
    if fused is None or not row_invariant(x, x.numel() // x.shape[-1]) or fused.dtype != x.dtype:
        return None
    row = 0
    for lin in linears:  # every weight still a view of `fused`, where fuse() put it
        if lin.weight.data_ptr() != fused[row].data_ptr():
            return None
        row += lin.out_features
    return fused


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position of the context, (P, hd) fp32, as the reference computes them."""
    freqs = torch.outer(torch.arange(cfg.max_position, dtype=torch.float32), _rope_inv_freq(cfg))  # (P, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
    return emb.cos(), emb.sin()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 and cast back, as the reference implementation does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


ATTN_BLOCK = 64  # positions per attention block of the row-invariant path


@dataclass(frozen=True)
class PositionPlan:
    """Which cache slot holds each key a new row may see, in position order (the row-invariant path).

    A row at position p sees one key per position 0..p: the committed cache (slot = position) and then
    its tree ancestors, wherever their rows sit in the forward. Positions are cut into blocks of
    ATTN_BLOCK aligned at 0; `prefix` positions (whole blocks) lie in the committed cache and every row
    sees them; the tail (`slots.shape[-1]` positions from `prefix`, whole blocks too) is read per row.
    A row's attention is then a function of its keys in position order only: the same number whether
    the row is a 1-row step or node j of a 64-row tree. Built once per forward, read by every layer.
    """

    prefix: int
    slots: torch.Tensor  # (B, T, L) long: slot of position prefix + j for row t (0 where unseen)
    bias: torch.Tensor  # (B, 1, rep*T, prefix+L) fp32: 0 where the query row sees the position, -inf elsewhere
    chain: bool  # every seen position sits in the slot of the same number: the cache is read as it lies
    new: torch.Tensor  # (B, T, D+1) long: slot of the new row row t sees at each depth below the pending row (-1: none)

    @functools.cached_property
    def paths(self) -> list[list[list[int]]]:
        """[b][t]: the slots of the new rows row t sees, in position order (attend_each_row)."""
        return [[[s for s in row if s >= 0] for row in seq] for seq in self.new.tolist()]

    @functools.cached_property
    def path_index(self) -> list[list[torch.Tensor]]:
        """`paths` as index tensors, made once per forward for every layer to read."""
        return [[torch.tensor(p, device=self.new.device) for p in seq] for seq in self.paths]


def position_plan(positions: torch.Tensor, mask: torch.Tensor | None, start: int, rep: int) -> PositionPlan | None:
    """The plan for new rows at `positions` (B, T) with `mask` (B, T, T) among them (None = causal), for
    `rep` query heads per kv head; None when some row does not see exactly one new row per position from
    `start` to its own (the forward is then not a set of tree paths and takes the ordinary attention)."""
    B, T = positions.shape
    dev = positions.device
    off = positions - start  # (B, T): depth below the pending row
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril_()[None].expand(B, T, T)
    if bool((off < 0).any()):
        return None
    depth = int(off.max())
    steps = torch.arange(depth + 1, device=dev)
    cand = torch.where(mask, start + torch.arange(T, device=dev), -1)  # (B, T, T): slot of each visible row
    new = torch.full((B, T, depth + 1), -1, dtype=torch.long, device=dev)
    new.scatter_reduce_(2, off[:, None, :].expand(B, T, T), cand, reduce="amax")  # (B, T, D+1) by depth
    seen_new = new >= 0
    if not (bool((mask.sum(-1) == off + 1).all()) and bool((seen_new.sum(-1) == off + 1).all())):
        return None
    G = ATTN_BLOCK
    prefix = start // G * G
    L = -(-(start + depth + 1 - prefix) // G) * G
    c = start - prefix  # committed positions inside the tail
    slots = torch.arange(prefix, prefix + L, device=dev).repeat(B, T, 1)  # (B, T, L): slot = position ...
    seen = slots < start
    slots[:, :, c : c + depth + 1] = torch.where(seen_new, new, 0)  # ... except for the tree part
    seen[:, :, c : c + depth + 1] = seen_new
    slots = torch.where(seen, slots, 0)  # unseen positions (past a row's own, or past the cache) read slot 0, weight 0
    chain = bool((torch.where(seen_new, new, start + steps) == start + steps).all())
    bias = torch.zeros(B, 1, rep, T, prefix + L, device=dev)
    bias[..., prefix:].masked_fill_(~seen[:, None, None], float("-inf"))
    return PositionPlan(prefix, slots, bias.reshape(B, 1, rep * T, prefix + L), chain, new)


def attend_by_position(
    q: torch.Tensor,  # (B, kvh, rep*T, hd): query head g*rep + r of token t is row r*T + t of group g
    k_cache: torch.Tensor,  # (B, kvh, S_max, hd), the new rows written
    v_cache: torch.Tensor,
    end: int,  # slots 0 .. end-1 hold keys
    plan: PositionPlan,
) -> torch.Tensor:  # (B, kvh, rep, T, hd) fp32
    """Softmax attention whose every reduction runs over a row's keys in position order, in blocks of
    ATTN_BLOCK positions aligned at 0, through products of one shape per block whatever the width.

    Scores: one product `keys @ q.T` over cache slots (a score depends only on its key and its query),
    read in position order. Softmax over the position-ordered row in fp32 (unseen positions add exact
    zeros). Values: `P_block @ V_block` per block (G x head_dim on the right whatever the width), summed in
    block order. A chain (the 1-row step, prompt lookup) reads the cache's blocks as they lie (blocks past a
    row's position add zeros); a tree gathers each row's tail blocks, whose products then equal the chain's
    bit for bit.
    """
    B, kvh, R, hd = q.shape
    _, T, L = plan.slots.shape
    rep = R // T
    G, P0 = ATTN_BLOCK, plan.prefix
    scale = hd**-0.5
    E = P0 + L  # positions covered, whole blocks
    if plan.chain and E <= k_cache.shape[2]:
        # slot = position for every seen key: the blocks straight from the cache, shared by every row
        scores = k_cache[:, :, :E] @ q.transpose(-1, -2)  # (B, kvh, E, R)
        p = torch.softmax(torch.add(plan.bias, scores.transpose(-1, -2), alpha=scale), -1).to(q.dtype)  # (B, kvh, R, E)
        pb = p.reshape(B, kvh, R, E // G, G).transpose(2, 3)  # (B, kvh, nb, R, G)
        o = pb @ v_cache[:, :, :E].reshape(B, kvh, E // G, G, hd)  # (B, kvh, nb, R, hd)
        return o.sum(2, dtype=torch.float32).reshape(B, kvh, rep, T, hd)
    scores = (k_cache[:, :, :end] @ q.transpose(-1, -2)).transpose(-1, -2)  # (B, kvh, R, end)
    idx = plan.slots[:, None, None].expand(B, kvh, rep, T, L).reshape(B, kvh, R, L)
    s = torch.cat((scores[..., :P0], scores.gather(-1, idx.clamp(max=end - 1))), -1)  # (B, kvh, R, P0+L) by position
    p = torch.softmax(torch.add(plan.bias, s, alpha=scale), -1).to(q.dtype)
    nbp, nbt = P0 // G, L // G
    vt = torch.stack([v_cache[b].index_select(1, plan.slots[b].reshape(-1)) for b in range(B)])  # (B, kvh, T*L, hd) by position
    pt = p[..., P0:].reshape(B, kvh, rep, T, nbt, G).permute(0, 1, 3, 4, 2, 5)  # (B, kvh, T, nbt, rep, G)
    o = (pt @ vt.reshape(B, kvh, T, nbt, G, hd)).permute(0, 1, 3, 4, 2, 5)  # (B, kvh, nbt, rep, T, hd)
    if nbp:
        pp = p[..., :P0].reshape(B, kvh, R, nbp, G).transpose(2, 3)  # (B, kvh, nbp, R, G)
        op = pp @ v_cache[:, :, :P0].reshape(B, kvh, nbp, G, hd)  # (B, kvh, nbp, R, hd)
        o = torch.cat((op.reshape(B, kvh, nbp, rep, T, hd), o), 2)
    return o.sum(2, dtype=torch.float32)  # (B, kvh, rep, T, hd): block partials summed in block order


def attend_each_row(
    q: torch.Tensor,  # (B, kvh, rep*T, hd): query head g*rep + r of token t is row r*T + t of group g
    k_cache: torch.Tensor,  # (B, kvh, S_max, hd), the new rows written
    v_cache: torch.Tensor,
    start: int,  # slots 0 .. start-1 hold the committed cache; the new rows sit at start ..
    plan: PositionPlan,
) -> torch.Tensor:  # (B, kvh, rep, T, hd)
    """fp32 attention, row-invariant: each new row attends in a call of its own, the call the 1-row step makes
    at the row's position (its rep query heads over its keys in position order, as one SDPA call), so a
    verify row is the 1-row step's arithmetic whatever the width. A chain row reads the cache as it lies; a
    tree row's ancestors are copied behind the committed cache in a scratch cache of the same shape."""
    B, kvh, R, hd = q.shape
    T = plan.slots.shape[1]
    qs = q.reshape(B, kvh, R // T, T, hd)
    out = torch.empty(B, kvh, R // T, T, hd, dtype=q.dtype)
    for b in range(B):
        ks: torch.Tensor | None = None
        vs: torch.Tensor | None = None
        for t in range(T):
            qt = qs[b : b + 1, :, :, t].contiguous()  # (1, kvh, rep, hd), as a 1-row step's
            n = start + len(plan.paths[b][t])
            if plan.chain:  # path == start .. n-1: the cache as it lies
                k, v = k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n]
            else:
                if ks is None or vs is None:
                    ks, vs = torch.empty_like(k_cache[b : b + 1]), torch.empty_like(v_cache[b : b + 1])
                    ks[:, :, :start], vs[:, :, :start] = k_cache[b : b + 1, :, :start], v_cache[b : b + 1, :, :start]
                idx = plan.path_index[b][t]
                ks[:, :, start:n], vs[:, :, start:n] = k_cache[b : b + 1, :, idx], v_cache[b : b + 1, :, idx]
                k, v = ks[:, :, :n], vs[:, :, :n]
            out[b : b + 1, :, :, t] = F.scaled_dot_product_attention(qt, k, v)
    return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, hd, kvh = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
        self.q_proj = Linear(cfg.hidden_size, h * hd, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, kvh * hd, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, kvh * hd, bias=cfg.attention_bias)
        self.o_proj = Linear(h * hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_eps)
        self.qkv: torch.Tensor | None = None  # set by LlamaModel.fuse_projections (CPU)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # (B, 1, T, hd)
        sin: torch.Tensor,  # (B, 1, T, hd)
        k_cache: torch.Tensor,  # (B, kvh, S_max, hd), this layer's slice of the cache
        v_cache: torch.Tensor,
        start: int,  # first free cache slot: the new rows are written at start .. start+T-1
        mask: torch.Tensor | None,  # (B, 1, T, start+T) bool, or None for "attend to everything"
        plan: PositionPlan | None = None,  # the row-invariant path (CPU, bf16 and fp32); then `mask` is unused
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        fused = _fused_or_none(self.qkv, (self.q_proj, self.k_proj, self.v_proj), x)
        if fused is not None and not cfg.qk_norm:
            # one product, and RoPE on q and k at once (elementwise: the same numbers as one by one)
            qkv = narrow_product(x, fused)  # (B, T, nq + 2·nkv)
            qk = qkv[..., : nq + nkv].reshape(B, T, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
            c, s_ = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, hd)
            qk = qk * c + _rotate_half(qk) * s_
            q = qk[:, :, : cfg.num_heads].transpose(1, 2)  # (B, h, T, hd)
            k = qk[:, :, cfg.num_heads :].transpose(1, 2)  # (B, kvh, T, hd)
            v = qkv[..., nq + nkv :].reshape(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
        else:
            q_, k_, v_ = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q_.view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # (B, h, T, hd)
            k = k_.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
            v = v_.view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
            if cfg.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        end = start + T
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]  # (B, kvh, S, hd)
        # grouped-query attention without copying the cache: the `rep` query heads that share a kv head
        # are stacked along the query axis (query head i uses kv head i // rep, as in the reference)
        rep = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(B, cfg.num_kv_heads, rep * T, cfg.head_dim)  # (B, kvh, rep*T, hd)
        if plan is not None and q.dtype == torch.float32:
            o = attend_each_row(q, k_cache, v_cache, start, plan)  # (B, kvh, rep, T, hd)
            return self.o_proj(o.permute(0, 3, 1, 2, 4).reshape(B, T, cfg.num_heads * cfg.head_dim))
        if plan is not None:
            o = attend_by_position(q, k_cache, v_cache, end, plan).to(x.dtype)  # (B, kvh, rep, T, hd)
            return self.o_proj(o.permute(0, 3, 1, 2, 4).reshape(B, T, cfg.num_heads * cfg.head_dim))
        if mask is not None and rep > 1:
            S = mask.shape[-1]
            mask = mask[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
        out = sdpa(q, keys, values, mask)  # (B, kvh, rep*T, hd)
        out = out.reshape(B, cfg.num_heads, T, cfg.head_dim)  # (B, h, T, hd); CUDA kernels may return it strided
        return self.o_proj(out.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, on CUDA without cuDNN's backend. The eager forwards (prefills, batched
    data generation, a drafter's tree levels) meet a new attention shape almost every call, and cuDNN builds
    a plan for each: 9 ms a call, measured with cProfile in the EAGLE drafter on an H100. Flash, memory-
    efficient and math attention need no plan. (The decode steps in CUDA graphs use the Triton kernels.)"""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: torch.Tensor | None = None  # set by LlamaModel.fuse_projections (CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = _fused_or_none(self.gate_up, (self.gate_proj, self.up_proj), x)
        if fused is not None:
            gate, up = narrow_product(x, fused).chunk(2, -1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    self_attn: Attention
    mlp: MLP

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)


class LlamaModel(nn.Module):
    """`forward(tokens, positions, cache, mask) -> (logits, hidden)`; parameter names follow Hugging Face's."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    layers: nn.ModuleList
    draft_vocab: torch.Tensor | None = None  # a draft model's LM head rows as token ids (models/draft.py); None: all
    draft_vocab_ids: list[int] | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def fuse_projections(self) -> None:
        """Keep q/k/v and gate/up weights as views of one tensor per layer (see `fuse`); call after the
        model has its final device and dtype (moving it afterwards splits the views again, harmlessly:
        the separate products then run)."""
        for block in self.layers:
            b = typing.cast(Block, block)
            b.self_attn.qkv = fuse((b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj))
            b.mlp.gate_up = fuse((b.mlp.gate_proj, b.mlp.up_proj))

    def new_cache(self, batch: int, length: int, layers: int | None = None) -> KVCache:
        cfg = self.cfg
        return KVCache(
            num_layers=cfg.num_layers if layers is None else layers,
            batch=batch,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            max_len=min(length, cfg.max_position),
            dtype=self.dtype,
            device=self.device,
        )

    def attention_inputs(
        self, x: torch.Tensor, positions: torch.Tensor, start: int, mask: torch.Tensor | None, hidden_only: bool = False,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, PositionPlan | None]:
        """What every layer's attention reads for new rows `x` (B, T, D) at `positions` written from cache slot
        `start` (see `forward` for `mask` and `key_mask`): the full mask for SDPA (None: every row sees the whole
        cache) and the row-invariant path's position plan (None: not taken). Also used by the server's batched
        forwards (serve/batching.py), which must attend exactly as a forward of these rows alone does."""
        B, T = positions.shape
        full_mask: torch.Tensor | None = None  # None with T == 1: the row sees the whole cache
        # CPU bf16 and fp32: every layer reads the cache through one plan, row-invariant (see PositionPlan). Not for a
        # prefill (hidden_only): every method prefills the same prompt the same way, and SDPA is faster there
        rep = self.cfg.num_heads // self.cfg.num_kv_heads
        whole = mask is not None and mask.shape[-1] == start + T and start > 0  # a mask over the cache too (a drafter's tree)
        invariant = row_invariant(x, B * T) and not hidden_only and key_mask is None and not whole
        plan = position_plan(positions, mask, start, rep) if invariant else None
        if whole:
            assert mask is not None and key_mask is None
            full_mask = mask[:, None]
        elif plan is None and (T > 1 or key_mask is not None):
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril_()[None].expand(B, T, T)
            if key_mask is None:
                prefix = torch.ones(B, T, start, dtype=torch.bool, device=x.device)
            else:  # padding slots are never seen; a padding row sees itself only (no empty softmax, no NaN)
                prefix = key_mask[:, None, :start].expand(B, T, start)
                mask = (mask & key_mask[:, None, start:]) | torch.eye(T, dtype=torch.bool, device=x.device)
            full_mask = torch.cat((prefix, mask), dim=-1)[:, None]  # (B, 1, T, start+T)
        return full_mask, plan

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) token ids of the new rows
        positions: torch.Tensor,  # (B, T) absolute positions of the new rows
        cache: KVCache,  # rows are written at cache.length .. cache.length+T-1, then cache.length += T
        mask: torch.Tensor | None = None,  # (B, T, T) bool among the new rows (the cache visible) or (B, T, start+T); None = causal
        num_logits: int | None = None,  # compute logits for the last `num_logits` rows only (None = all)
        layers: Sequence[int] | None = None,  # run only these layers (cache layer i holds layers[i]); None = all
        hidden_only: bool = False,
        key_mask: torch.Tensor | None = None,  # (B, start+T) bool: cache slots each sequence may see (left-padded batches)
        inputs_embeds: torch.Tensor | None = None,  # (B, T, D): the rows' input vectors instead of the tokens' embeddings (EAGLE)
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        B, T = tokens.shape
        start = cache.length
        if key_mask is not None and key_mask.shape != (B, start + T):
            raise ValueError(f"key_mask must be (batch, cache rows + new rows) = {(B, start + T)}, got {tuple(key_mask.shape)}")
        if start + T > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} rows; {start} used, {T} more asked")
        x = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        cos = self.rope_cos[positions].to(x.dtype)[:, None]  # (B, 1, T, hd)
        sin = self.rope_sin[positions].to(x.dtype)[:, None]
        full_mask, plan = self.attention_inputs(x, positions, start, mask, hidden_only, key_mask)
        layer_ids = range(self.cfg.num_layers) if layers is None else layers
        # a prefill (hidden_only) is shared by every method: fp32 linears skip the row-invariant tiles there
        # (up to 2x slower than one product for a 250-token prompt on 2 cores)
        outer, _prefill.on = getattr(_prefill, "on", False), hidden_only
        try:
            for slot, li in enumerate(layer_ids):
                block = typing.cast(Block, self.layers[li])
                h = block.self_attn(block.input_layernorm(x), cos, sin, cache.k[slot], cache.v[slot], start, full_mask, plan)
                x = x + h
                x = x + block.mlp(block.post_attention_layernorm(x))
        finally:
            _prefill.on = outer
        cache.length = start + T
        hidden = self.norm(x)  # (B, T, D)
        if hidden_only:
            return None, hidden
        rows = hidden if num_logits is None else hidden[:, -num_logits:]
        logits = self.lm_head(rows).float()  # (B, T', V)
        return logits, hidden
