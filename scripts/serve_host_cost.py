"""What a batched round of `fastdecode serve` costs the host, apart from the forward: the scheduler runs N
requests at once on a random 2-layer model of SmolLM2's shapes (so the forward is cheap and what remains is
the per-sequence Python: fiber switches, drafting, verifying, compacting, detokenizing, emitting), times each
round's two halves (every sequence's advance; the batched forwards), and profiles the fibers' threads.

    python scripts/serve_host_cost.py --streams 64 --method pld --rounds 200 [--device cuda] [--top 25]

Prints µs per sequence-step of host work and the top functions by internal time across the fibers.
On a GPU (--device cuda) the target is a CUDA-graph runner with the fused kernels, as `serve` runs it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Any

import torch

from fastdecode.api import Generator
from fastdecode.drafters import get_method, make_options
from fastdecode.models.llama import LlamaModel, ModelConfig
from fastdecode.models.loader import resolve
from fastdecode.sampling import SamplingParams
from fastdecode.serve import batching, scheduler
from fastdecode.serve.metrics import ServerMetrics
from fastdecode.serve.protocol import RequestSpec
from fastdecode.serve.scheduler import Job, Scheduler, wait_ready
from fastdecode.tokenizer import Tokenizer


def tiny_target(device: str) -> Any:
    """SmolLM2-135M's shapes and vocabulary, 2 layers instead of 30, random weights."""
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9, num_kv_heads=3,
                      head_dim=64, max_position=2048, tie_embeddings=True)
    torch.manual_seed(0)
    m = LlamaModel(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    m = m.to(device, torch.bfloat16).eval()
    if device == "cuda":
        from fastdecode.cuda_graphs import GraphRunner

        return GraphRunner(m, kernels="triton", verbose=False)
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--method", default="pld")
    p.add_argument("--rounds", type=int, default=200, help="rounds timed (after 20 warm-up rounds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2", help="where the tokenizer comes from")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    tok = Tokenizer(resolve(args.model))
    target = tiny_target(args.device)
    gen = Generator(target, tok)
    sched = Scheduler(lambda: gen, ServerMetrics(), max_batch=args.streams)
    advance_s: list[float] = []
    forward_s: list[float] = []
    seqs: list[int] = []
    # the scheduler's own round, timed by wrapping its two halves: every sequence's advance, the batched forwards
    real_round, real_advance, real_forward = sched._round, sched._advance, scheduler.forward_rows
    now = {"advance": 0.0, "forward": 0.0, "seqs": 0}

    def timed_advance(seq: Any) -> None:
        t0 = time.perf_counter()
        real_advance(seq)
        now["advance"] += time.perf_counter() - t0

    def timed_forward(model: Any, group: list[batching.Rows], keep: bool = False) -> None:
        t0 = time.perf_counter()
        real_forward(model, group, keep)
        if args.device == "cuda":
            torch.cuda.synchronize()
        now["forward"] += time.perf_counter() - t0
        now["seqs"] += len(group)

    def timed_round() -> None:
        now.update(advance=0.0, forward=0.0, seqs=0)
        real_round()
        advance_s.append(now["advance"])
        forward_s.append(now["forward"])
        seqs.append(int(now["seqs"]))

    sched._advance = timed_advance  # type: ignore[method-assign]
    scheduler.forward_rows = timed_forward  # type: ignore[assignment]
    sched._round = timed_round  # type: ignore[method-assign]
    profiles: list[cProfile.Profile] = []
    orig_main = batching.Fiber._main

    def profiled_main(fiber: batching.Fiber) -> None:
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()
        try:
            orig_main(fiber)
        finally:
            prof.disable()

    batching.Fiber._main = profiled_main  # type: ignore[method-assign]
    sched.start()
    if not wait_ready(sched, 120) or not sched.batching:
        sched.stop()
        raise SystemExit("serve_host_cost: the scheduler does not batch here (it batches through the fused kernels on a "
                         "CUDA GPU, or in bf16 on a CPU with AVX-512-BF16/AMX)")
    prompt = [int(x) for x in torch.randint(0, 49152, (200,), generator=torch.Generator().manual_seed(1))]
    n_tokens = args.rounds + 40

    spec = RequestSpec("completion", prompt, args.method, make_options(get_method(args.method), {}), SamplingParams(), n_tokens)
    for _ in range(args.streams):
        sched.submit(Job(spec, lambda ev: None))
    while len(advance_s) < args.rounds + 20 and sched.running + sched._queue.qsize() > 0:
        time.sleep(0.05)
    sched.stop()
    adv = advance_s[20 : args.rounds + 20]
    fwd = forward_s[20 : args.rounds + 20]
    n = seqs[20 : args.rounds + 20]
    steps = sum(n)
    print(f"{args.method}, {args.streams} streams, {len(adv)} rounds, {steps / max(len(n), 1):.1f} sequences a round, {args.device}")
    print(f"host (advance every sequence): {1e6 * sum(adv) / max(steps, 1):.1f} µs per sequence-step; "
          f"forward: {1e3 * sum(fwd) / max(len(fwd), 1):.2f} ms per round")
    stats = pstats.Stats(profiles[0]) if profiles else None
    if stats is not None:
        for prof in profiles[1:]:
            stats.add(prof)
        buf = io.StringIO()
        stats.stream = buf  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(args.top)
        print(buf.getvalue())


if __name__ == "__main__":
    main()
