"""The decode loop of DESIGN.md: prefill, propose, verify in one target forward, accept, roll back,
observe, emit — and the clock. Every method runs through `Engine.generate`, so every method is counted
and timed the same way. The engine never decides acceptance (verify.py does) and never drafts.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdecode.cache import KVCache
from fastdecode.drafters.base import DraftContext, Drafter, Proposal, StepResult
from fastdecode.models.llama import ATTN_BLOCK, LlamaModel
from fastdecode.sampling import SamplingParams, choose_tokens, target_probs
from fastdecode.verify import verify_match, verify_rejection

CACHE_SLACK = 256  # KV rows beyond prompt + max_new_tokens, for draft rows of the last steps
PREFILL_ROWS = 128  # generate_batch prefills its prompts in groups of this many


@dataclass
class StepTrace:
    rows: int  # rows in the verify forward (1 + draft nodes + lookahead rows)
    accepted: int  # draft tokens accepted
    emitted: int  # tokens emitted (accepted + bonus, fewer at a stop)
    draft_us: float
    verify_us: float
    host_us: float


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # target forwards in the decode loop (prefill is not a step)
    draft_forwards: int = 0
    drafted: int = 0  # draft nodes sent to the verifier
    accepted: int = 0  # draft tokens accepted
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    host_s: float = 0.0
    wall_s: float = 0.0  # prefill included; the top_logits recording (bench instrumentation) excluded
    record_s: float = 0.0  # time spent recording top_logits, outside wall_s
    cache_bytes: int = 0  # what the engine allocated for the KV cache
    capture_s: float = 0.0  # CUDA-graph capture and compilation inside this generation (included in wall_s)
    finish_reason: str = ""  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    trace: list[StepTrace] = field(default_factory=list)
    # with Engine.generate(..., top_logits=k): per emitted token, the target's top-k (ids, logits) at its row
    top_logits: list[tuple[list[int], list[float]]] = field(default_factory=list)

    @property
    def mat(self) -> float:
        """Mean accepted tokens per step: new tokens / target forwards (AR = 1.0)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self) -> dict[str, float | int | str]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "draft_forwards": self.draft_forwards,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "mat": round(self.mat, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prefill_s": round(self.prefill_s, 6),
            "draft_s": round(self.draft_s, 6),
            "verify_s": round(self.verify_s, 6),
            "host_s": round(self.host_s, 6),
            "wall_s": round(self.wall_s, 6),
            "cache_bytes": self.cache_bytes,
            "capture_s": round(self.capture_s, 6),
            "record_s": round(self.record_s, 6),
            "finish_reason": self.finish_reason,
        }


@dataclass(frozen=True)
class StopConditions:
    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None  # needed for stop strings


class Stopper:
    """Finds where the output must end: at an EOS id, at a stop string, or at max_new_tokens."""

    def __init__(self, cond: StopConditions):
        self.cond = cond
        longest = max((len(s) for s in cond.stop_strings), default=0)
        self.window = 4 * longest + 4  # tokens enough to spell the longest stop string, bytes split included
        self.reason: str | None = None

    def keep(self, out: list[int], start: int) -> int:
        """`out[start:]` is new; return how many tokens of `out` to keep, and set `reason` at a stop."""
        cond = self.cond
        for k in range(start, len(out)):
            if out[k] in cond.eos_ids:
                self.reason = "stop"
                return k + 1
            if cond.stop_strings and cond.decode is not None:
                tail = cond.decode(out[max(0, k + 1 - self.window) : k + 1])
                if any(s in tail for s in cond.stop_strings):
                    self.reason = "stop"
                    return k + 1
            if k + 1 >= cond.max_new_tokens:
                self.reason = "length"
                return k + 1
        return len(out)


