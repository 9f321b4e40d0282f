"""`fastdecode bench --endpoint URL`: a load generator for any OpenAI-compatible server (ours, vLLM, SGLang …)
on the bench's workloads.

N client threads stream chat completions (the first user turn of each prompt, in workload order, cycling when
`--duration` asks for more) and time every SSE chunk. Reported: output tokens/s over the whole run (tokens
from the server's usage, wall time from the first request to the last answer), time to first token, time per
output token (a request's decode time over its tokens after the first) and inter-chunk latency, each as
p50/p99; errors (HTTP errors, broken streams, a finish reason not sent exactly once, no `[DONE]`); and,
given `--reference` (the answers.jsonl of an earlier run, e.g. batch-1 `ar` with `--concurrency 1`), how
many answers are token-for-token the reference's text.

It never loads a model; it only talks HTTP.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastdecode.bench.workloads import BenchPrompt

ANSWERS = "answers.jsonl"
SUMMARY = "endpoint.json"


@dataclass
class Answer:
    prompt_id: str
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str = ""
    start_s: float = 0.0  # since the run began
    ttft_s: float = 0.0
    end_s: float = 0.0
    chunk_gaps_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: the decode time over the tokens that came after it."""
        if self.completion_tokens < 2:
            return None
        return (self.end_s - self.start_s - self.ttft_s) / (self.completion_tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def first_model(client: Any) -> str:
    r = client.get("/v1/models")
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise ValueError("the endpoint lists no model at /v1/models: pass --model")
    return str(data[0]["id"])


def stream_one(client: Any, body: dict[str, Any], prompt_id: str, t0: float) -> Answer:
    """One streamed chat completion, timed chunk by chunk."""
    ans = Answer(prompt_id, start_s=time.perf_counter() - t0)
    finishes, done, last = 0, False, None
    texts: list[str] = []
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                ans.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return ans
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter() - t0
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    ans.error = str(event["error"].get("message", event["error"]))
                    break
                if event.get("usage"):
                    ans.completion_tokens = int(event["usage"]["completion_tokens"])
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        if last is None:
                            ans.ttft_s = now - ans.start_s
                        else:
                            ans.chunk_gaps_s.append(now - last)
                        last = now
                        texts.append(piece)
                    if choice.get("finish_reason"):
                        finishes += 1
                        ans.finish_reason = choice["finish_reason"]
    except Exception as e:  # noqa: BLE001  (a failed request is counted, not fatal)
        ans.error = f"{type(e).__name__}: {e}"
    ans.end_s = time.perf_counter() - t0
    ans.text = "".join(texts)
    if not ans.error and (not done or finishes != 1):
        ans.error = f"broken stream: [DONE] {'seen' if done else 'missing'}, finish_reason sent {finishes} times"
    return ans


def run_endpoint(
    url: str, prompts: list[BenchPrompt], *, concurrency: int, duration: float | None, max_tokens: int, temperature: float,
    seed: int, model: str | None, method: str | None, api_key: str | None, timeout: float = 600.0,
) -> tuple[list[Answer], float, str]:
    """Run the load: `concurrency` threads; each prompt once, or cycling until `duration` seconds have passed
    (requests started before then finish). Returns the answers, the wall time and the model id."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as probe:
        model = model or first_model(probe)
    lock = threading.Lock()
    answers: list[Answer] = []
    issued = 0
    t0 = time.perf_counter()

    def take() -> BenchPrompt | None:
        nonlocal issued
        with lock:
            over = issued >= len(prompts) if duration is None else time.perf_counter() - t0 >= duration
            if over:
                return None
            issued += 1
            return prompts[(issued - 1) % len(prompts)]

    def worker() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, limits=limits) as client:
            while (p := take()) is not None:
                body: dict[str, Any] = {
                    "model": model, "messages": [{"role": "user", "content": p.turns[0]}], "max_tokens": max_tokens,
                    "temperature": temperature, "seed": seed, "stream": True, "stream_options": {"include_usage": True},
                }
                if method is not None:
                    body["method"] = method
                ans = stream_one(client, body, p.id, t0)
                with lock:
                    answers.append(ans)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, time.perf_counter() - t0, model


def summarize(answers: list[Answer], wall_s: float, reference: dict[str, str] | None) -> dict[str, Any]:
    ok = [a for a in answers if not a.error]
    tokens = sum(a.completion_tokens for a in ok)
    ms = lambda v: None if v is None else round(v * 1e3, 2)  # noqa: E731
    tpot = [t for a in ok if (t := a.tpot_s) is not None]
    gaps = [g for a in ok for g in a.chunk_gaps_s]
    ttft = [a.ttft_s for a in ok]
    out: dict[str, Any] = {
        "requests": len(answers), "errors": len(answers) - len(ok), "completion_tokens": tokens, "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
        "tpot_ms_p50": ms(percentile(tpot, 50)), "tpot_ms_p99": ms(percentile(tpot, 99)),
        "itl_ms_p50": ms(percentile(gaps, 50)), "itl_ms_p99": ms(percentile(gaps, 99)),
    }
    if reference is not None:
        compared = [a for a in ok if a.prompt_id in reference]
        out["exact_match"] = sum(a.text == reference[a.prompt_id] for a in compared)
        out["compared"] = len(compared)
    first_errors = list(dict.fromkeys(a.error for a in answers if a.error))[:3]
    if first_errors:
        out["first_errors"] = first_errors
    return out


def load_reference(path: Path) -> dict[str, str]:
    """prompt id -> text, from the answers.jsonl of an earlier run (answers with an error are left out)."""
    if not path.is_file():
        raise FileNotFoundError(f"--reference {path} does not exist")
    ref: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not row.get("error"):
                ref.setdefault(str(row["prompt_id"]), str(row["text"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"--reference {path}, line {lineno}: not an answers.jsonl row") from None
    return ref


def run_endpoint_command(args: Any, prompts: list[BenchPrompt]) -> int:
    """The `--endpoint` branch of `fastdecode bench` (the arguments are checked by the caller)."""
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise ValueError("fastdecode bench --endpoint needs httpx: pip install httpx") from None
    for name in ("concurrency", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.duration is not None and args.duration <= 0:
        raise ValueError(f"--duration must be > 0, got {args.duration}")
    if not args.endpoint.startswith(("http://", "https://")):
        raise ValueError(f"--endpoint must be an http(s) URL, got {args.endpoint!r}")
    reference = load_reference(Path(args.reference)) if args.reference else None
    out = Path(args.out)
    if (out / ANSWERS).exists():
        raise ValueError(f"{out / ANSWERS} exists: choose another --out")
    answers, wall, model = run_endpoint(
        args.endpoint, prompts, concurrency=args.concurrency, duration=args.duration, max_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed, model=args.endpoint_model, method=args.endpoint_method,
        api_key=args.api_key,
    )
    summary = {"endpoint": args.endpoint, "model": model, "method": args.endpoint_method, "concurrency": args.concurrency,
               "duration_s": args.duration, "workload": args.workload, "max_new_tokens": args.max_new_tokens,
               "temperature": args.temperature, **summarize(answers, wall, reference)}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ANSWERS, "w", encoding="utf-8") as f:
        for a in sorted(answers, key=lambda a: a.start_s):
            row = {k: v for k, v in asdict(a).items() if k != "chunk_gaps_s"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    s = summary
    line = (f"{s['requests']} requests, {s['errors']} errors, {s['completion_tokens']} tokens in {s['wall_s']:.1f} s = "
            f"{s['tokens_per_s']:.1f} tokens/s; TTFT p50/p99 {s['ttft_ms_p50']}/{s['ttft_ms_p99']} ms; per token p50/p99 "
            f"{s['tpot_ms_p50']}/{s['tpot_ms_p99']} ms; inter-chunk p50/p99 {s['itl_ms_p50']}/{s['itl_ms_p99']} ms")
    if reference is not None:
        line += f"; exact match {s['exact_match']}/{s['compared']}"
    print(line)
    print(f"bench: wrote {out / ANSWERS} and {out / SUMMARY}", file=sys.stderr)
    return 0 if s["errors"] == 0 and (reference is None or s["exact_match"] == s["compared"]) else 1
