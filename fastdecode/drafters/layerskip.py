"""`layerskip`: self-speculative decoding — the target drafts with a subset of its own layers.

The draft pass runs the kept layers, then the target's own final norm and LM head, into a scratch KV
cache of its own (one slot per kept layer; drafters/chain.py keeps the accepted rows); it never reads or
writes the engine's cache. Each partial pass is a draft forward, not a step. Drafting stops early when the
draft's top probability falls below `min_confidence`, as Draft & Verify does.

Which layers: `layers=0,1,2,5` keeps exactly those; otherwise a calibration picks them per model — a
greedy search (Draft & Verify) that drops, one at a time, the layer whose removal keeps the next-token
argmax closest to the full model's on a few calibration prompts, then keeps the prefix of that order
with the best expected tokens per unit of time — all of them when no subset beats plain decoding, and
then the drafter proposes nothing. It is deterministic for a given seed and cached on disk under
`cache_dir()/layerskip/<model fingerprint>-<calibration settings>.json`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdecode.drafters.base import DraftContext, Drafter, Proposal, register
from fastdecode.drafters.chain import ChainState, draft_chain

CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class LayerSkipOptions:
    num_draft: int = 6  # deepest draft
    layers: tuple[int, ...] = ()  # layers the draft runs (empty: calibrate)
    min_confidence: float = 0.3  # stop drafting when the draft's top probability is below this (0 = never)
    calib_prompts: int = 2
    calib_tokens: int = 24  # tokens generated per calibration prompt (the positions scored)
    calib_seed: int = 0
    adaptive: bool = True

    def validate(self) -> None:
        if self.num_draft < 1:
            raise ValueError("layerskip: num_draft must be >= 1")
        if any(li < 0 for li in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError("layerskip: layers must be distinct layer indices >= 0")
        if not 0 <= self.min_confidence < 1:
            raise ValueError("layerskip: min_confidence must be in [0, 1)")
        if self.calib_prompts < 1 or self.calib_tokens < 2:
            raise ValueError("layerskip: calib_prompts >= 1 and calib_tokens >= 2")


# ------------------------------------------------------------------ calibration


def model_fingerprint(model: Any) -> str:
    """Config plus a sample of the weights: the same checkpoint gives the same name, another one does not."""
    h = hashlib.sha256(repr(model.cfg).encode())
    for t in (model.embed_tokens.weight, model.layers[0].self_attn.q_proj.weight, model.norm.weight):
        h.update(t.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    h.update(str(model.dtype).encode())
    return h.hexdigest()[:16]


def calibration_prompts(count: int, seed: int) -> list[list[dict[str, str]]]:
    """`count` Spec-Bench first turns chosen by `seed`, one per category where possible."""
    from fastdecode.data import spec_bench_subset

    qs = spec_bench_subset(5)
    rng = random.Random(seed)
    rng.shuffle(qs)
    chosen, cats = [], set()
    for q in qs:
        if q["category"] not in cats and len(q["turns"][0]) < 600:  # short prompts: calibration stays fast
            chosen.append(q)
            cats.add(q["category"])
        if len(chosen) == count:
            break
    return [[{"role": "user", "content": q["turns"][0]}] for q in chosen]


class _Scorer:
    """Argmax agreement of a layer subset with the full model, teacher-forced on fixed sequences."""

    def __init__(self, model: Any, sequences: list[list[int]], scored: int):
        self.model, self.scored = model, scored
        self.sequences = [torch.tensor([s], device=model.device) for s in sequences]
        self.reference = [self._argmax(seq, list(range(model.cfg.num_layers))) for seq in self.sequences]

    @torch.inference_mode()
    def _argmax(self, seq: torch.Tensor, layers: list[int]) -> torch.Tensor:
        model = self.model
        cache = model.new_cache(batch=1, length=seq.shape[1], layers=len(layers))
        pos = torch.arange(seq.shape[1], device=model.device)[None]
        logits, _ = model(seq, pos, cache, num_logits=self.scored, layers=layers)
        return logits[0].argmax(-1)

    def agreement(self, layers: list[int]) -> float:
        same = sum(int((self._argmax(s, layers) == r).sum()) for s, r in zip(self.sequences, self.reference, strict=True))
        return same / (self.scored * len(self.sequences))


def expected_speed(alpha: float, keep: int, total: int, max_depth: int) -> float:
    """Tokens per unit time of a chain draft with per-token acceptance alpha, best depth.

    Cost units: one full width-1 forward = 1; a draft pass costs keep/total of it plus the LM head's share
    (taken as 20%); verifying k tokens adds ~0.25 per row up to 1 (this CPU; a GPU is flatter).
    """
    draft_cost = 0.2 + 0.8 * keep / total
    best = 1.0
    for k in range(1, max_depth + 1):
        tokens = sum(alpha**i for i in range(k + 1))
        best = max(best, tokens / (k * draft_cost + 1.0 + min(0.25 * k, 1.0)))
    return best


def calibration_sequences(model: Any, tokenize_chat: Any, options: LayerSkipOptions) -> list[list[int]]:
    """Chat prompts plus the target's own greedy continuation (the positions that are scored)."""
    from fastdecode.drafters.ar import AutoRegressive
    from fastdecode.drafters.base import NoOptions
    from fastdecode.engine import Engine, GenerationStats, StopConditions
    from fastdecode.sampling import SamplingParams

    engine = Engine(model)
    sequences = []
    for messages in calibration_prompts(options.calib_prompts, options.calib_seed):
        ids = tokenize_chat(messages)[-64:]  # the tail: calibration cost grows with the sequence
        out: list[int] = []
        stop = StopConditions(options.calib_tokens)  # no EOS: always calib_tokens tokens
        for piece in engine.generate(ids, AutoRegressive(NoOptions()), SamplingParams(), stop, GenerationStats()):
            out.extend(piece)
        sequences.append(ids + out[:-1])  # the last calib_tokens rows predict `out`
    return sequences


