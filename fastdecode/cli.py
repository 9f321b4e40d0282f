"""The command line: thin. It parses arguments, calls the public API and prints.

Bad input ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def parse_opts(items: Sequence[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--opt takes key=value, got {item!r}")
        opts[key.strip()] = value.strip()
    return opts


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (the embedded default), a .gguf file or a Hugging Face folder")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    p.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16 (auto: bf16 on GPUs and on CPUs with native bf16, else fp32)")
    p.add_argument("--verbose", action="store_true", help="on a GPU: a line on stderr per captured CUDA graph")


def build_parser() -> argparse.ArgumentParser:
    from fastdecode.api import DEFAULT_METHOD

    parser = _Parser(prog="fastdecode", description="Several tokens per forward pass: speculative and parallel decoding, measured.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate an answer, streamed, with a summary line on stderr")
    _add_model_args(g)
    g.add_argument("--method", default=DEFAULT_METHOD, help=f"decoding method (default {DEFAULT_METHOD}; see `fastdecode methods`)")
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="a method option (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--sampler", default="gumbel", help="gumbel (same seed, same text for every lossless method) or rejection")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--system", default=None, help="a system prompt (default: the model's own)")
    g.add_argument("--raw", action="store_true", help="no chat template: the prompt is the text to continue")
    g.add_argument("prompt", help="the prompt, or - to read it from stdin")

    sub.add_parser("methods", help="list the decoding methods, their options and whether they are lossless")

    d = sub.add_parser("demo", help="ar side by side with a faster method on a few Spec-Bench prompts: same text, speedup")
    _add_model_args(d)
    d.add_argument("--method", default=DEFAULT_METHOD)
    d.add_argument("--max-new-tokens", type=int, default=128)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (pip install 'fastdecode[serve]')")
    _add_model_args(sv)
    sv.add_argument("--method", default=DEFAULT_METHOD, help=f"the default method of requests that name none (default {DEFAULT_METHOD})")
    sv.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="an option of the default method (repeatable)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route but /health "
                    "(default: $FASTDECODE_API_KEY if set)")
    sv.add_argument("--served-model-name", default=None, help="the model id clients send (default: the --model value)")
    sv.add_argument("--max-batch", type=int, default=64, help="requests decoded at once; more wait in a queue (default 64)")
    sv.add_argument("--max-tokens", type=int, default=256, help="answer length of requests that give no max_tokens (default 256)")
    sv.add_argument("--context", type=int, default=None, help="cap the model's context length")
    sv.add_argument("--no-batching", action="store_true", help="requests take turns with batch-1 forwards instead of "
                    "sharing batched ones (on a GPU: no pool of --max-batch caches is allocated)")

    from fastdecode.train.cli import add_train_parser

    add_train_parser(sub, _add_model_args)
    try:
        from fastdecode.bench.cli import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub, _add_model_args)
    return parser


LOSSLESS_WHERE = (
    "lossless: greedy output bit-identical to ar where forwards are row-invariant (fp32 on a CPU; bf16 on CPUs with\n"
    "AVX-512-BF16 or AMX; bf16/fp16 on CUDA GPUs); elsewhere (fp16 on a CPU, bf16 on CPUs without native bf16, fp32 on\n"
    "a GPU) identical up to numeric ties\n"
    "(fastdecode bench reports exact match and the top-2 gap at any divergence). Sampling: the target's distribution."
)


def _artifacts(kind: str) -> str:
    """A trained method's artifact: how to make one, and the ones that ship (target, held-out agreement, how trained)."""
    from fastdecode.models.draft import shipped

    parts = []
    for folder, m in shipped(kind):
        met = m.get("metrics", {})
        size = f"{m['num_heads']} heads" if m.get("num_heads") else f"{m.get('num_layers')} layer(s)"
        parts.append(f"{folder.name} ({size}, held-out agreement {met.get('heldout_agreement')}, "
                     f"{m.get('steps')} steps on {m.get('device')})")
    ships = "; ships: " + "; ".join(parts) if parts else "; none ships"
    return f"draft=PATH from `fastdecode train {kind}`{ships}"


