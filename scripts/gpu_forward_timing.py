"""Time the target's forward on the GPU: eager model vs the CUDA-graph runner, per width, plus prefill.

Timing does not depend on the weights, so without a GGUF this builds SmolLM2-135M's shape with random
weights. Prints a table last and writes JSON to --out.

    python scripts/gpu_forward_timing.py --out results/forward.json [--model /root/models/smollm2.gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from fastdecode.cuda_graphs import GraphRunner
from fastdecode.models.llama import LlamaModel, ModelConfig

SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                      head_dim=64, rope_theta=100000.0, rms_eps=1e-5, max_position=8192, tie_embeddings=True)


def random_model(dtype: torch.dtype) -> LlamaModel:
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaModel(SMOLLM2)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return m.to(dtype).eval()


def events_ms(fn, n: int = 100) -> float:
    """Median device time of fn() over n runs, by CUDA events."""
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def wall_ms(fn, n: int = 100) -> float:
    """Median host wall time of fn() + synchronize over n runs."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kernel_profile(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.count, e.device_time_total) for e in prof.key_averages()]
    rows = [r for r in rows if r[2] > 0]
    rows.sort(key=lambda r: -r[2])
    return {"kernels": sum(r[1] for r in rows), "kernel_us": round(sum(r[2] for r in rows), 1),
            "top": [(k[:90], c, round(t, 1)) for k, c, t in rows[:25]]}


