"""A small GPU benchmark of the decode loop (until `fastdecode bench --device cuda` covers all of it).

On Spec-Bench (first turn of the first N questions per category, chat template, greedy, --max-new-tokens),
methods interleaved per prompt: tokens/s (prefill included), MAT, the per-step breakdown, and for each
lossless method the exact-match rate against `ar` with the top-2 logit gap at the first differing token.
Also: time to first token for a ~1,000-token prompt, and transformers `generate` on a few of the prompts.

    python scripts/gpu_bench.py --model /root/models/smollm2.gguf --out results/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import fastdecode
from fastdecode.bench.metrics import gen_seconds
from fastdecode.data import spec_bench_subset


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def gap(top: tuple[list[int], list[float]]) -> float:
    return float(top[1][0] - top[1][1])


def run_methods(gen, prompts, methods, max_new: int, log) -> dict:
    out: dict = {m: {"tokens": 0, "wall": 0.0, "steps": 0, "prefill": 0.0, "draft": 0.0, "verify": 0.0, "host": 0.0,
                     "capture": 0.0, "ratios": [], "exact": 0, "divergences": []} for m in methods}
    for i, q in enumerate(prompts):
        ids = gen.prompt_ids(q["turns"][0])
        ref = None
        for m in methods:
            r = gen.generate(ids, m, max_new_tokens=max_new)
            s, o = r.stats, out[m]
            seconds = gen_seconds(s.summary())  # one-time graph capture is not generation time, as in `fastdecode bench`
            o["tokens"] += s.new_tokens
            o["wall"] += seconds
            o["steps"] += s.steps
            o["prefill"] += s.prefill_s
            o["draft"] += s.draft_s
            o["verify"] += s.verify_s
            o["host"] += s.host_s
            o["capture"] += s.capture_s
            if m == "ar":
                ref = (r.token_ids, s.new_tokens / seconds)
                o["exact"] += 1
            else:
                assert ref is not None
                o["ratios"].append(s.new_tokens / seconds / ref[1])
                d = first_divergence(ref[0], r.token_ids)
                if d is None:
                    o["exact"] += 1
                else:  # the top-2 logit gap at the first differing token, from untimed reruns with top_logits
                    tops = [gen.generate(ids, mm, max_new_tokens=max_new, top_logits=16).stats.top_logits for mm in ("ar", m)]
                    o["divergences"].append({"question_id": q["question_id"], "at": d,
                                             "ar_top2_gap": gap(tops[0][d]) if d < len(tops[0]) else None,
                                             "method_top2_gap": gap(tops[1][d]) if d < len(tops[1]) else None})
        log(f"prompt {i + 1}/{len(prompts)} done")
    n = len(prompts)
    summary = {}
    for m, o in out.items():
        summary[m] = {
            "prompts": n, "new_tokens": o["tokens"], "tokens_per_s": o["tokens"] / o["wall"], "ms_per_token": 1e3 * o["wall"] / o["tokens"],
            "mat": o["tokens"] / o["steps"], "speedup_vs_ar": (o["tokens"] / o["wall"]) / (out["ar"]["tokens"] / out["ar"]["wall"]),
            "median_prompt_ratio": statistics.median(o["ratios"]) if o["ratios"] else 1.0,
            "per_step_us": {k: 1e6 * o[k] / o["steps"] for k in ("draft", "verify", "host")},
            "prefill_ms_mean": 1e3 * o["prefill"] / n, "capture_s": o["capture"],
            "exact_match": o["exact"] / n, "divergences": o["divergences"],
        }
    return summary


def ttft(gen, n_tokens: int = 1000, reps: int = 5) -> dict:
    """Prefill of a ~n-token prompt plus the first step, as generate() times it (max_new_tokens=1)."""
    text = " ".join(q["turns"][0] for q in spec_bench_subset(10))
    ids = gen.tokenizer.encode(text)[:n_tokens]
    gen.generate(ids, "ar", max_new_tokens=1)  # warm: captures the prefill graph
    walls = []
    for _ in range(reps):
        r = gen.generate(ids, "ar", max_new_tokens=1)
        walls.append(r.stats.wall_s)
    return {"prompt_tokens": len(ids), "ttft_ms_median": 1e3 * statistics.median(walls), "ttft_ms_all": [round(1e3 * w, 3) for w in walls]}


def transformers_generate(path: str, prompts, max_new: int) -> dict:
    """transformers `generate` (bf16, eager, default cache) on the same GGUF, greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16).cuda().eval()
    rows = []
    for i, q in enumerate(prompts):
        ids = tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}], add_generation_prompt=True, return_tensors="pt")
        ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).cuda()
        if i == 0:
            model.generate(ids, max_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()  # transformers' loop synchronises on its own stopping checks
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
        torch.cuda.synchronize()
        rows.append((out.shape[1] - ids.shape[1], time.perf_counter() - t))
    toks, wall = sum(r[0] for r in rows), sum(r[1] for r in rows)
    return {"prompts": len(rows), "new_tokens": toks, "tokens_per_s": toks / wall, "ms_per_token": 1e3 * wall / toks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/models/smollm2.gguf")
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="ar,pld")
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peer-prompts", type=int, default=4, help="transformers generate on this many prompts (0 = skip)")
    ap.add_argument("--peer-max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    gen = fastdecode.load(args.model, device=args.device, dtype=args.dtype)
    log(f"loaded in {time.perf_counter() - t0:.1f} s")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    res: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_name,
                 "torch": torch.__version__, "dtype": args.dtype}
    prompts = spec_bench_subset(args.per_category)
    methods = args.methods.split(",")
    t0 = time.perf_counter()
    for m in methods:  # warm-up: compile and capture what the runs need, before timing
        for q in prompts[:2]:
            gen.generate(q["turns"][0], m, max_new_tokens=args.max_new_tokens)
    res["warmup_s"] = time.perf_counter() - t0
    res["capture_s_total"] = getattr(gen.model, "capture_seconds", 0.0)
    log(f"warm-up {res['warmup_s']:.1f} s (capture+compile {res['capture_s_total']:.1f} s)")
    res["ttft"] = ttft(gen)
    log(f"ttft {res['ttft']}")
    res["methods"] = run_methods(gen, prompts, methods, args.max_new_tokens, log)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.peer_prompts and args.device == "cuda":
        del gen
        torch.cuda.empty_cache()
        try:
            peer_prompts = prompts[:: max(1, len(prompts) // args.peer_prompts)][: args.peer_prompts]
            res["transformers"] = transformers_generate(args.model, peer_prompts, args.peer_max_new_tokens)
        except Exception as e:  # noqa: BLE001 - a peer failing is a result, not a crash
            res["transformers"] = {"error": repr(e)}
        log(f"transformers {res['transformers']}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"{res['device']}, {args.dtype}, {len(prompts)} Spec-Bench prompts (first turn), {args.max_new_tokens} new tokens, greedy"]
    for m, s in res["methods"].items():
        gaps = [d["ar_top2_gap"] for d in s["divergences"]]
        step = s["per_step_us"]
        lines.append(
            f"{m:5} {s['tokens_per_s']:8.1f} tok/s  {s['ms_per_token']:.3f} ms/token  x{s['speedup_vs_ar']:.2f} vs ar "
            f"(median {s['median_prompt_ratio']:.2f})  MAT {s['mat']:.2f}  "
            f"step us draft {step['draft']:.0f} verify {step['verify']:.0f} host {step['host']:.0f}  "
            f"exact {s['exact_match']:.2f}  top2 gaps at divergence {[round(g, 3) for g in gaps if g is not None]}"
        )
    lines.append(f"TTFT {res['ttft']['prompt_tokens']} tokens: {res['ttft']['ttft_ms_median']:.2f} ms")
    if "transformers" in res:
        lines.append(f"transformers generate: {res['transformers']}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
