"""KV cache: append, truncate, compact; and rollback after every verify step.

Invariant (DESIGN.md, "How we know a method is lossless", 3): after every compaction the kept rows are
bitwise those the verify forward computed for the pending token and the accepted nodes, the rows before
them are untouched, and the whole cache is allclose to one rebuilt from scratch by a plain forward over
the committed tokens. Fuzzed with `_random-tree` on a tiny model and on real prompts.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_tiny_model, run_engine, tiny_config

from fastdecode.cache import KVCache
from fastdecode.drafters import make_drafter
from fastdecode.drafters.base import DraftContext, Drafter, NoOptions, Proposal
from fastdecode.engine import Engine
from fastdecode.models.llama import LlamaModel
from fastdecode.sampling import SamplingParams


def _filled(max_len: int = 20, length: int = 16) -> KVCache:
    c = KVCache(num_layers=2, batch=1, num_kv_heads=2, head_dim=3, max_len=max_len, dtype=torch.float32, device="cpu")
    slots = torch.arange(max_len, dtype=torch.float32)
    c.k[:] = slots[None, None, None, :, None]  # row s holds the value s everywhere
    c.v[:] = -slots[None, None, None, :, None]
    c.length = length
    return c


def _rows(c: KVCache) -> list[int]:
    return c.k[0, 0, 0, : c.length, 0].long().tolist()


def test_compact_moves_kept_rows_down() -> None:
    """compact(10, [10, 12, 15]): rows 12 and 15 move to slots 11 and 12; length becomes 13; K and V alike."""
    c = _filled()
    c.compact(10, [10, 12, 15])
    assert c.length == 13
    assert _rows(c) == [*range(11), 12, 15]
    assert c.v[1, 0, 1, :13, 2].long().tolist() == [-r for r in [*range(11), 12, 15]]


def test_compact_contiguous_and_empty_keep() -> None:
    """Keeping a contiguous prefix moves nothing; keeping nothing truncates to `start`."""
    c = _filled()
    c.compact(10, [10, 11, 12])
    assert c.length == 13 and _rows(c) == list(range(13))
    c.compact(5, [])
    assert c.length == 5


def test_compact_overlapping_moves() -> None:
    """Sources overlapping destinations ([4, 5, 7, 8, 9] -> 4..8) read the old rows, not moved ones."""
    c = _filled()
    c.compact(4, [4, 5, 7, 8, 9])
    assert _rows(c) == [0, 1, 2, 3, 4, 5, 7, 8, 9]


def test_truncate_and_bad_requests() -> None:
    """truncate shortens; growing by truncate, or compacting slots outside start..length-1, is refused."""
    c = _filled()
    c.truncate(7)
    assert c.length == 7
    with pytest.raises(ValueError):
        c.truncate(8)
    with pytest.raises(ValueError):
        c.compact(3, [2, 4])
    with pytest.raises(ValueError):
        c.compact(3, [3, 7])
    assert c.is_trimmable()


def test_model_appends_at_length_and_refuses_overflow(tiny_model: LlamaModel) -> None:
    """A forward writes its rows at length .. length+T-1; asking for more rows than the cache holds raises."""
    cache = tiny_model.new_cache(batch=1, length=8)
    with torch.inference_mode():
        tiny_model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache)
        assert cache.length == 3
        with pytest.raises(ValueError, match="KV cache"):
            tiny_model(torch.tensor([[1] * 6]), torch.arange(3, 9)[None], cache)


# ------------------------------------------------------------------ rollback during generation


class RollbackChecker:
    """Wraps KVCache.compact and the drafter's observe to check every step of a generation.

    At compact: snapshot the rows at the kept slots (what the verify forward wrote) and the rows before
    `start`; after it, the rows at start.. must be those snapshots bitwise, the rows before unchanged.
    At observe (right after compact): the cache must be allclose to a plain forward over the committed
    tokens but the pending one (the bonus token)."""

    def __init__(self, model: LlamaModel, prompt: list[int], atol: float, monkeypatch: pytest.MonkeyPatch):
        self.model, self.atol = model, atol
        self.committed = list(prompt)
        self.compactions = 0
        self.moved = 0  # compactions that moved rows (the accepted path was not already contiguous)
        self.max_diff = 0.0
        original = KVCache.compact
        checker = self

        def compact(cache: KVCache, start: int, keep: list[int]) -> None:
            keep = list(keep)
            idx = torch.tensor(keep)
            kept_k, kept_v = cache.k[:, :, :, idx].clone(), cache.v[:, :, :, idx].clone()
            before_k, before_v = cache.k[:, :, :, :start].clone(), cache.v[:, :, :, :start].clone()
            original(cache, start, keep)
            n = len(keep)
            assert cache.length == start + n
            assert torch.equal(cache.k[:, :, :, start : start + n], kept_k), "kept K rows are not the verify forward's"
            assert torch.equal(cache.v[:, :, :, start : start + n], kept_v), "kept V rows are not the verify forward's"
            assert torch.equal(cache.k[:, :, :, :start], before_k) and torch.equal(cache.v[:, :, :, :start], before_v)
            checker.compactions += 1
            checker.moved += keep != list(range(start, start + n))

        monkeypatch.setattr(KVCache, "compact", compact)

    def observe(self, engine: Engine, result: Any) -> None:
        self.committed.extend(result.verdict.new_tokens)
        cache = engine.cache
        assert cache is not None
        n = len(self.committed) - 1  # the last committed token is pending: not in the cache
        assert cache.length == n
        fresh = self.model.new_cache(batch=1, length=n)
        with torch.inference_mode():
            self.model(torch.tensor([self.committed[:-1]]), torch.arange(n)[None], fresh, hidden_only=True)
        for got, want in ((cache.k[:, :, :, :n], fresh.k), (cache.v[:, :, :, :n], fresh.v)):
            diff = (got - want).abs().max().item()
            self.max_diff = max(self.max_diff, diff)
            assert diff <= self.atol, f"cache differs from a rebuild by {diff:.2e} after {self.compactions} compactions"


def _checked_run(
    model: LlamaModel,
    prompt: list[int],
    params: SamplingParams,
    n: int,
    atol: float,
    monkeypatch: pytest.MonkeyPatch,
    drafter: Drafter | None = None,
    **options: Any,
) -> tuple[list[int], Any, RollbackChecker]:
    checker = RollbackChecker(model, prompt, atol, monkeypatch)
    engine = Engine(model)
    drafter = drafter or make_drafter("_random-tree", **options)
    observe = drafter.observe

    def observe_and_check(result: Any) -> None:
        checker.observe(engine, result)
        observe(result)

    drafter.observe = observe_and_check  # type: ignore[method-assign]
    out, stats = run_engine(model, prompt, "_random-tree", params, n, engine=engine, drafter=drafter)
    return out, stats, checker


class OracleTree(Drafter):
    """Greedy only: knows the reference continuation and hides it in a random tree. At each level the
    true token sits at a random place among 0-3 decoy siblings, so accepted paths are rarely contiguous
    and compaction has rows to move; depth 1-4."""

    def __init__(self, reference: list[int], seed: int):
        super().__init__(NoOptions())
        self.reference = reference
        self.g = torch.Generator().manual_seed(seed)

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (), generator=self.g))

    def propose(self, ctx: DraftContext) -> Proposal:
        done = len(ctx.tokens) - ctx.prompt_len  # tokens emitted so far
        truth = self.reference[done : done + 1 + self._randint(4)]
        tokens: list[int] = []
        parents: list[int] = []
        parent = -1
        for t in truth:
            decoys = self._randint(4)
            place = self._randint(decoys + 1)
            here = -1
            for k in range(decoys + 1):
                if k == place:
                    here = len(tokens)
                    tokens.append(t)
                else:
                    tokens.append((t + 1 + self._randint(ctx.vocab_size - 1)) % ctx.vocab_size)
                parents.append(parent)
            parent = here
        return Proposal(tokens, parents)


@pytest.mark.parametrize(
    ("seed", "params"),
    [
        (0, SamplingParams(0.0)),
        (1, SamplingParams(0.0)),
        (2, SamplingParams(1.0, seed=3)),
        (3, SamplingParams(1.0, seed=4, sampler="rejection")),
    ],
)
def test_rollback_random_trees_tiny(tiny_model: LlamaModel, seed: int, params: SamplingParams, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random trees on the tiny model, greedy and sampling: every compaction keeps exactly the verify
    forward's rows, and the cache always equals a rebuild (within fp32 width rounding)."""
    prompt = [4, 1, 7, 9, 12, 2, 4, 1, 7, 9]
    out, stats, chk = _checked_run(tiny_model, prompt, params, 60, 1e-5, monkeypatch, seed=seed, nodes=12, context_p=0.9)
    assert chk.compactions == stats.steps and len(out) == 60
    assert chk.moved > 0 and stats.accepted > 0, "the fuzz never moved a row: it tested nothing"


