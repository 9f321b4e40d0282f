"""Fused Triton kernels for the decode forward (1 to 64 rows): five launches per layer instead of ~12.

On the H200 machine a kernel in a CUDA graph costs ~3-4 us whatever it does, and a decode forward of
SmolLM2-135M moves only ~270 MB, so the forward's time is the number of kernels. These fuse:

- `fused_linear`: y = [RMSNorm](A) @ W^T with one of four epilogues: store; SiLU(gate)·up; residual add
  (in place); RoPE on q/k with k and v written straight into the KV cache at their slots.
  The RMSNorm weight is folded into W by the caller (W' = W · w), the row scale is computed in the kernel.
  Two kernels behind it: tensor cores (rows padded to 16-row tiles), or CUDA cores with a program
  per (row, column block) holding all of K — for one row the faster one on the H200 for some projections,
  since narrow column blocks spread even a 576-column projection over the whole GPU. Both compute a row the
  same way whatever the number of rows, which the runner relies on to keep the AR step and a verify round
  of any width bit-identical (cuda_graphs.py, DEFAULT_TUNING).
- `attention`: grouped-query attention of the new rows over the cache, a program per (kv head, token,
  split of the positions): each row reads its keys in position order (the committed cache, then its tree
  ancestors through a per-row table), so its output is the 1-row step's at the same position, bit for bit.

`start` and the slots are read from device memory, so a captured graph stays valid as the cache grows.
Needs Triton (present wherever PyTorch has CUDA); `available()` says whether it can be used here. The
kernels run under TRITON_INTERPRET=1 on a CPU too (fp16 and fp32; the interpreter has no bf16), which is how
they can be checked without a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the runner uses its torch path
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

STORE, SILU, RESIDUAL, ROPE = 0, 1, 2, 3  # epilogues of fused_linear


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _fused_linear_kernel(
        a_ptr, stride_am,  # A (M, K), K contiguous
        w_ptr, stride_wn,  # W (N_all, K), K contiguous
        out_ptr, stride_om,  # STORE / SILU / RESIDUAL: (M, N); ROPE: q (M, NQ, HD)
        res_ptr, stride_rm,  # RESIDUAL: the residual stream (may be out_ptr itself)
        cos_ptr, sin_ptr, pos_ptr, slot_ptr,  # ROPE: tables (P, HD), positions (M,), cache slots (M,)
        kc_ptr, vc_ptr, stride_ch,  # ROPE: this layer's K and V cache, (kvh, S, HD) with head stride
        M, N, K, eps,
        NORM: tl.constexpr, EPI: tl.constexpr, OFF2: tl.constexpr,
        NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if EPI == 3:  # ROPE: HD // 2 // BLOCK_N programs per head; columns d and d + HD/2 rotate together
            head = pid_n // (HD // 2 // BLOCK_N)
            d = (pid_n % (HD // 2 // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's d < HD/2
            rn = head * HD + d
        else:
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:
                af = a.to(tl.float32)
                ss += tl.sum(af * af, 1)
            w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BN)
            acc = tl.dot(a, w, acc)
            if EPI == 1 or EPI == 3:
                w2 = tl.load(w_ptr + (rn + OFF2)[None, :] * stride_wn + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
                acc2 = tl.dot(a, w2, acc2)
        if NORM:
            scale = 1.0 / tl.sqrt(ss / K + eps)
            acc = acc * scale[:, None]
            acc2 = acc2 * scale[:, None]
        if EPI == 0:
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        elif EPI == 1:
            y = acc / (1.0 + tl.exp(-acc)) * acc2
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        elif EPI == 2:
            r = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            y = r.to(tl.float32) + acc
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        else:  # ROPE: heads are q heads, then k heads, then v heads
            x1 = acc.to(a_ptr.dtype.element_ty).to(tl.float32)  # the projection rounds as the model's does
            x2 = acc2.to(a_ptr.dtype.element_ty).to(tl.float32)
            if head < NQ + NKV:
                pos = tl.load(pos_ptr + rm, mask=m_ok, other=0)
                c = tl.load(cos_ptr + pos[:, None] * HD + d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
                s = tl.load(sin_ptr + pos[:, None] * HD + d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
                y1 = x1 * c - x2 * s
                y2 = x2 * c + x1 * s
            else:
                y1 = x1
                y2 = x2
            if head < NQ:
                base = out_ptr + rm[:, None] * (NQ * HD) + head * HD + d[None, :]
                tl.store(base, y1.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
                tl.store(base + HD // 2, y2.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
            else:
                slot = tl.load(slot_ptr + rm, mask=m_ok, other=0)
                if head < NQ + NKV:
                    base = kc_ptr + (head - NQ) * stride_ch + slot[:, None] * HD + d[None, :]
                else:
                    base = vc_ptr + (head - NQ - NKV) * stride_ch + slot[:, None] * HD + d[None, :]
                tl.store(base, y1.to(kc_ptr.dtype.element_ty), mask=m_ok[:, None])
                tl.store(base + HD // 2, y2.to(kc_ptr.dtype.element_ty), mask=m_ok[:, None])

    @triton.jit
    def _row_linear_kernel(
        a_ptr, stride_am, w_ptr, stride_wn, out_ptr, stride_om, res_ptr, stride_rm,
        cos_ptr, sin_ptr, pos_ptr, slot_ptr, kc_ptr, vc_ptr, stride_ch,
        M, N, K, eps,
        NORM: tl.constexpr, EPI: tl.constexpr, OFF2: tl.constexpr,
        NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """The same epilogues on the CUDA cores: program (row, j) computes BLOCK_N columns of one row over all of
        K (BLOCK_K >= K). Every row runs the same instructions whatever the number of rows, so its result does not
        depend on the width of the forward (the AR step and a verify round alike); the programs of one column
        block are adjacent in launch order, so their shared W tile is read from memory once and from L2 after."""
        r = tl.program_id(0)
        pid_n = tl.program_id(1)
        if EPI == 3:
            head = pid_n // (HD // 2 // BLOCK_N)
            d = (pid_n % (HD // 2 // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
            rn = head * HD + d
        else:
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rk = tl.arange(0, BLOCK_K)
        k_ok = rk < K
        wmask = n_ok[None, :] & k_ok[:, None]
        w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=wmask, other=0.0)  # (BK, BN), kept in bf16
        if EPI == 1 or EPI == 3:
            w2 = tl.load(w_ptr + (rn + OFF2)[None, :] * stride_wn + rk[:, None], mask=wmask, other=0.0)
        a = tl.load(a_ptr + r * stride_am + rk, mask=k_ok, other=0.0).to(tl.float32)  # (BK,)
        y = tl.sum(a[:, None] * w.to(tl.float32), 0)  # (BN,)
        if EPI == 1 or EPI == 3:
            y2 = tl.sum(a[:, None] * w2.to(tl.float32), 0)
        if NORM:
            scale = 1.0 / tl.sqrt(tl.sum(a * a, 0) / K + eps)
            y = y * scale
            if EPI == 1 or EPI == 3:
                y2 = y2 * scale
        if EPI == 0:
            tl.store(out_ptr + r * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=n_ok)
        elif EPI == 1:
            tl.store(out_ptr + r * stride_om + rn, (y / (1.0 + tl.exp(-y)) * y2).to(out_ptr.dtype.element_ty), mask=n_ok)
        elif EPI == 2:
            res = tl.load(res_ptr + r * stride_rm + rn, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + r * stride_om + rn, (res + y).to(out_ptr.dtype.element_ty), mask=n_ok)
        else:
            x1 = y.to(a_ptr.dtype.element_ty).to(tl.float32)  # the projection rounds as the model's does
            x2 = y2.to(a_ptr.dtype.element_ty).to(tl.float32)
            if head < NQ + NKV:
                pos = tl.load(pos_ptr + r)
                c = tl.load(cos_ptr + pos * HD + d).to(tl.float32)
                sn = tl.load(sin_ptr + pos * HD + d).to(tl.float32)
                y1 = x1 * c - x2 * sn
                y2r = x2 * c + x1 * sn
            else:
                y1 = x1
                y2r = x2
            if head < NQ:
                base = out_ptr + r * (NQ * HD) + head * HD + d
                tl.store(base, y1.to(out_ptr.dtype.element_ty))
                tl.store(base + HD // 2, y2r.to(out_ptr.dtype.element_ty))
            else:
                slot = tl.load(slot_ptr + r)
                if head < NQ + NKV:
                    base = kc_ptr + (head - NQ) * stride_ch + slot * HD + d
                else:
                    base = vc_ptr + (head - NQ - NKV) * stride_ch + slot * HD + d
                tl.store(base, y1.to(kc_ptr.dtype.element_ty))
                tl.store(base + HD // 2, y2r.to(kc_ptr.dtype.element_ty))

    @triton.jit
    def _attention_kernel(
        q_ptr,  # (T, NQ, HD)
        kc_ptr, vc_ptr, stride_ch,  # this layer's cache, (kvh, S, HD) with head stride
        po_ptr, pm_ptr, pl_ptr,  # partials: o (NSPLIT, T·NQ, HD) fp32, m and l (NSPLIT, T·NQ) fp32
        pos_ptr,  # (T,) int64 positions of the new rows
        slot_ptr,  # (T,) int64: slot_ptr[0] is `start`, the first slot of the new rows (unless BATCHED)
        anc_ptr,  # (T, ANC_W) int64: anc[t, d] = slot of the row row t sees at position start + d, or -1 (unused when CAUSAL)
        start_ptr, base_ptr,  # BATCHED: (T,) int64 each: the row's sequence's first new position, and its first slot
        T, S, SHARE, sm_scale, ANC_W,
        CAUSAL: tl.constexpr, BATCHED: tl.constexpr, REP: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Program (kv head, token t, split): the REP query heads of token t over positions
        [split·SHARE, (split+1)·SHARE) ∩ [0, pos_t], read in position order (a tree row's ancestors through
        `anc`, wherever their rows sit), in blocks of BLOCK_S aligned at 0. Nothing here depends on how many
        rows share the forward, so a row's partials equal those of the 1-row step at its position bit for bit.
        BATCHED: the rows belong to several sequences, each with its cache at its own offset (`base`, in slots)
        of one storage and its own `start`; position c of a row's committed cache sits at slot base + c."""
        kvh = tl.program_id(0)
        t = tl.program_id(1)
        split = tl.program_id(2)
        r = tl.arange(0, BLOCK_M)  # this token's query heads of kv head `kvh`, padded to one tile
        r_ok = r < REP
        h = kvh * REP + r
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + t * (NQ * HD) + h[:, None] * HD + d[None, :], mask=r_ok[:, None], other=0.0)
        if BATCHED:
            start = tl.load(start_ptr + t)
            base = tl.load(base_ptr + t)
        else:
            start = tl.load(slot_ptr)
            base = 0
        p_t = tl.load(pos_ptr + t)
        lo = split * SHARE
        hi = tl.minimum(lo + SHARE, p_t + 1)
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HD), dtype=tl.float32)
        qk_scale = sm_scale * 1.4426950408889634  # exp2
        for c0 in range(lo, hi, BLOCK_S):
            c = c0 + tl.arange(0, BLOCK_S)  # positions
            if CAUSAL:  # a chain: every position sits in the slot of the same number
                slot = base + c
                vis = c < hi
            else:
                rel = c - start
                new = (rel >= 0) & (c < hi)
                anc = tl.load(anc_ptr + t * ANC_W + tl.where(new, rel, 0), mask=new, other=-1)
                slot = tl.where(rel < 0, base + c, anc)
                vis = (c < hi) & (slot >= 0)
            vis = vis & (slot < S)
            k = tl.load(kc_ptr + kvh * stride_ch + slot[:, None] * HD + d[None, :], mask=vis[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_S)
            s = tl.where(vis[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vc_ptr + kvh * stride_ch + slot[:, None] * HD + d[None, :], mask=vis[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        row = t * NQ + h  # (t, head) index
        TN = T * NQ
        tl.store(po_ptr + (split * TN + row[:, None]) * HD + d[None, :], acc, mask=r_ok[:, None])
        tl.store(pm_ptr + split * TN + row, m_i, mask=r_ok)
        tl.store(pl_ptr + split * TN + row, l_i, mask=r_ok)

    @triton.jit
    def _attention_combine_kernel(po_ptr, pm_ptr, pl_ptr, o_ptr, TN, NSPLIT: tl.constexpr, HD: tl.constexpr):
        row = tl.program_id(0)  # (t, head): o_ptr row-major (T, NQ, HD) is (T·NQ, HD)
        sp = tl.arange(0, NSPLIT)
        m = tl.load(pm_ptr + sp * TN + row)
        l = tl.load(pl_ptr + sp * TN + row)
        mx = tl.max(m, 0)
        w = tl.exp2(m - mx)  # splits that saw nothing have l = 0 and weigh nothing
        d = tl.arange(0, HD)
        po = tl.load(po_ptr + (sp[:, None] * TN + row) * HD + d[None, :])
        out = tl.sum(po * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(o_ptr + row * HD + d, out.to(o_ptr.dtype.element_ty))


BLOCK_M = 16  # rows per tensor-core tile at every width: a row computes the same way in a 1-row and a 64-row launch


def fused_linear(
    a: torch.Tensor,  # (M, K)
    w: torch.Tensor,  # (N, K), or (2N, K) for SILU (gate rows, then up rows)
    out: torch.Tensor,
    epi: int = STORE,
    norm_eps: float | None = None,  # RMSNorm the rows of `a` first (its weight already folded into w)
    res: torch.Tensor | None = None,
    rope: tuple | None = None,  # (cos, sin, pos, slots, k_cache, v_cache, NQ, NKV, HD) for ROPE
    block_n: int = 32,  # ROPE: columns per program within a head's half (divides HD / 2)
    block_k: int = 64,
    dot: bool = True,  # tensor cores (rows padded to 16); False: CUDA cores, a program per row (block_k >= K)
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    M, K = a.shape
    N = w.shape[0] // 2 if epi == SILU else w.shape[0]
    nq = nkv = hd = 1
    if dot:
        block_n = max(block_n, 16)  # tl.dot's smallest tile
    if epi == ROPE:
        assert rope is not None
        cos, sin, pos, slots, kc, vc, nq, nkv, hd = rope
        half = hd // 2
        block_n = min(block_n, half)
        if half % block_n:
            raise ValueError(f"fused_linear: block_n {block_n} must divide head_dim / 2 = {half}")
        off2, grid_n = half, (nq + 2 * nkv) * (half // block_n)
        stride_ch = kc.stride(0)
    else:
        cos = sin = pos = slots = kc = vc = out
        off2 = N if epi == SILU else 0
        grid_n = triton.cdiv(N, block_n)
        stride_ch = 0
    if res is None:
        res = out
    if not dot:
        if block_k < K:
            raise ValueError(f"fused_linear: the CUDA-core kernel holds all of K in one block: block_k {block_k} < K {K}")
        _row_linear_kernel[(M, grid_n)](
            a, a.stride(0), w, w.stride(0), out, out.stride(0), res, res.stride(0),
            cos, sin, pos, slots, kc, vc, stride_ch,
            M, N, K, 0.0 if norm_eps is None else norm_eps,
            NORM=norm_eps is not None, EPI=epi, OFF2=off2, NQ=nq, NKV=nkv, HD=hd,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        )
        return out
    bm = BLOCK_M
    _fused_linear_kernel[(grid_n, triton.cdiv(M, bm))](
        a, a.stride(0), w, w.stride(0), out, out.stride(0), res, res.stride(0),
        cos, sin, pos, slots, kc, vc, stride_ch,
        M, N, K, 0.0 if norm_eps is None else norm_eps,
        NORM=norm_eps is not None, EPI=epi, OFF2=off2, NQ=nq, NKV=nkv, HD=hd,
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def attention(
    q: torch.Tensor,  # (T, NQ, HD)
    k_cache: torch.Tensor,  # (kvh, S, HD) view of one layer's cache (batch 1)
    v_cache: torch.Tensor,
    out: torch.Tensor,  # (T, NQ·HD)
    positions: torch.Tensor,  # (T,) int64
    slots: torch.Tensor,  # (T,) int64, slots[0] = start
    anc: torch.Tensor | None,  # (T, W) int64 slot of each row's key at position start + d (-1: unseen); None = causal chain
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # (NSPLIT, T·NQ, HD), (NSPLIT, T·NQ) ×2, fp32
    share: int,  # positions per split, a multiple of block_s: fixed per runner, never per width
    block_s: int = 64,
    sequences: tuple[torch.Tensor, torch.Tensor] | None = None,  # rows of several sequences: (start, base), (T,) each
) -> torch.Tensor:
    """Attention of the new rows, split over positions in NSPLIT shares of `share`, then combined: two launches.
    Every row is computed alone over its keys in position order, so its output does not depend on the width,
    nor on which other sequences' rows share the launch (`sequences`: each row's cache lies at its `base`)."""
    T, nq, hd = q.shape
    nkv = k_cache.shape[0]
    rep = nq // nkv
    if rep > BLOCK_M or share % block_s:
        raise ValueError(f"attention: {rep} query heads per kv head (max {BLOCK_M}), share {share} not a multiple of {block_s}")
    if sequences is not None and anc is None:
        raise ValueError("attention: rows of several sequences need their ancestor table")
    po, pm, pl = partials
    nsplit = po.shape[0]
    start, base = (slots, slots) if sequences is None else sequences
    anc_w = 0 if anc is None else (anc.shape[1] if anc.dim() == 2 else T)
    _attention_kernel[(nkv, T, nsplit)](
        q, k_cache, v_cache, k_cache.stride(0), po, pm, pl, positions, slots, slots if anc is None else anc, start, base,
        T, k_cache.shape[1], share, hd ** -0.5, anc_w, CAUSAL=anc is None, BATCHED=sequences is not None, REP=rep, NQ=nq, HD=hd,
        BLOCK_M=BLOCK_M, BLOCK_S=block_s, num_warps=4, num_stages=2,
    )
    _attention_combine_kernel[(T * nq,)](po, pm, pl, out, T * nq, NSPLIT=nsplit, HD=hd, num_warps=1)
    return out