def cmd_methods() -> int:
    from fastdecode.drafters import get_method, method_names

    for name in method_names():
        cls = get_method(name)
        label = "lossless" if cls.lossless else "lossy"
        print(f"{name:<12} [{label}] {cls.description}")
        fields = dataclasses.fields(cls.Options)
        if fields:
            opts = ", ".join(f"{f.name}={f.default}" for f in fields)
            print(f"{'':<12} options: {opts}")
        if cls.artifact:
            print(f"{'':<12} artifact: {_artifacts(cls.artifact)}")
    print(f"\n{LOSSLESS_WHERE}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import fastdecode

    prompt_text: str = sys.stdin.read() if args.prompt == "-" else args.prompt
    opts: dict[str, Any] = parse_opts(args.opt)
    # check everything that needs no model before the (slow) load
    from fastdecode.drafters import get_method, make_options
    from fastdecode.sampling import SamplingParams

    make_options(get_method(args.method), opts)
    SamplingParams(args.temperature, args.top_k, args.top_p, 0, args.sampler).validate()
    if args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not prompt_text.strip():
        raise ValueError("the prompt is empty")

    gen = fastdecode.load(args.model, device=args.device, dtype=args.dtype, verbose=args.verbose or None)
    prompt: Any = prompt_text
    if not args.raw and args.system is not None:
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt_text}]
    stream = gen.stream(
        prompt,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        raw=args.raw,
        sampler=args.sampler,
        **opts,
    )
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    res = stream.result
    assert res is not None
    s = res.stats
    print(
        f"[{res.method}] {s.new_tokens} tokens in {s.wall_s:.2f} s = {s.tokens_per_s:.1f} tokens/s, "
        f"MAT {s.mat:.2f} ({s.steps} steps), prefill {s.prefill_s * 1e3:.0f} ms, finish: {res.finish_reason}"
        + (f", CUDA-graph capture {s.capture_s:.2f} s of it" if s.capture_s >= 0.005 else ""),
        file=sys.stderr,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import fastdecode
    from fastdecode.demo import run_demo

    if args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}")
    gen = fastdecode.load(args.model, device=args.device, dtype=args.dtype, verbose=args.verbose or None)
    print(
        f"model {args.model} on {gen.device} ({str(gen.dtype).removeprefix('torch.')}), greedy, {args.max_new_tokens} new tokens, "
        f"row-invariant forwards: {'yes (bit-identical by construction)' if gen.row_invariant else 'no (identical up to numeric ties)'}"
    )
    rows = run_demo(gen, args.method, args.max_new_tokens)
    print(f"{'category':<14} {'tokens':>6} {'ar tok/s':>9} {args.method + ' tok/s':>12} {'speedup':>8} {'MAT':>5}  same text as ar")
    for r in rows:
        print(
            f"{r.category:<14} {r.new_tokens:>6} {r.ar_tokens_per_s:>9.1f} {r.method_tokens_per_s:>12.1f} "
            f"{r.speedup:>7.2f}x {r.mat:>5.2f}  {'yes' if r.identical else 'numeric tie' if r.tie else 'NO'}"
        )
    for r in rows:
        print(f"\n--- {r.category} ({args.method}) ---\n{r.text.strip()}")
    return 0 if all(r.identical or r.tie for r in rows) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError(f"fastdecode serve needs the serve extra ({e.name} is missing): pip install 'fastdecode[serve]'") from None
    import fastdecode
    from fastdecode.api import resolve_device, resolve_dtype
    from fastdecode.drafters import get_method, make_options
    from fastdecode.models.loader import resolve
    from fastdecode.serve import create_app

    # check everything that needs no model before the (slow) load
    opts = parse_opts(args.opt)
    make_options(get_method(args.method), opts)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_batch", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.context is not None and args.context < 2:
        raise ValueError(f"--context must be >= 2, got {args.context}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("FASTDECODE_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key is empty")
    resolve(args.model)
    resolve_dtype(args.dtype, resolve_device(args.device))
    name = args.served_model_name or args.model
    app = create_app(
        lambda: fastdecode.load(args.model, device=args.device, dtype=args.dtype, context=args.context, verbose=args.verbose or None),
        name, method=args.method, method_options=opts, api_key=api_key, max_batch=args.max_batch, max_tokens=args.max_tokens,
        batching=not args.no_batching,
    )
    print(f"fastdecode serve: {name} at http://{args.host}:{args.port}/v1 (default method {args.method}; "
          f"/health answers 503 until the model is loaded)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "methods":
            return cmd_methods()
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "serve":
            return cmd_serve(args)
        return int(args.run(args))
    except (UsageError, ValueError, FileNotFoundError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception held
        print(f"fastdecode: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdecode: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
