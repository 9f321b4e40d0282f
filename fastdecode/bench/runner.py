"""The benchmark loop: every method (and peer tool) on every prompt, interleaved per prompt, one row each.

Order, as DESIGN.md asks: warm-up first, then for each prompt `ar`, m1, m2, …, the peers, then the next
prompt, so machine drift cancels out of the ratios. Each row is appended to results.jsonl and flushed as
soon as it exists; `--resume` reads the file back, refuses rows of another provenance or setup, and runs
only what is missing. A prompt that fails becomes a row with its error, and the run goes on.

Our methods go through the public API (`Generator.generate` with prompt token ids), so the engine's own
clock and counters are what gets recorded. Multi-turn prompts follow Spec-Bench: each system answers turn
k+1 after its *own* answer to turn k, in the chat template. This module measures and records; it never
summarizes or renders (metrics.py and report.py do).
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from fastdecode.api import Generator
from fastdecode.bench.workloads import BenchPrompt, Workload
from fastdecode.drafters import get_method, make_options
from fastdecode.engine import GenerationStats
from fastdecode.exactness import first_divergence
from fastdecode.sampling import SAMPLERS

REFERENCE = "ar"
TOP_K = 8  # the target's top-k logits kept per token of greedy runs, for the numeric-tie rule
WARMUP_TOKENS = 16  # new tokens per warm-up generation
RESULTS = "results.jsonl"
TIMING_FIELDS = ("wall_s", "prefill_s", "draft_s", "verify_s", "host_s", "capture_s", "tokens_per_s")

Notify = Callable[[str], None]  # one-line notices (a skipped peer, a failed warm-up)


@dataclass(frozen=True)
class MethodSpec:
    """A decoding method with its options, as the bench runs it."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in self.options) + ")"

    @property
    def lossless(self) -> bool:
        return bool(get_method(self.name).lossless)

    def check(self) -> None:
        """Unknown methods and bad options fail here, before any model is loaded."""
        make_options(get_method(self.name), dict(self.options))


@dataclass(frozen=True)
class BenchSettings:
    methods: tuple[MethodSpec, ...]  # `ar` comes first (with_reference adds it)
    max_new_tokens: int = 256
    temperature: float = 0.0
    warmup: int = 1  # untimed generations per method (and peer) before the first prompt
    seed: int = 0  # sampling runs: each prompt's seed derives from it and the prompt id
    peer_per_category: int | None = None  # peers run on the first N prompts of each category (None: all)
    sampler: str = "gumbel"  # sampling runs: "gumbel" (same seed, same text as `ar`) or "rejection" (speculative sampling)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> BenchSettings:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.sampler != "gumbel" and self.greedy:
            raise ValueError("--sampler rejection needs --temperature > 0: a greedy run has no sampler")
        if self.peer_per_category is not None and self.peer_per_category < 1:
            raise ValueError(f"--peer-per-category must be >= 1, got {self.peer_per_category}")
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"a method is listed twice: {', '.join(labels)}")
        for m in self.methods:
            m.check()
        return self


def with_reference(methods: Sequence[MethodSpec]) -> tuple[MethodSpec, ...]:
    """`ar` (without options) always runs, first: every ratio and every exact-match check is against it."""
    rest = [m for m in methods if m != MethodSpec(REFERENCE)]
    return (MethodSpec(REFERENCE), *rest)


@dataclass(frozen=True)
class Turn:
    """One answer to one user turn."""

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # new tokens, EOS included when it ended the answer
    wall_s: float  # prefill included
    stats: GenerationStats | None = None  # our methods only
    peak_bytes: int | None = None
    finish_reason: str = ""


