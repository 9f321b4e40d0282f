"""`fastdecode bench`: the command line of the benchmark. Thin: parse, check, load, run, report.

Everything that needs no model is checked before the (slow) load: methods and their options, peers, the
workload, the output folder. Bad input raises ValueError / FileNotFoundError, which fastdecode.cli turns
into one line and exit status 2. Exit status 1 means a lossless method failed the exact-match check.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastdecode.bench.runner import RESULTS, TOP_K, BenchSettings, MethodSpec, with_reference
from fastdecode.bench.workloads import WORKLOADS, default_per_category, load_workload
from fastdecode.sampling import SAMPLERS

DEFAULT_METHODS = "ar,pld"
DEFAULT_OUT = "bench-out"


def add_bench_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    b = sub.add_parser("bench", help="measure methods (and peer tools) on a workload: speed, acceptance and exactness")
    add_model_args(b)
    b.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated methods (default {DEFAULT_METHODS}), each with optional own options, e.g. pld[num_draft=4]; ar runs first",
    )
    b.add_argument("--opt", action="append", default=[], metavar="METHOD.KEY=VALUE", help="a method option, e.g. pld.num_draft=5")
    b.add_argument("--workload", default="spec-bench", help=f"{', '.join(WORKLOADS)} or a .jsonl file with 'turns' (default spec-bench)")
    b.add_argument("--categories", default="", help="comma-separated categories (or groups) to run (default: all)")
    b.add_argument("--per-category", type=int, default=None, help="the first N prompts of each category (default: all; sharegpt: 80)")
    b.add_argument("--max-new-tokens", type=int, default=256, help="per turn (default 256)")
    b.add_argument("--max-turns", type=int, default=None, help="answer only the first N turns of each prompt (default: all)")
    b.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); exactness is judged on greedy runs")
    b.add_argument("--seed", type=int, default=0, help="sampling runs and the ShareGPT sample derive from it")
    b.add_argument("--sampler", default="gumbel", choices=SAMPLERS,
                   help="sampling runs: gumbel (the seed's noise: the same text as ar) or rejection (speculative sampling: "
                        "the same distribution as ar, other draws); needs --temperature > 0")
    b.add_argument("--peers", default="", help="comma-separated peer tools: transformers, llamacpp (pip install fastdecode[peers])")
    b.add_argument("--peer-per-category", type=int, default=None, help="peers run on the first N prompts of each category only")
    b.add_argument("--assistant", default=None,
                   help="a draft for transformers assisted generation: a small model (GGUF or HF folder) or a `train draft` artifact")
    b.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads (default: torch's own choice)")
    b.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per method before timing (default 1)")
    b.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    b.add_argument("--resume", action="store_true", help="continue an interrupted results.jsonl in --out; runs nothing twice")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument(
        "--report-only",
        metavar="DIR",
        default=None,
        help="run nothing: summarize DIR/results.jsonl again (filtered by --categories and --per-category) into --out",
    )
    e = b.add_argument_group("a running server (--endpoint): load it with concurrent streams instead of loading a model")
    e.add_argument("--endpoint", default=None, metavar="URL", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    e.add_argument("--concurrency", type=int, default=8, help="concurrent streams (default 8)")
    e.add_argument("--duration", type=float, default=None, help="seconds to keep issuing requests, cycling prompts (default: each once)")
    e.add_argument("--endpoint-model", default=None, help="the model id to send (default: the first of /v1/models)")
    e.add_argument("--endpoint-method", default=None, help="a `method` field for fastdecode serve (default: none sent)")
    e.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    e.add_argument("--reference", default=None, metavar="ANSWERS_JSONL", help="count answers equal to this earlier run's")
    e.add_argument("--max-prompt-chars", type=int, default=2000, help="leave out longer prompts (default 2000)")
    b.set_defaults(run=run_bench_command)


def endpoint_prompts(args: argparse.Namespace) -> list[Any]:
    """The workload's first turns for --endpoint: chat prompts no longer than --max-prompt-chars."""
    workload = load_workload(args.workload, args.seed)
    if args.categories:
        workload = workload.only(split_list(args.categories))
    workload, _ = workload.select(default_per_category(args.workload, args.per_category),
                                  lambda p: not p.raw and len(p.turns[0]) <= args.max_prompt_chars)
    if not workload.prompts:
        raise ValueError(f"no chat prompt of {args.workload} has at most {args.max_prompt_chars} characters")
    return list(workload.prompts)


def split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def split_methods(text: str) -> list[str]:
    """Split `--methods` on the commas outside brackets: "ar,pld[num_draft=4,adaptive=true]" -> 2 entries."""
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"--methods {text!r}: a ']' without its '['")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"--methods {text!r}: a '[' without its ']'")
    return [x.strip() for x in [*items, cur] if x.strip()]