def time_variant(model: LlamaModel, ids: torch.Tensor, variant: str, with_engine: bool, res: dict, lines: list[str]) -> None:
    """One runner configuration: prefill, every decode width (graph replay and the whole call), kernels, the engine."""
    kernels, share, block, *tuning = variant.split(":")
    tag = variant
    os.environ.update(FASTDECODE_ATTN_SHARE=share, FASTDECODE_ATTN_BLOCK=block)
    os.environ["FASTDECODE_TUNING"] = "" if not tuning or tuning[0] == "default" else tuning[0]
    t0 = time.perf_counter()
    runner = GraphRunner(model, kernels=kernels)
    rc = runner.new_target_cache(1, 8192)

    def prefill() -> None:  # 999 tokens: width 1024
        rc.length = 0
        runner(ids.cpu(), torch.arange(999)[None], rc, hidden_only=True)

    prefill()
    first = res[f"{tag}_first_prefill_s"] = time.perf_counter() - t0
    res[f"{tag}_prefill999_wall_ms"] = wall_ms(prefill, 20)
    lines.append(f"runner {tag} prefill 999 wall {res[f'{tag}_prefill999_wall_ms']:.2f} ms (first call with compile+capture {first:.1f} s)")

    def step(tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> None:
        rc.length = 999
        runner(tok, pos, rc, mask)

    for T in (1, 2, 4, 8, 16, 32, 64):
        tok, pos = ids[0, :T].cpu()[None], torch.arange(999, 999 + T)[None]
        t1 = time.perf_counter()
        step(tok, pos, None)
        cap = time.perf_counter() - t1
        g = runner.graphs[runner.last_key]
        replay = res[f"{tag}_T{T}_replay_ms"] = events_ms(g.graph.replay, 200)
        call = res[f"{tag}_T{T}_call_wall_ms"] = wall_ms(lambda: step(tok, pos, None), 200)  # noqa: B023 - called at once
        if T in (1, 16):  # kernels of this forward, run eagerly over the inputs just uploaded
            Tb, Sb = runner.last_key[0], runner.last_key[1]
            p = res[f"{tag}_profile_T{T}"] = kernel_profile(lambda: runner._static_forward(Tb, Sb, True, True))  # noqa: B023
            res[f"{tag}_tuning"] = runner.tuning
            lines.append(f"runner {tag} T={T}: {p['kernels']} kernels, {p['kernel_us']:.0f} us of kernel time")
        lines.append(f"runner {tag} T={T:<3} replay {replay:.3f} ms  call+sync {call:.3f} ms  capture {cap:.2f} s")
        if T == 16:
            tree = torch.ones(1, T, T, dtype=torch.bool).tril()
            step(tok, pos, tree)
            t = res[f"{tag}_T16tree_call_wall_ms"] = wall_ms(lambda: step(tok, pos, tree), 200)  # noqa: B023
            lines.append(f"runner {tag} T=16 tree call+sync {t:.3f} ms")
    res[f"{tag}_capture_s"] = runner.capture_seconds
    if not with_engine:
        return
    # the whole decode loop: AR and a chain drafter, 256 new tokens after a 999-token prompt
    from fastdecode.drafters import make_drafter
    from fastdecode.engine import Engine, GenerationStats, StopConditions
    from fastdecode.sampling import SamplingParams

    prompt = ids[0].tolist() + [5]
    # layerskip with a fixed half of the layers: its partial forwards replay graphs of their own
    for method, opts in (("ar", {}), ("pld", {}), ("layerskip", {"layers": tuple(range(0, 30, 2))})):
        for _ in range(2):  # the first run captures what it needs
            st = GenerationStats()
            for _ in Engine(runner).generate(prompt, make_drafter(method, **opts), SamplingParams(), StopConditions(256), st):
                pass
        n = len(st.trace)
        e = res[f"{tag}_engine_{method}"] = {
            "ms_per_token": 1e3 * st.wall_s / st.new_tokens, "prefill_ms": 1e3 * st.prefill_s, "steps": st.steps,
            "draft_us": 1e6 * st.draft_s / n, "verify_us": 1e6 * st.verify_s / n, "host_us": 1e6 * st.host_s / n, "capture_s": st.capture_s,
        }
        lines.append(f"engine {tag} {method:4} {e['ms_per_token']:.3f} ms/token, prefill {e['prefill_ms']:.1f} ms, per step: "
                     f"draft {e['draft_us']:.0f} us verify {e['verify_us']:.0f} us host {e['host_us']:.0f} us ({st.steps} steps)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="a GGUF (default: random weights of SmolLM2-135M's shape)")
    ap.add_argument("--variants", default="triton:128:32,triton:256:64,torch:128:32",
                    help="runner variants: kernels:attention-share:attention-block-s[:tuning] (kernels: triton = fused "
                         "decode kernels, torch = compiled torch; tuning: default, or a JSON file for FASTDECODE_TUNING)")
    args = ap.parse_args()
    if args.model:
        from fastdecode.models.loader import build_model, load_weights, resolve

        cfg, state = load_weights(resolve(args.model))
        model = build_model(cfg, state, torch.bfloat16, "cuda")
    else:
        model = random_model(torch.bfloat16)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    gen = torch.Generator().manual_seed(1)
    lines = []
    with torch.no_grad():
        # the eager model, for reference
        cache = model.new_cache(1, 2048)
        ids = torch.randint(0, 49152, (1, 999), generator=gen).cuda()
        model(ids, torch.arange(999, device="cuda")[None], cache)
        for T in (1, 16):
            def eager(T=T):
                cache.length = 999
                model(ids[:, :T], torch.arange(999, 999 + T, device="cuda")[None], cache)
            eager()
            res[f"eager_T{T}_wall_ms"] = wall_ms(eager, 20)
            lines.append(f"eager model   T={T:<4} wall {res[f'eager_T{T}_wall_ms']:.2f} ms")

        def eager_prefill():
            cache.length = 0
            model(ids, torch.arange(999, device="cuda")[None], cache, hidden_only=True)
        eager_prefill()
        res["eager_prefill999_wall_ms"] = wall_ms(eager_prefill, 10)
        lines.append(f"eager model   prefill 999 wall {res['eager_prefill999_wall_ms']:.2f} ms")

        for vi, variant in enumerate(args.variants.split(",")):
            time_variant(model, ids, variant, vi == 0, res, lines)
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("\n".join(lines), file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