class Peer(Protocol):
    """Another tool's generate, on the same prompt token ids (see peers.py)."""

    label: str

    def complete(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Turn: ...


# ---------------------------------------------------------------- one answer


def weight_bytes(model: Any) -> int:
    """Bytes of the target's parameters and buffers (tied weights counted once); a wrapper's inner model counts."""
    net = model if isinstance(model, torch.nn.Module) else model.model  # e.g. the CUDA-graph runner
    tensors = {id(t): t for t in (*net.parameters(), *net.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def answer_text(generator: Generator, token_ids: Sequence[int]) -> str:
    """The text a turn's tokens say, without the EOS that ended it (what the next turn's history holds)."""
    ids = list(token_ids)
    if ids and ids[-1] in generator.tokenizer.eos_ids:
        ids = ids[:-1]
    return generator.tokenizer.decode(ids)


def prompt_seed(seed: int, prompt_id: str) -> int:
    return zlib.crc32(f"{seed}/{prompt_id}".encode())


def converse(generator: Generator, prompt: BenchPrompt, complete: Callable[[list[int]], Turn]) -> list[Turn]:
    """Answer every turn; turn k+1 sees this system's own answer to turn k (Spec-Bench's protocol)."""
    messages: list[dict[str, str]] = []
    turns: list[Turn] = []
    for text in prompt.turns:
        if prompt.raw:
            ids = generator.prompt_ids(text, raw=True)
        else:
            messages.append({"role": "user", "content": text})
            ids = generator.prompt_ids(messages)
        turn = complete(ids)
        turns.append(turn)
        messages.append({"role": "assistant", "content": answer_text(generator, turn.token_ids)})
    return turns


def method_turn(generator: Generator, method: MethodSpec, settings: BenchSettings, seed: int, ids: list[int], max_new: int) -> Turn:
    dev = generator.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    prompt: Any = ids  # a list of token ids is used as is
    gen = generator.generate(
        prompt,
        method.name,
        max_new_tokens=max_new,
        temperature=settings.temperature,
        seed=seed,
        sampler=settings.sampler,
        top_logits=TOP_K if settings.greedy else 0,
        **dict(method.options),
    )
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = weight_bytes(generator.model) + gen.stats.cache_bytes
    return Turn(tuple(ids), tuple(gen.token_ids), gen.stats.wall_s, gen.stats, peak, gen.finish_reason)


# ---------------------------------------------------------------- rows


def accepted_histogram(stats: Iterable[GenerationStats]) -> list[int]:
    """hist[k] = number of steps that accepted k draft tokens."""
    hist: list[int] = []
    for s in stats:
        for step in s.trace:
            while len(hist) <= step.accepted:
                hist.append(0)
            hist[step.accepted] += 1
    return hist


def _top_records(turns: Sequence[Turn]) -> list[list[list]]:
    """Per new token (turns concatenated), the target's top-k [ids, logits]."""
    return [[list(ids), list(vals)] for t in turns if t.stats is not None for ids, vals in t.stats.top_logits]


def _stats_fields(turns: Sequence[Turn]) -> dict[str, Any]:
    stats = [t.stats for t in turns if t.stats is not None]
    total = lambda name: sum(getattr(s, name) for s in stats)  # noqa: E731
    new, steps, drafted = total("new_tokens"), total("steps"), total("drafted")
    return {
        "steps": steps,
        "draft_forwards": total("draft_forwards"),
        "drafted": drafted,
        "accepted": total("accepted"),
        "mat": round(new / steps, 4) if steps else None,
        "acceptance_rate": round(total("accepted") / drafted, 4) if drafted else None,
        "prefill_s": round(total("prefill_s"), 6),
        "draft_s": round(total("draft_s"), 6),
        "verify_s": round(total("verify_s"), 6),
        "host_s": round(total("host_s"), 6),
        "capture_s": round(sum(getattr(s, "capture_s", 0.0) for s in stats), 6),  # CUDA-graph capture inside wall_s: warm up more if > 0
        "accepted_hist": accepted_histogram(stats),
    }


def _exactness(turns: Sequence[Turn], reference: dict | None, greedy: bool, lossless: bool, strict: bool = False) -> dict[str, Any]:
    """exact, divergence and flag against the reference row (None when there is nothing to compare with).
    `strict`: our own method on row-invariant forwards, where a numeric tie is no excuse: any divergence is flagged."""
    if reference is None or reference.get("error"):
        return {"exact": None, "divergence": None, "flag": False}
    ref_ids = [t for turn in reference["token_ids"] for t in turn]
    ids = [t for turn in turns for t in turn.token_ids]
    div = first_divergence(ref_ids, ids, reference.get("reference_top") or [], _top_records(turns))
    if div is None:
        return {"exact": True, "divergence": None, "flag": False}
    record = div.to_dict()
    record["turn"] = _turn_of(div.position, [len(t) for t in reference["token_ids"]])
    return {"exact": False, "divergence": record, "flag": bool(greedy and lossless and (strict or not div.tie))}


def _turn_of(position: int, lengths: Sequence[int]) -> int:
    for k, n in enumerate(lengths):
        if position < n:
            return k
        position -= n
    return max(0, len(lengths) - 1)


def base_row(prompt: BenchPrompt, label: str, kind: str, record: dict[str, Any]) -> dict[str, Any]:
    return {"prompt_id": prompt.id, "category": prompt.category, "group": prompt.group, "method": label, "kind": kind, **record}


def result_row(
    prompt: BenchPrompt, label: str, kind: str, turns: Sequence[Turn], reference: dict | None, settings: BenchSettings,
    lossless: bool, record: dict[str, Any],
) -> dict[str, Any]:
    new = sum(len(t.token_ids) for t in turns)
    wall = sum(t.wall_s for t in turns)
    row = base_row(prompt, label, kind, record)
    row.update(
        lossless=lossless,
        turns=len(turns),
        prompt_tokens=sum(len(t.prompt_ids) for t in turns),
        new_tokens=new,
        wall_s=round(wall, 6),
        tokens_per_s=round(new / wall, 3) if wall > 0 else None,
        finish_reasons=[t.finish_reason for t in turns],
        token_ids=[list(t.token_ids) for t in turns],
        error=None,
    )
    if kind == "method":
        row.update(_stats_fields(turns))
        peaks = [t.peak_bytes for t in turns if t.peak_bytes is not None]
        row["peak_bytes"] = max(peaks) if peaks else None
    if label == REFERENCE and settings.greedy:
        row["reference_top"] = _top_records(turns)
    if label == REFERENCE:
        row.update(exact=True, divergence=None, flag=False)  # the reference, by definition
    else:
        strict = kind == "method" and record.get("provenance", {}).get("row_invariant") == "yes"
        row.update(_exactness(turns, reference, settings.greedy, lossless, strict))
    return row


def error_row(prompt: BenchPrompt, label: str, kind: str, error: BaseException, lossless: bool, record: dict[str, Any]) -> dict[str, Any]:
    row = base_row(prompt, label, kind, record)
    row.update(lossless=lossless, error=f"{type(error).__name__}: {error}", exact=None, divergence=None, flag=False)
    return row


# ---------------------------------------------------------------- results file and resume


class ResultsFile:
    """results.jsonl: one row per (prompt, method), appended and flushed as each row completes."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """Rows already written; a last line cut short by an interruption is dropped from the file."""
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8")
        complete, _, tail = text.rpartition("\n")
        if tail.strip():
            self.path.write_text(complete + "\n" if complete else "", encoding="utf-8")
        rows = []
        for lineno, line in enumerate(complete.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{self.path}, line {lineno} is not JSON: cannot resume from it") from None
        return rows

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def check_resumable(rows: Sequence[dict[str, Any]], record: dict[str, Any], path: Path) -> None:
    """Every earlier row must share this run's provenance and setup, or the ratios would mix machines or code."""
    for row in rows:
        for key in ("provenance", "setup"):
            old, new = row.get(key, {}), record[key]
            if old != new:
                diffs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                raise ValueError(
                    f"cannot resume {path}: its rows have a different {key} ({'; '.join(diffs)}); use another --out"
                )


# ---------------------------------------------------------------- the loop


@dataclass
class Progress:
    """The progress bar: prompts done, current method, its tokens/s so far; tqdm adds the time left."""

    total: int
    enabled: bool = True
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit="prompt", desc="bench", disable=not self.enabled, file=sys.stderr, dynamic_ncols=True)

    def running(self, label: str) -> None:
        tps = self.tokens.get(label, 0) / self.seconds[label] if self.seconds.get(label) else 0.0
        self.bar.set_postfix_str(f"{label} {tps:.1f} tok/s", refresh=True)

    def record(self, row: dict[str, Any]) -> None:
        if row.get("error") is None and row.get("wall_s"):
            label = row["method"]
            self.tokens[label] = self.tokens.get(label, 0) + row["new_tokens"]
            self.seconds[label] = self.seconds.get(label, 0.0) + row["wall_s"]

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def warm_up(generator: Generator, workload: Workload, settings: BenchSettings, peers: Sequence[Peer], notify: Notify) -> None:
    """Untimed generations, so no method pays for first-call costs in its figures. They run on the
    workload's longest prompt; on a GPU for the full `max_new_tokens`, so that the CUDA graphs of the
    long cache spans are captured here rather than inside a timed run."""
    if not workload.prompts or settings.warmup == 0:
        return
    try:
        lengths = [(len(generator.prompt_ids(p.turns[0], raw=p.raw)), i) for i, p in enumerate(workload.prompts)]
        longest = workload.prompts[max(lengths)[1]]
        ids = generator.prompt_ids(longest.turns[0], raw=longest.raw)
    except ValueError as e:
        notify(f"warm-up skipped: {e}")
        return
    full = generator.device.type == "cuda"
    max_new = settings.max_new_tokens if full else min(WARMUP_TOKENS, settings.max_new_tokens)
    runs: list[tuple[str, Callable[[], Turn]]] = [
        (m.label, partial(method_turn, generator, m, settings, settings.seed, ids, max_new)) for m in settings.methods
    ]
    runs += [(p.label, partial(p.complete, ids, max_new, settings.temperature, settings.seed)) for p in peers]
    for _ in range(settings.warmup):
        for label, run in runs:
            try:
                run()
            except Exception as e:  # the timed run will record the error for each prompt
                notify(f"warm-up of {label} failed: {type(e).__name__}: {e}")


def peer_prompts(workload: Workload, per_category: int | None) -> set[str]:
    return {p.id for p in workload.select(per_category)[0].prompts}


class BenchRun:
    """One benchmark run over a workload: the rows so far, the results file, the progress bar."""

    def __init__(
        self, generator: Generator, settings: BenchSettings, record: dict[str, Any], results: ResultsFile, rows: list, bar: Progress
    ):
        self.generator, self.settings, self.record = generator, settings, record
        self.results, self.rows, self.bar = results, rows, bar
        self.done = {(r["prompt_id"], r["method"]): r for r in rows}

    def missing(self, prompts: Iterable[BenchPrompt], labels: Sequence[str]) -> bool:
        return any((p.id, label) not in self.done for p in prompts for label in labels)

    def prompt(self, prompt: BenchPrompt, peers: Sequence[Peer]) -> None:
        """ar, m1, m2, …, then the peers: one row each, skipping rows already written."""
        settings, seed = self.settings, prompt_seed(self.settings.seed, prompt.id)
        for m in settings.methods:
            ours = partial(method_turn, self.generator, m, settings, seed, max_new=settings.max_new_tokens)
            self.one(prompt, m.label, "method", m.lossless, ours)
        for p in peers:
            theirs = partial(p.complete, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, seed=seed)
            self.one(prompt, p.label, "peer", False, theirs)

    def one(self, prompt: BenchPrompt, label: str, kind: str, lossless: bool, complete: Callable[[list[int]], Turn]) -> None:
        if (prompt.id, label) in self.done:
            return
        self.bar.running(label)
        try:
            turns = converse(self.generator, prompt, complete)
        except Exception as e:  # recorded, and the run goes on; KeyboardInterrupt is not caught
            row = error_row(prompt, label, kind, e, lossless, self.record)
            self.bar.write(f"{prompt.id} / {label}: {row['error']}")
        else:
            reference = self.done.get((prompt.id, REFERENCE))
            row = result_row(prompt, label, kind, turns, reference, self.settings, lossless, self.record)
        self.results.append(row)
        self.rows.append(row)
        self.done[(prompt.id, label)] = row
        self.bar.record(row)


def run_bench(
    generator: Generator,
    workload: Workload,
    settings: BenchSettings,
    out_dir: Path,
    record: dict[str, Any],
    peers: Sequence[Peer] = (),
    resume: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or finish) the benchmark; return every row of results.jsonl, old and new.

    `record` holds `provenance` and `setup`, copied onto every row. Without `resume`, an existing
    results.jsonl is refused rather than overwritten.
    """
    settings.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(out_dir / RESULTS)
    if results.path.exists() and not resume:
        raise ValueError(f"{results.path} exists: pass --resume to continue it, or choose another --out")
    rows = results.read() if resume else []
    check_resumable(rows, record, results.path)
    peer_ids = peer_prompts(workload, settings.peer_per_category) if peers else set()
    bar = Progress(len(workload.prompts), progress)
    run = BenchRun(generator, settings, record, results, rows, bar)
    try:
        labels = [m.label for m in settings.methods] + [p.label for p in peers]
        if run.missing(workload.prompts, labels):
            warm_up(generator, workload, settings, peers, bar.write)
        for prompt in workload.prompts:
            run.prompt(prompt, peers if prompt.id in peer_ids else ())
            bar.advance()
    finally:
        bar.close()
    return rows