def _key_value(item: str, where: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{where} takes key=value, got {item!r}")
    return key.strip(), value.strip()


def method_specs(methods: str, opts: list[str]) -> tuple[MethodSpec, ...]:
    """`--methods ar,pld,pld[adaptive=true] --opt pld.max_ngram=2` -> (ar, pld(max_ngram=2), pld(adaptive=true,max_ngram=2)).

    Options in brackets belong to that entry, so one method can run in several variants in the same run
    (e.g. fixed against adaptive draft length); `--opt method.key=value` applies to every entry of that
    method unless the entry sets the key itself. Options of unlisted methods are refused.
    """
    entries: list[tuple[str, dict[str, str]]] = []
    for item in split_methods(methods):
        name, bracket, rest = item.partition("[")
        own: dict[str, str] = {}
        if bracket:
            if not rest.endswith("]"):
                raise ValueError(f"--methods entry {item!r}: write method[key=value,...]")
            for kv in rest[:-1].replace(";", ",").split(","):
                if kv.strip():
                    k, v = _key_value(kv, f"--methods entry {item!r}")
                    own[k] = v
        entries.append((name.strip(), own))
    if not entries:
        raise ValueError("--methods is empty")
    shared: dict[str, dict[str, str]] = {n: {} for n, _ in entries}
    for item in opts:
        key, value = _key_value(item, "--opt")
        method, dot, name = key.partition(".")
        if not dot or not method or not name:
            raise ValueError(f"--opt takes method.key=value, got {item!r}")
        if method not in shared:
            raise ValueError(f"--opt {item!r}: method {method!r} is not in --methods")
        shared[method][name] = value
    return with_reference([MethodSpec(n, tuple(sorted({**shared[n], **own}.items()))) for n, own in entries])


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, from the parsed arguments."""
    parts = ["fastdecode", "bench", "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--methods", args.methods]
    parts += [x for o in args.opt for x in ("--opt", o)]
    parts += ["--workload", args.workload, "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature)]
    optional = {"--categories": args.categories or None, "--per-category": args.per_category, "--peers": args.peers or None,
                "--peer-per-category": args.peer_per_category, "--assistant": args.assistant, "--threads": args.threads,
                "--max-turns": args.max_turns}
    parts += [x for k, v in optional.items() if v is not None for x in (k, str(v))]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.sampler != "gumbel":
        parts += ["--sampler", args.sampler]
    parts += ["--warmup", str(args.warmup), "--out", args.out]
    return shlex.join(parts)


def select_rows(rows: list[dict[str, Any]], categories: list[str], per_category: int | None) -> list[dict[str, Any]]:
    """Rows of the listed categories (or groups), and of the first `per_category` prompts of each category
    in the order the run met them. Example: per_category=2 keeps every method's rows of 2 prompts a category."""
    if per_category is not None and per_category < 1:
        raise ValueError(f"--per-category must be >= 1, got {per_category}")
    wanted = set(categories)
    kept: dict[str, list[str]] = {}
    out = []
    for r in rows:
        if wanted and r.get("category") not in wanted and r.get("group") not in wanted:
            continue
        ids = kept.setdefault(r.get("category", ""), [])
        if r["prompt_id"] not in ids:
            if per_category is not None and len(ids) >= per_category:
                continue
            ids.append(r["prompt_id"])
        out.append(r)
    return out


def write_report(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any], wrote: str) -> int:
    """Summarize bench rows, write summary.json, report.md and the plots to `out`, print the table; -> exit code
    (1 when a lossless method diverged from `ar` beyond a numeric tie)."""
    from fastdecode.bench.metrics import failing_methods, summarize
    from fastdecode.bench.plots import write_plots
    from fastdecode.bench.report import print_table, write_outputs

    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    plots = write_plots(summary, out, f"{meta['setup'].get('model')}, {meta['setup'].get('workload')}, {meta['provenance'].get('dtype')}")
    write_outputs(out, summary, meta, plots)
    print_table(summary)
    print(f"bench: wrote {wrote}{out / 'summary.json'}, {out / 'report.md'} and {len(plots)} plots", file=sys.stderr)
    fails = failing_methods(summary)
    if fails:
        print(f"bench: FAIL: lossless method(s) diverged from ar beyond a numeric tie: {', '.join(fails)}", file=sys.stderr)
        return 1
    return 0


