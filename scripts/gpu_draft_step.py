"""What one forward costs through the CUDA graphs: the target's and `sps`'s draft model's (the shipped one, or
--draft), width 1 and 2, each followed by reading the in-graph argmax (what a greedy step does).

    python3 scripts/gpu_draft_step.py --model /root/models/smollm2.gguf [--draft PATH] [--forwards 200]
"""

from __future__ import annotations

import argparse
import time

import torch

import fastdecode
from fastdecode.drafters.sps import draft_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--draft", default="")
    ap.add_argument("--forwards", type=int, default=200)
    args = ap.parse_args()
    gen = fastdecode.load(args.model, device="cuda", dtype="bf16")
    target = gen.model
    for name, m in (("target", target), ("draft", draft_model(target, args.draft))):
        cache = m.new_target_cache(1, 1024)
        for w in (1, 2):
            for timed in (False, True):  # a warm-up pass captures the graphs
                cache.truncate(0)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                n = args.forwards if timed else 20
                for i in range(n):
                    m(torch.tensor([[5] * w]), torch.tensor([list(range(i * w, i * w + w))]), cache)
                    m.greedy_tokens(w)
                torch.cuda.synchronize()
            print(f"{name} width {w}: {(time.perf_counter() - t0) / n * 1e6:.0f} us per forward + argmax read")


if __name__ == "__main__":
    main()
