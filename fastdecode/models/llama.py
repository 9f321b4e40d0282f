"""Native Llama-family transformer (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5, Qwen3).

The forward takes explicit positions, a preallocated KV cache and an explicit attention mask over the new
rows, so chains and trees verify in one call. It must never know about drafting: no drafter, verifier or
engine import lives here.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
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


class Linear(nn.Linear):
    """nn.Linear with a CPU fast path for narrow inputs (verify forwards of 2-64 rows).

    On CPU, `x @ W.T` with a few rows falls into a GEMM shape that BLAS handles poorly: measured on this
    project's 2-core CPU (fp32, SmolLM2), a 4-row forward cost 1.8x a 1-row one. Computing `(W @ x.T).T`
    instead reads W once for all rows, like a matrix-vector product: 4 rows then cost the same as 1, and
    16 rows 1.45x. One row and long prefills keep the ordinary kernel.
    """

    NARROW = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type != "cpu" or not 1 < rows <= self.NARROW:
            return F.linear(x, self.weight, self.bias)
        y = (self.weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], -1)  # (..., out)
        return y if self.bias is None else y + self.bias


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

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # (B, 1, T, hd)
        sin: torch.Tensor,  # (B, 1, T, hd)
        k_cache: torch.Tensor,  # (B, kvh, S_max, hd), this layer's slice of the cache
        v_cache: torch.Tensor,
        start: int,  # first free cache slot: the new rows are written at start .. start+T-1
        mask: torch.Tensor | None,  # (B, 1, T, start+T) bool, or None for "attend to everything"
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
        v = self.v_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
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
        if mask is not None and rep > 1:
            S = mask.shape[-1]
            mask = mask[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, kvh, rep*T, hd)
        out = out.reshape(B, cfg.num_heads, T, cfg.head_dim)  # (B, h, T, hd); CUDA kernels may return it strided
        return self.o_proj(out.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) token ids of the new rows
        positions: torch.Tensor,  # (B, T) absolute positions of the new rows
        cache: KVCache,  # rows are written at cache.length .. cache.length+T-1, then cache.length += T
        mask: torch.Tensor | None = None,  # (B, T, T) bool among the new rows; None = causal. The cache is always visible.
        num_logits: int | None = None,  # compute logits for the last `num_logits` rows only (None = all)
        layers: Sequence[int] | None = None,  # run only these layers (cache layer i holds layers[i]); None = all
        hidden_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        B, T = tokens.shape
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} rows; {start} used, {T} more asked")
        x = self.embed_tokens(tokens)  # (B, T, D)
        cos = self.rope_cos[positions].to(x.dtype)[:, None]  # (B, 1, T, hd)
        sin = self.rope_sin[positions].to(x.dtype)[:, None]
        full_mask: torch.Tensor | None
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril_()[None].expand(B, T, T)
        if T == 1:
            full_mask = None
        else:
            prefix = torch.ones(B, T, start, dtype=torch.bool, device=x.device)
            full_mask = torch.cat((prefix, mask), dim=-1)[:, None]  # (B, 1, T, start+T)
        layer_ids = range(self.cfg.num_layers) if layers is None else layers
        for slot, li in enumerate(layer_ids):
            block = typing.cast(Block, self.layers[li])
            h = block.self_attn(block.input_layernorm(x), cos, sin, cache.k[slot], cache.v[slot], start, full_mask)
            x = x + h
            x = x + block.mlp(block.post_attention_layernorm(x))
        cache.length = start + T
        hidden = self.norm(x)  # (B, T, D)
        if hidden_only:
            return None, hidden
        rows = hidden if num_logits is None else hidden[:, -num_logits:]
        logits = self.lm_head(rows).float()  # (B, T', V)
        return logits, hidden
