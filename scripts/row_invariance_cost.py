"""What row-invariant forwards cost on the CPU: `ar` ms/token and each drafter's speedup with them and without.

One process, one model, the two CPU paths interleaved per prompt (invariant, then width-dependent, for every
method), so machine drift cancels out of the ratios. The width-dependent path is what fastdecode ran before
issue 10 (a 1-row step through `F.linear` and SDPA, narrow products for 2..64 rows, separate q/k/v and
gate/up products), switched by `fastdecode.models.llama.ROW_INVARIANT_ON`. Each path's drafters are compared
with its own `ar`: exact match counts the prompts whose tokens are identical.

    python scripts/row_invariance_cost.py --per-category 1 --max-new-tokens 128 --out bench-out/row-invariance-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import fastdecode
from fastdecode.data import spec_bench_subset
from fastdecode.models import llama

MODES = {"invariant": True, "width-dependent": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--methods", default="ar,pld,ngram,lookahead")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    methods = args.methods.split(",")
    if methods[0] != "ar":
        methods = ["ar", *[m for m in methods if m != "ar"]]
    gen = fastdecode.load(args.model, device="cpu", dtype=args.dtype)
    drafters: dict[str, dict] = {mode: {} for mode in MODES}  # each path keeps its own drafter state (ngram tables)
    gen.generate("Hello", "ar", max_new_tokens=4)
    totals = {(mode, m): [0, 0.0] for mode in MODES for m in methods}  # tokens, seconds
    same = {(mode, m): 0 for mode in MODES for m in methods}
    prompts = spec_bench_subset(args.per_category)
    t0 = time.perf_counter()
    for i, q in enumerate(prompts):
        for mode, on in MODES.items():
            llama.ROW_INVARIANT_ON = on
            gen._drafters = drafters[mode]
            ref = None
            for m in methods:
                out = gen.generate(q["turns"][0], m, max_new_tokens=args.max_new_tokens)
                totals[(mode, m)][0] += out.stats.new_tokens
                totals[(mode, m)][1] += out.stats.wall_s
                ref = out.token_ids if m == "ar" else ref
                same[(mode, m)] += out.token_ids == ref
        print(f"[{time.perf_counter() - t0:7.1f} s] prompt {i + 1}/{len(prompts)} ({q['category']})", flush=True)
    llama.ROW_INVARIANT_ON = True
    rows = []
    for mode in MODES:
        ar_tps = totals[(mode, "ar")][0] / totals[(mode, "ar")][1]
        for m in methods:
            tok, sec = totals[(mode, m)]
            rows.append({"path": mode, "method": m, "tokens": tok, "seconds": round(sec, 3), "ms_per_token": round(1e3 * sec / tok, 2),
                         "tokens_per_s": round(tok / sec, 2), "speedup": round(tok / sec / ar_tps, 3),
                         "exact": f"{same[(mode, m)]}/{len(prompts)}"})
    result = {"command": "python scripts/row_invariance_cost.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "dtype": args.dtype,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "prompts": len(prompts), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'path':<16} {'method':<10} {'ms/token':>9} {'tokens/s':>9} {'speedup':>8} {'exact':>6}")
    for r in rows:
        print(f"{r['path']:<16} {r['method']:<10} {r['ms_per_token']:>9} {r['tokens_per_s']:>9} {r['speedup']:>7}x {r['exact']:>6}")


if __name__ == "__main__":
    main()
