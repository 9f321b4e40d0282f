"""Where a method's decode step spends its time: the engine's own split (draft / verify / host per step)
and a cProfile of one generation, sorted by internal time.

    python scripts/profile_step.py --methods ar,sps,eagle --device cuda --model /root/models/smollm2.gguf \
        --opt eagle.draft=/root/work/eagle --out prof/

`--methods` and `--opt` read as `fastdecode bench` reads them (`ar` always comes first). Each method first
answers the prompt once unprofiled (graph capture, compilation and loading stay out of the profile), then
once under cProfile. Prints a line per method; with --out, writes
`profile-METHOD.txt` (the split, then the top --top functions) there.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import re
import sys
from pathlib import Path

from fastdecode import api
from fastdecode.bench.cli import method_specs

PROMPT = "Explain how a hash map works, then give a short Python example that counts words in a sentence."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="ar,pld,sps")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--opt", action="append", default=[], help="METHOD.KEY=VALUE (repeatable), as for fastdecode bench")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    try:
        specs = method_specs(args.methods, args.opt)  # the bench's parsing: entries, [key=value] variants, --opt
        for spec in specs:
            spec.check()
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    gen = api.load(args.model, device=args.device, dtype=args.dtype)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        options = dict(spec.options)
        # one entry of a method is named by it (profile-eagle.txt); variants of one method by their options
        variants = sum(x.name == spec.name for x in specs) > 1
        stem = re.sub(r"[^\w.=,-]+", "_", spec.label) if variants else spec.name
        gen.generate(PROMPT, method=spec.name, max_new_tokens=args.max_new_tokens, **options)  # warm: capture, load
        prof = cProfile.Profile()
        prof.enable()
        g = gen.generate(PROMPT, method=spec.name, max_new_tokens=args.max_new_tokens, **options)
        prof.disable()
        s = g.stats
        steps = max(s.steps, 1)
        line = (f"{spec.label}: {s.new_tokens} tokens in {s.steps} steps (MAT {s.mat:.2f}), under cProfile "
                f"{s.wall_s * 1e3:.1f} ms; per step: draft {s.draft_s / steps * 1e3:.3f} ms "
                f"({s.draft_forwards / steps:.2f} draft forwards), verify {s.verify_s / steps * 1e3:.3f} ms, "
                f"host {s.host_s / steps * 1e3:.3f} ms")
        print(line, flush=True)
        if out:
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
            (out / f"profile-{stem}.txt").write_text(line + "\n" + buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