def test_rollback_random_trees_tiny_mha_and_wide_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with plain multi-head attention and a different head layout (no GQA)."""
    model = make_tiny_model(tiny_config(num_heads=2, num_kv_heads=2, head_dim=16, num_layers=3), seed=5)
    prompt = [3, 3, 8, 1, 3, 3, 8]
    _, stats, chk = _checked_run(model, prompt, SamplingParams(0.0), 40, 1e-5, monkeypatch, nodes=10, context_p=0.95)
    assert chk.moved > 0 and chk.compactions == stats.steps


def test_rollback_oracle_tree_tiny(tiny_model: LlamaModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree that always holds the greedy continuation at a random sibling place: long accepted paths,
    rows moved at most steps, output identical to ar."""
    prompt = [4, 1, 7, 9, 12, 2]
    ref, _ = run_engine(tiny_model, prompt, "ar", SamplingParams(0.0), 40)
    out, stats, chk = _checked_run(tiny_model, prompt, SamplingParams(0.0), 40, 1e-5, monkeypatch, drafter=OracleTree(ref, 0))
    assert out == ref and chk.moved > stats.steps // 3 and stats.mat > 1.5


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 19])
def test_rollback_smollm2(smollm2: Any, ar_refs: Any, which: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """On SmolLM2 (fp32) with real prompts, 24 new tokens: random trees hiding ar's continuation at random
    sibling places (so accepted rows move), then `_random-tree` itself; every compaction checked."""
    ref = ar_refs[which]
    n = min(24, len(ref.token_ids))
    oracle = OracleTree(ref.token_ids, which)
    out, stats, chk = _checked_run(smollm2.model, ref.prompt_ids, SamplingParams(0.0), n, 1e-3, monkeypatch, drafter=oracle)
    print(f"\nprompt {which}, oracle tree: {chk.compactions} compactions, {chk.moved} moved rows, max |Δ| vs rebuild {chk.max_diff:.2e}")
    assert out == ref.token_ids[:n]
    assert chk.compactions == stats.steps and chk.moved > 0
    _, stats, chk = _checked_run(smollm2.model, ref.prompt_ids, SamplingParams(0.0), 12, 1e-3, monkeypatch, nodes=10, context_p=0.9)
    print(f"prompt {which}, _random-tree: {chk.compactions} compactions, max |Δ| vs rebuild {chk.max_diff:.2e}")
    assert chk.compactions == stats.steps