def calibrate(model: Any, sequences: list[list[int]], options: LayerSkipOptions, beam: int = 4, floor: float = 0.5) -> dict:
    """Greedy layer removal (Draft & Verify). Each round drops the layer whose removal keeps the argmax
    agreement with the full model highest, among the `beam` layers that hurt least when removed alone;
    the kept set with the best `expected_speed` wins. Deterministic: fixed inputs, ties to the lower index."""
    L = model.cfg.num_layers
    scorer = _Scorer(model, sequences, options.calib_tokens)
    inner = list(range(1, L - 1))  # the first and last layers stay: they bridge embedding and LM head
    alone = {li: scorer.agreement([k for k in range(L) if k != li]) for li in inner}
    rank = sorted(inner, key=lambda li: (-alone[li], li))
    kept = list(range(L))
    order: list[int] = []
    curve: list[float] = [1.0]
    best = (expected_speed(1.0, L, L, options.num_draft), list(kept), 1.0)
    while len(kept) > max(2, L // 4):
        candidates = [li for li in rank if li in kept][:beam]
        if not candidates:
            break
        scores = [(scorer.agreement([k for k in kept if k != li]), -li, li) for li in candidates]
        agree, _, drop = max(scores)
        kept.remove(drop)
        order.append(drop)
        curve.append(agree)
        speed = expected_speed(agree, len(kept), L, options.num_draft)
        if speed > best[0]:
            best = (speed, list(kept), agree)
        if agree < floor:  # past here drafts are mostly rejected: no better set follows
            break
    return {
        "layers": best[1],
        "agreement": best[2],
        "removal_order": order,
        "agreement_curve": curve,
        "single_removal": {str(k): v for k, v in alone.items()},
        "version": CALIBRATION_VERSION,
    }


def calibration_path(model: Any, options: LayerSkipOptions, source: str = "spec-bench") -> Path:
    from fastdecode.tokenizer import cache_dir

    key = f"{model_fingerprint(model)}-{source}-p{options.calib_prompts}-t{options.calib_tokens}-s{options.calib_seed}-d{options.num_draft}"
    return cache_dir() / "layerskip" / f"{key}.json"


def load_or_calibrate(model: Any, sequences: Callable[[], list[list[int]]], options: LayerSkipOptions, source: str) -> list[int]:
    """The cached layer choice for this model, or a fresh calibration (saved for next time)."""
    path = calibration_path(model, options, source)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("version") == CALIBRATION_VERSION:
                return [int(li) for li in data["layers"]]
        except (OSError, ValueError, KeyError):
            pass  # a corrupt file is calibrated again
    data = calibrate(model, sequences(), options)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
    except OSError:
        pass  # a read-only cache only costs the calibration again next time
    return [int(li) for li in data["layers"]]


def prompt_sequences(model: Any, prompt: list[int], options: LayerSkipOptions) -> list[list[int]]:
    """Without a tokenizer: the request's own prompt (its last 160 tokens) and the target's continuation."""
    from fastdecode.drafters.ar import AutoRegressive
    from fastdecode.drafters.base import NoOptions
    from fastdecode.engine import Engine, GenerationStats, StopConditions
    from fastdecode.sampling import SamplingParams

    ids = prompt[-160:]
    out: list[int] = []
    stop = StopConditions(options.calib_tokens)
    for piece in Engine(model).generate(ids, AutoRegressive(NoOptions()), SamplingParams(), stop, GenerationStats()):
        out.extend(piece)
    return [ids + out[:-1]]


# ------------------------------------------------------------------ the drafter


@register
class LayerSkip(Drafter):
    name = "layerskip"
    description = "self-speculative: the target drafts with a calibrated subset of its own layers"
    lossless = True
    Options = LayerSkipOptions

    def __init__(self, options: LayerSkipOptions):
        super().__init__(options)
        self.layers: list[int] | None = list(options.layers) or None
        self.state = ChainState()

    def draft_shape(self) -> tuple[int, int]:
        return self.options.num_draft, 1

    def reset(self, prompt_tokens: list[int]) -> None:
        self.state.reset()  # the rejection sampler's noise is seeded from the request's seed at the first step

    def draft_layers(self, ctx: DraftContext) -> list[int]:
        # calibration tries many layer subsets once each: run them on the model itself, not through CUDA graphs
        model = getattr(ctx.target.model, "eager_model", ctx.target.model)
        if self.layers is None:
            tok = getattr(ctx.target, "tokenizer", None)
            if tok is not None:  # calibrate on Spec-Bench chat prompts (chosen by calib_seed)
                seqs = lambda: calibration_sequences(model, tok.chat, self.options)  # noqa: E731
                self.layers = load_or_calibrate(model, seqs, self.options, "spec-bench")
            else:  # an engine without a tokenizer: calibrate on this request's prompt
                prompt = ctx.tokens[: ctx.prompt_len]
                self.layers = load_or_calibrate(model, lambda: prompt_sequences(model, prompt, self.options), self.options, "prompt")
        if max(self.layers) >= model.cfg.num_layers:
            raise ValueError(f"layerskip: the model has {model.cfg.num_layers} layers; got layers={self.layers}")
        return self.layers

    def propose(self, ctx: DraftContext) -> Proposal:
        k = min(self.options.num_draft, ctx.max_depth, ctx.max_nodes)
        if k < 1:
            return Proposal()
        model = ctx.target.model
        layers = self.draft_layers(ctx)
        if len(layers) >= model.cfg.num_layers:
            return Proposal()  # calibration found no subset worth drafting with: plain decoding is faster
        return draft_chain(model, self.state, ctx, k, layers, self.options.min_confidence)
