"""The CPU's decode forward (the 1-row step `ar` runs per token, and `--widths` wider verify chains) with
row-invariant forwards and without, interleaved.

For each context length and width, the two paths alternate `--rounds` times (one forward each, after a
warm-up); the median of each path's times and their ratio are printed. Complements
scripts/row_invariance_cost.py, whose whole-generation figures move with this shared machine's speed.

    python scripts/row_invariance_step.py --contexts 100,400,800 --rounds 40
    python scripts/row_invariance_step.py --dtype fp32 --contexts 300,1000 --widths 1,4,8,16 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastdecode
from fastdecode.models import llama


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--contexts", default="100,400,800")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--widths", default="1", help="rows per forward: a causal chain after the context")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    gen = fastdecode.load(args.model, device="cpu", dtype=args.dtype)
    m = gen.model
    print(f"{'context':>8} {'width':>6} {'invariant ms':>13} {'width-dep. ms':>14} {'ratio':>7}")
    with torch.inference_mode():
        for ctx in (int(c) for c in args.contexts.split(",")):
            cache = m.new_cache(1, -(-(ctx + 256) // llama.ATTN_BLOCK) * llama.ATTN_BLOCK)  # as the engine allocates
            ids = torch.randint(0, m.cfg.vocab_size, (1, ctx + max(widths)), generator=torch.Generator().manual_seed(ctx))
            m(ids[:, :ctx], torch.arange(ctx)[None], cache, hidden_only=True)
            times: dict[tuple[int, bool], list[float]] = {(w, on): [] for w in widths for on in (True, False)}
            for r in range(args.rounds + 2):
                for w in widths:
                    for on in (True, False):
                        llama.ROW_INVARIANT_ON = on
                        cache.truncate(ctx)
                        t0 = time.perf_counter()
                        m(ids[:, ctx : ctx + w], torch.arange(ctx, ctx + w)[None], cache)
                        if r >= 2:
                            times[(w, on)].append(time.perf_counter() - t0)
            llama.ROW_INVARIANT_ON = True
            for w in widths:
                a, b = statistics.median(times[(w, True)]) * 1e3, statistics.median(times[(w, False)]) * 1e3
                print(f"{ctx:>8} {w:>6} {a:>13.2f} {b:>14.2f} {a / b:>6.3f}x", flush=True)


if __name__ == "__main__":
    main()