def tree_mask(parents: list[int]) -> torch.Tensor | None:
    """(1+m, 1+m) bool: row r sees row 0 (the pending token), its ancestors and itself. None for a chain."""
    m = len(parents)
    if parents == list(range(-1, m - 1)):
        return None  # a chain is causal
    mask = torch.zeros(1 + m, 1 + m, dtype=torch.bool)
    mask[0, 0] = True
    for j, p in enumerate(parents):
        mask[j + 1] = mask[p + 1]
        mask[j + 1, j + 1] = True
    return mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    def __init__(self, model: LlamaModel):
        self.model = model
        self.cache: KVCache | None = None  # the current generation's cache (tests look at it)
        self.tokenizer: Any = None  # set by the API: drafters that calibrate on text (layerskip) read it

    @property
    def context_length(self) -> int:
        return self.model.cfg.max_position

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt_len + max_new_tokens > self.context_length:
            raise ValueError(
                f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                f"the model's context of {self.context_length} tokens"
            )

    def generate(
        self,
        prompt_ids: list[int],
        drafter: Drafter,
        params: SamplingParams,
        stop: StopConditions,
        stats: GenerationStats,
        top_logits: int = 0,
    ) -> Iterator[list[int]]:
        """Yield the emitted tokens of each step; fill `stats` as it goes. Batch 1."""
        model, dev = self.model, self.model.device
        in_dev = getattr(model, "input_device", dev)  # a CUDA-graph runner takes its inputs on the host
        capture0 = getattr(model, "capture_seconds", 0.0)
        greedy_tokens = getattr(model, "greedy_tokens", None)
        self.check_request(len(prompt_ids), stop.max_new_tokens)
        params.validate()
        generator = None
        if params.rejection:
            generator = torch.Generator(device=dev)
            generator.manual_seed(params.seed)
        # whole attention blocks (the CPU's row-invariant attention reads the cache as it lies then)
        want = -(-(len(prompt_ids) + stop.max_new_tokens + CACHE_SLACK) // ATTN_BLOCK) * ATTN_BLOCK
        max_len = min(self.context_length, want)
        t_start = time.perf_counter()
        # a CUDA-graph runner keeps the target's cache in storage its graphs point at; drafters get their own
        new_cache = getattr(model, "new_target_cache", model.new_cache)
        cache = self.cache = new_cache(batch=1, length=max_len)
        stats.cache_bytes = cache.nbytes
        stats.prompt_tokens = len(prompt_ids)

        # 0. prefill: every prompt token but the last goes into the cache; the last one is pending
        with torch.inference_mode():
            hidden = torch.zeros(1, 0, model.cfg.hidden_size, device=dev, dtype=model.dtype)
            if len(prompt_ids) > 1:
                ids = torch.tensor([prompt_ids[:-1]], device=in_dev)
                _, hidden = model(ids, torch.arange(ids.shape[1], device=in_dev)[None], cache, hidden_only=True)
        drafter.reset(list(prompt_ids))
        if drafter.features:  # a drafter on the target's features (EAGLE) reads the prompt's
            with torch.inference_mode():
                drafter.prefill(hidden[0])
        _sync(dev)
        stats.prefill_s = time.perf_counter() - t_start

        tokens = list(prompt_ids)  # committed tokens; tokens[-1] is pending
        out: list[int] = []
        stopper = Stopper(stop)
        while stopper.reason is None:
            t0 = time.perf_counter()
            # 1. propose: a tree that fits the token budget and the cache
            start = cache.length  # slot (and position) of the pending token
            budget = stop.max_new_tokens - len(out)
            ctx = DraftContext(
                tokens=tokens,
                prompt_len=len(prompt_ids),
                max_depth=max(0, min(budget - 1, self.context_length - start - 2)),
                max_nodes=max(0, cache.max_len - start - 1),
                params=params,
                vocab_size=model.cfg.vocab_size,
                target=self,
            )
            with torch.inference_mode():
                proposal = drafter.draft(ctx)  # propose, within the adaptive controller's limits
            if proposal.extra_tokens and len(proposal) + len(proposal.extra_tokens) > ctx.max_nodes:
                proposal = Proposal(proposal.tokens, proposal.parents, proposal.draft_probs, proposal.draft_forwards)
            proposal = proposal.clip(ctx.max_depth, ctx.max_nodes)
            _sync(dev)
            t1 = time.perf_counter()

            # 2. score every draft node (and lookahead row) in one target forward
            m, e = len(proposal), len(proposal.extra_tokens)
            depths = proposal.depths()
            row_tokens = [tokens[-1], *proposal.tokens, *proposal.extra_tokens]
            row_pos = [start, *(start + d for d in depths), *(start + o for o in proposal.extra_positions)]
            mask = tree_mask(proposal.parents)
            if e:
                assert proposal.extra_mask is not None, "a proposal with lookahead rows needs extra_mask"
                full = torch.zeros(1 + m + e, 1 + m + e, dtype=torch.bool)
                full[: 1 + m, : 1 + m] = torch.ones(1 + m, 1 + m).tril().bool() if mask is None else mask
                full[1 + m :] = proposal.extra_mask
                mask = full
            with torch.inference_mode():
                ids = torch.tensor([row_tokens], device=in_dev)
                pos = torch.tensor([row_pos], device=in_dev)
                logits, hidden = model(ids, pos, cache, None if mask is None else mask.to(in_dev)[None])
                logits = logits[0]  # (1+m+e, V)
                # 3. the verdict: the longest valid path plus the bonus token
                if generator is None:
                    # greedy: a graph runner has each row's argmax already (computed inside its graph)
                    choice = greedy_tokens(1 + m) if params.greedy and greedy_tokens is not None else None
                    if choice is None:
                        row_pos_t = pos[0, : 1 + m] if params.greedy else pos[0, : 1 + m].to(logits.device)  # greedy ignores them
                        choice = choose_tokens(logits[: 1 + m], row_pos_t, params).tolist()
                    # a lossy method may accept by its own rule (verify.py); every other verdict is lossless
                    verdict = None if drafter.lossless else drafter.verdict(proposal, logits[: 1 + m], choice, params)
                    verdict = verdict or verify_match(proposal, choice)
                else:
                    verdict = verify_rejection(proposal, target_probs(logits[: 1 + m], params), generator)
            _sync(dev)
            t2 = time.perf_counter()

            # 4. keep the pending row and the accepted path, compacted; the bonus token becomes pending
            cache.compact(start, [start, *(start + 1 + j for j in verdict.path)])
            # 5. let the drafter adapt
            extra_logits = logits[1 + m :] if e else None
            drafter.learn(StepResult(proposal, verdict, extra_logits, t2 - t0, logits[: 1 + m], t1 - t0, hidden[0, : 1 + m]))
            # 6. emit, up to the first stop
            new = verdict.new_tokens
            before = len(out)
            out.extend(new)
            keep = stopper.keep(out, before)
            del out[keep:]
            emitted = out[before:]
            tokens.extend(emitted)
            rec = 0.0
            if top_logits:  # instrumentation for the bench's tie rule: timed apart, not generation time
                tr = time.perf_counter()
                rows = [0, *(1 + j for j in verdict.path)][: len(emitted)]
                top = torch.topk(logits[rows], top_logits, dim=-1)
                stats.top_logits.extend(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                rec = time.perf_counter() - tr
                stats.record_s += rec
            t3 = time.perf_counter()

            stats.steps += 1
            stats.draft_forwards += proposal.draft_forwards
            stats.drafted += m
            stats.accepted += len(verdict.path)
            stats.new_tokens = len(out)
            stats.draft_s += t1 - t0
            stats.verify_s += t2 - t1
            host = t3 - t2 - rec
            stats.host_s += host
            stats.trace.append(StepTrace(1 + m + e, len(verdict.path), len(emitted), (t1 - t0) * 1e6, (t2 - t1) * 1e6, host * 1e6))
            stats.wall_s = time.perf_counter() - t_start - stats.record_s
            stats.capture_s = getattr(model, "capture_seconds", 0.0) - capture0
            if emitted:
                yield emitted
        stats.finish_reason = stopper.reason or ""

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: frozenset[int] = frozenset()) -> list[list[int]]:
        """Greedy answers to several prompts at once: left-padded into one batch, one forward per step for all.

        For throughput (training data), not for serving exactness: a row of a B-row forward may round
        differently from the 1-row step, so an answer can differ from `ar`'s batch-1 answer at a numeric
        tie. Each answer ends at its first EOS (included) or after `max_new_tokens` tokens.
        """
        if not prompts:
            return []
        for p in prompts:
            self.check_request(len(p), max_new_tokens)
        model = getattr(self.model, "eager_model", self.model)  # batches run the model itself, not graphs
        dev = model.device
        B, L = len(prompts), max(len(p) for p in prompts)
        pad = torch.tensor([L - len(p) for p in prompts])
        ids = torch.zeros(B, L, dtype=torch.long)
        visible = torch.ones(B, L + max_new_tokens, dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, int(pad[b]) :] = torch.tensor(p)
            visible[b, : int(pad[b])] = False
        positions = (torch.arange(L)[None] - pad[:, None]).clamp_min(0)
        visible = visible.to(dev)
        cache = model.new_cache(batch=B, length=L + max_new_tokens)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * B
        with torch.inference_mode():
            # the prompts in groups of PREFILL_ROWS: a prefill's activations and mask grow with rows x L x L
            firsts = []
            for b0 in range(0, B, PREFILL_ROWS):
                part = copy.copy(cache)  # a view of these rows of the cache: the forward writes through it
                part.k, part.v = cache.k[:, b0 : b0 + PREFILL_ROWS], cache.v[:, b0 : b0 + PREFILL_ROWS]
                logits, _ = model(ids[b0 : b0 + PREFILL_ROWS].to(dev), positions[b0 : b0 + PREFILL_ROWS].to(dev), part, num_logits=1,
                                  key_mask=visible[b0 : b0 + PREFILL_ROWS, :L])
                firsts.append(logits[:, -1].argmax(-1))
            cache.length = L
            nxt = torch.cat(firsts)
            lengths = torch.tensor([len(p) for p in prompts], device=dev)
            for step in range(max_new_tokens):
                for b, t in enumerate(nxt.tolist()):
                    if not done[b]:
                        out[b].append(int(t))
                        done[b] = int(t) in eos_ids
                if all(done) or step == max_new_tokens - 1:
                    break
                logits, _ = model(nxt[:, None], (lengths + step)[:, None], cache, num_logits=1, key_mask=visible[:, : L + step + 1])
                nxt = logits[:, -1].argmax(-1)
        return out
