"""Tune the fused linear kernels of the decode forward on this GPU; write the best tuning as JSON.

For each of SmolLM2-135M's five projections (qkv with RoPE and the KV write, o with the residual, gate/up
with SiLU, down with the residual, the LM head) and each launch configuration (columns per program, K chunk,
tensor cores or not, warps), time a CUDA graph that launches the kernel once per weight copy, over enough
copies that the weights do not stay in L2 (as in a real forward, which reads ~270 MB per token). The
`decode` launch of each projection (one for every width 1..64, so that rows compute alike at every width)
is the one with the least time at 1 row plus at 16 rows, over CUDA-core and tensor-core launches; its time
at 64 rows is recorded too. Timing does not depend on the weights, so they are random.

    python scripts/gpu_kernel_sweep.py --out results/sweep.json --tuning-out /root/tuning.json
    FASTDECODE_TUNING=/root/tuning.json python -m fastdecode bench ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import torch

from fastdecode import triton_kernels as tk
from fastdecode.cuda_graphs import DEFAULT_TUNING, LINEARS

D, FF, H, KVH, HD, V = 576, 1536, 9, 3, 64, 49152  # SmolLM2-135M
DEVICE, DTYPE = "cuda", torch.bfloat16
L2_DEFEAT_BYTES = 200e6


def make_case(kind: str, M: int, copies: int | None = None):
    """-> (launch(i, cfg), number of weight copies): launch i uses copy i."""
    dev, bf = DEVICE, DTYPE
    n_rows, K = {"qkv": ((H + 2 * KVH) * HD, D), "o": (D, D), "gu": (2 * FF, D), "down": (D, FF), "lm": (V, D)}[kind]
    per_copy = n_rows * K * 2
    n = copies or max(2, min(64, int(L2_DEFEAT_BYTES // per_copy) + 1))
    ws = [torch.randn(n_rows, K, device=dev, dtype=bf) * 0.02 for _ in range(n)]
    a = torch.randn(M, K, device=dev, dtype=bf)
    if kind == "qkv":
        q = torch.empty(M, H, HD, device=dev, dtype=bf)
        cos, sin = torch.randn(4096, HD, device=dev), torch.randn(4096, HD, device=dev)
        pos = torch.arange(100, 100 + M, device=dev)
        kc, vc = torch.zeros(KVH, 4096, HD, device=dev, dtype=bf), torch.zeros(KVH, 4096, HD, device=dev, dtype=bf)
        rope = (cos, sin, pos, pos, kc, vc, H, KVH, HD)
        return (lambda i, c: tk.fused_linear(a, ws[i], q, tk.ROPE, norm_eps=1e-5, rope=rope, **c)), n
    if kind == "gu":
        mid = torch.empty(M, FF, device=dev, dtype=bf)
        return (lambda i, c: tk.fused_linear(a, ws[i], mid, tk.SILU, norm_eps=1e-5, **c)), n
    if kind == "lm":
        out = torch.empty(M, V, device=dev, dtype=torch.float32)
        return (lambda i, c: tk.fused_linear(a, ws[i], out, tk.STORE, norm_eps=1e-5, **c)), n
    x = torch.randn(M, D, device=dev, dtype=bf)
    return (lambda i, c: tk.fused_linear(a, ws[i], x, tk.RESIDUAL, res=x, **c)), n


def time_us(launch, n: int, cfg: dict, reps: int = 20) -> float:
    """Median microseconds per launch, replaying a graph of n launches (one per weight copy)."""
    for i in range(n):  # compile, and check it runs
        launch(i, cfg)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            launch(i, cfg)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n)
    return statistics.median(times)


def candidates(kind: str, cuda_cores: bool) -> list[dict]:
    out = []
    if cuda_cores:  # one block over all of K
        bns = (4, 8, 16, 32) if kind == "lm" else (2, 4, 8, 16)
        kfull = 2048 if kind == "down" else 1024
        for bn, w in itertools.product(bns, (2, 4, 8)):
            out.append({"block_n": bn, "block_k": kfull, "dot": False, "num_warps": w, "num_stages": 3})
    else:
        bns = (64, 128, 256) if kind == "lm" else ((16, 32) if kind == "qkv" else (16, 32, 64))
        for bn, bk, w in itertools.product(bns, (64, 128, 256), (4, 8)):
            out.append({"block_n": bn, "block_k": bk, "dot": True, "num_warps": w, "num_stages": 3})
    return out


def sweep(kind: str, M: int, cfgs: list[dict], res: dict, tag: str) -> list[tuple[float, dict]]:
    launch, n = make_case(kind, M)
    rows = []
    for cfg in cfgs:
        try:
            rows.append((time_us(launch, n, cfg), cfg))
        except Exception as e:  # noqa: BLE001 - a configuration that cannot build here is skipped, and said so
            print(f"{kind} M={M} {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
    rows.sort(key=lambda r: r[0])
    res["timings"][f"{kind}:{tag}:M{M}"] = [(round(us, 2), cfg) for us, cfg in rows]
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="every timing, as JSON")
    ap.add_argument("--tuning-out", required=True, help="the best tuning, as JSON for FASTDECODE_TUNING")
    ap.add_argument("--quick", action="store_true", help="CUDA-core launches against the default tuning's only")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "timings": {}}

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    # one launch per projection serves every width (1..64): score = time at 1 row + time at 16 rows
    decode: dict[str, dict] = {}
    for kind in LINEARS:
        cfgs = candidates(kind, True) + ([DEFAULT_TUNING["decode"][kind]] if args.quick else candidates(kind, False))
        t1 = {json.dumps(c): us for us, c in sweep(kind, 1, cfgs, res, "decode")}
        t16 = {json.dumps(c): us for us, c in sweep(kind, 16, cfgs, res, "decode")}
        scored = sorted((t1[k] + t16[k], t1[k], t16[k], k) for k in t1 if k in t16)
        decode[kind] = json.loads(scored[0][3])
        res["timings"][f"{kind}:decode:score"] = [(round(a, 2), round(b, 2), round(c, 2), json.loads(k)) for a, b, c, k in scored]
        w64 = sweep(kind, 64, [decode[kind]], res, "decode")
        say(f"{kind:5} decode {scored[0][1]:6.2f} us at 1 row, {scored[0][2]:6.2f} us at 16, {w64[0][0]:6.2f} us at 64: {decode[kind]}")
    best = {"decode": decode}
    res["best"] = best
    res["seconds"] = round(time.perf_counter() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    with open(args.tuning_out, "w") as f:
        json.dump(best, f, indent=1)
    say(f"best tuning: {json.dumps(best)}")


if __name__ == "__main__":
    main()