def report_only(args: argparse.Namespace) -> int:
    """`--report-only DIR`: the summary, report and plots of DIR/results.jsonl again, without a model."""
    import json

    from fastdecode.bench.report import now
    from fastdecode.bench.runner import REFERENCE

    src = Path(args.report_only)
    if not (src / RESULTS).is_file():
        raise FileNotFoundError(f"--report-only: {src / RESULTS} not found")
    complete = (src / RESULTS).read_text(encoding="utf-8").rpartition("\n")[0]  # read only: a run may still be writing
    try:
        every = [json.loads(line) for line in complete.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"--report-only: {src / RESULTS} is not JSON lines ({e})") from None
    if not all(isinstance(r, dict) and {"prompt_id", "method", "category"} <= r.keys() for r in every):
        raise ValueError(f"--report-only: {src / RESULTS} holds lines that are not fastdecode bench rows")
    rows = select_rows(every, split_list(args.categories), args.per_category)
    if not any(r["method"] == REFERENCE for r in rows):
        raise ValueError(f"--report-only: no `ar` rows in {src / RESULTS} for these categories")
    meta: dict[str, Any] = {}
    if (src / "summary.json").is_file():
        meta = json.loads((src / "summary.json").read_text(encoding="utf-8")).get("meta", {})
    first = rows[0]
    meta = {
        "provenance": first.get("provenance", {}),
        "setup": first.get("setup", {}),
        "command": meta.get("command", "(unknown)"),
        **({"warmup": meta["warmup"]} if meta.get("warmup") is not None else {}),
        "date": meta.get("date", now()),
        "prompts": len({r["prompt_id"] for r in rows}),
        "report_command": shlex.join(["fastdecode", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None,
    }
    print(f"bench: re-summarizing {src / RESULTS}", file=sys.stderr)
    return write_report(rows, Path(args.out), meta, "")


def run_bench_command(args: argparse.Namespace) -> int:
    if args.report_only is not None:
        return report_only(args)
    if args.endpoint is not None:
        from fastdecode.bench.endpoint import run_endpoint_command

        return run_endpoint_command(args, endpoint_prompts(args))
    import torch

    import fastdecode
    from fastdecode.bench.peers import PeerSetup, check_peer_names, make_peers
    from fastdecode.bench.provenance import provenance
    from fastdecode.bench.report import now
    from fastdecode.bench.runner import run_bench

    # 1. everything that needs no model
    settings = BenchSettings(
        method_specs(args.methods, args.opt), args.max_new_tokens, args.temperature, args.warmup, args.seed, args.peer_per_category,
        args.sampler,
    ).validate()
    peer_names = split_list(args.peers)
    check_peer_names(peer_names)
    per_category = default_per_category(args.workload, args.per_category)
    workload = load_workload(args.workload, args.seed)
    if args.categories:
        workload = workload.only(split_list(args.categories))
    if args.max_turns is not None:
        workload = workload.first_turns(args.max_turns)
    out = Path(args.out)
    if (out / RESULTS).exists() and not args.resume:
        raise ValueError(f"{out / RESULTS} exists: pass --resume to continue it, or choose another --out")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    # 2. the model, and the prompts that fit its context
    gen = fastdecode.load(args.model, device=args.device, dtype=args.dtype, verbose=args.verbose or None)
    context = gen.engine.context_length
    workload, skipped = workload.select(
        per_category, lambda p: len(gen.prompt_ids(p.turns[0], raw=p.raw)) + settings.max_new_tokens <= context
    )
    if skipped:
        print(f"bench: {skipped} prompt(s) longer than the context ({context} tokens) skipped", file=sys.stderr)
    if not workload.prompts:
        raise ValueError("no prompt of the workload fits the model's context")

    record = {
        "provenance": provenance(gen.device, gen.dtype, gen.row_invariant),
        "setup": {"model": args.model, "workload": args.workload, "max_new_tokens": settings.max_new_tokens,
                  "temperature": settings.temperature, "seed": settings.seed, "top_logits": TOP_K,
                  "max_turns": args.max_turns} | ({"sampler": settings.sampler} if settings.sampler != "gumbel" else {}),
    }
    notice = lambda msg: print(f"bench: {msg}", file=sys.stderr)  # noqa: E731
    peers = []
    if peer_names and gen.source is not None:
        setup = PeerSetup(gen.source, gen.dtype, gen.device, torch.get_num_threads(), gen.tokenizer.eos_ids, context,
                          Path(args.assistant) if args.assistant else None)
        peers = make_peers(peer_names, setup, notice)

    # 3. run, summarize, report
    rows = run_bench(gen, workload, settings, out, record, peers, resume=args.resume, progress=not args.no_progress)
    meta = {**record, "command": command_line(args), "date": now(), "prompts": len({r["prompt_id"] for r in rows}), "warmup": args.warmup}
    return write_report(rows, out, meta, f"{out / RESULTS}, ")
