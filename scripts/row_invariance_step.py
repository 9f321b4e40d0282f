"""The CPU's 1-row decode step (what `ar` runs per token) with row-invariant forwards and without, interleaved.

For each context length, the two paths alternate `--rounds` times (one forward each, after a warm-up); the
median of each path's times and their ratio are printed. Complements scripts/row_invariance_cost.py, whose
whole-generation figures move with this shared machine's two speed regimes.

    python scripts/row_invariance_step.py --contexts 100,400,800 --rounds 40
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
    args = ap.parse_args()
    gen = fastdecode.load(args.model, device="cpu", dtype=args.dtype)
    m = gen.model
    print(f"{'context':>8} {'invariant ms':>13} {'width-dep. ms':>14} {'ratio':>7}")
    with torch.inference_mode():
        for ctx in (int(c) for c in args.contexts.split(",")):
            cache = m.new_cache(1, -(-(ctx + 256) // llama.ATTN_BLOCK) * llama.ATTN_BLOCK)  # as the engine allocates
            ids = torch.randint(0, m.cfg.vocab_size, (1, ctx + 1), generator=torch.Generator().manual_seed(ctx))
            m(ids[:, :ctx], torch.arange(ctx)[None], cache, hidden_only=True)
            times: dict[bool, list[float]] = {True: [], False: []}
            for r in range(args.rounds + 2):
                for on in (True, False):
                    llama.ROW_INVARIANT_ON = on
                    cache.truncate(ctx)
                    t0 = time.perf_counter()
                    m(ids[:, ctx:], torch.tensor([[ctx]]), cache)
                    if r >= 2:
                        times[on].append(time.perf_counter() - t0)
            llama.ROW_INVARIANT_ON = True
            a, b = statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3
            print(f"{ctx:>8} {a:>13.2f} {b:>14.2f} {a / b:>6.3f}x", flush=True)


if __name__ == "__main__":
    main()
