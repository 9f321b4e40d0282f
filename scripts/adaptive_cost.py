"""The adaptive controller's own Python cost per step: `LengthController.limit` and `observe` for a
`--depth`-deep, `--width`-wide controller, fed a fixed tree proposal (width nodes under the root, then width
per level) whose first two levels are accepted, for `--steps` steps.

    python scripts/adaptive_cost.py --depth 6 --width 8 --steps 500
"""

from __future__ import annotations

import argparse
import time

from fastdecode.drafters.adaptive import LengthController
from fastdecode.drafters.base import DraftContext, Proposal, StepResult
from fastdecode.verify import Verdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--steps", type=int, default=500)
    args = p.parse_args()
    d, w = args.depth, args.width
    controller = LengthController(d, w)
    ctx = DraftContext(tokens=[1] * 100, prompt_len=10, max_depth=200, max_nodes=200, params=None, vocab_size=10, target=None)
    parents = [-1] * w + [i // w for i in range(w * (d - 1))]  # level 1: w children of the root; then w per level
    proposal = Proposal(list(range(len(parents))), parents, None, draft_forwards=d)
    verdict = Verdict(path=[0, w], tokens=[1, 2], bonus=3)
    t_limit = t_observe = 0.0
    for _ in range(args.steps):
        a = time.perf_counter()
        controller.limit(ctx)  # type: ignore[arg-type]
        b = time.perf_counter()
        controller.observe(StepResult(proposal, verdict, None, 0.002, None, 0.001))
        t_limit += b - a
        t_observe += time.perf_counter() - b
    print(f"limit {t_limit / args.steps * 1e6:.1f} us, observe {t_observe / args.steps * 1e6:.1f} us a step")


if __name__ == "__main__":
    main()
