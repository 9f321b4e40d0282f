"""Row-invariant forwards on the CPU in bf16 and fp32 (issue 10; DESIGN.md, "How we know a method is lossless", 1).

Invariant (bf16 where the CPU multiplies bf16 natively, so that `--dtype auto` runs bf16 there; fp32, what it
runs on every other CPU, everywhere): a row's logits depend only on its token, its position and the keys it
may see — not on how many rows share the forward, where its tree ancestors sit in it, or which block of the
cache it falls in. So node j of a verify forward (any width
1..64, any tree shape) equals, bit for bit, the 1-row step that `ar` runs at the same position after the
same tokens, and the K/V rows the engine keeps after a rollback are those `ar` would have written.

The model has SmolLM2-135M's shapes (hidden 576, 9 query / 3 kv heads of 64, MLP 1536, vocabulary 49152:
the kernels that would round differently are chosen by shape) with random weights and 2 layers.
"""

from __future__ import annotations

import random

import pytest
import torch

from fastdecode.api import cpu_has_fast_bf16
from fastdecode.engine import tree_mask
from fastdecode.models.llama import ATTN_BLOCK, LlamaModel, ModelConfig, position_plan, row_invariant

SMOLLM2_SHAPES = ModelConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=2,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position=2048,
    tie_embeddings=True,
)


NATIVE_BF16 = pytest.mark.skipif(
    not cpu_has_fast_bf16(), reason="bit equality is promised where the CPU multiplies bf16 natively (AVX-512-BF16/AMX)"
)


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)  # the thread split is one of the things that may not change a row


# bf16 where the CPU multiplies it natively (`--dtype auto` picks it there); fp32 on every CPU (the default
# where bf16 is emulated): both must keep a row's bits at every width
DTYPES = [pytest.param(torch.bfloat16, marks=NATIVE_BF16, id="bf16"), pytest.param(torch.float32, id="fp32")]


@pytest.fixture(scope="module", params=DTYPES)
def model(request: pytest.FixtureRequest) -> LlamaModel:
    torch.manual_seed(0)
    m = LlamaModel(SMOLLM2_SHAPES).eval().to(request.param)
    m.fuse_projections()
    return m


def _prefill(model: LlamaModel, ids: torch.Tensor, n: int, length: int, whole_blocks: bool = True) -> object:
    """A cache of `length` rows, rounded up to whole attention blocks as the engine allocates it (then chains
    read the cache as it lies, trees gather: the two must agree), or not (chains gather too)."""
    if whole_blocks:
        length = -(-length // ATTN_BLOCK) * ATTN_BLOCK
    cache = model.new_cache(1, length)
    model(ids[:, :n], torch.arange(n)[None], cache, hidden_only=True)
    return cache


def _ar_rows(model: LlamaModel, cache: object, tokens: torch.Tensor, positions: list[int]) -> list[torch.Tensor]:
    """1-row steps over `tokens` at `positions` (a path), from the cache as it is: each step's logits."""
    out = []
    for i, p in enumerate(positions):
        logits, _ = model(tokens[:, i : i + 1], torch.tensor([[p]]), cache)  # type: ignore[arg-type]
        out.append(logits[0, 0])
    return out


def test_the_row_invariant_path_is_taken() -> None:
    assert row_invariant(torch.zeros(1, 8, dtype=torch.bfloat16), 64)
    assert row_invariant(torch.zeros(1, 8, dtype=torch.float32), 64)  # fp32: products of fixed tiles
    assert not row_invariant(torch.zeros(1, 8, dtype=torch.float16), 64)  # fp16 on a CPU: rounds by width
    assert not row_invariant(torch.zeros(1, 8, dtype=torch.bfloat16), 1000)  # long prefill: ordinary kernels


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 23, 64])
def test_fp32_tiles_give_a_row_the_bits_of_its_own_tile(rows: int) -> None:
    """fp32: MKL's sgemm sums a row in an order that depends on how many rows share the product, so every
    decode-path product runs on zero-padded tiles of FP32_TILE rows (two at once where the probe allows): a
    row's bits are those of a tile holding it alone, wherever it sits and whatever the other rows hold."""
    from fastdecode.models.llama import FP32_TILE, in_tiles, narrow_product

    g = torch.Generator().manual_seed(rows)
    for out, inner in [(960, 576), (576, 1536), (49152, 576)]:
        w = torch.randn(out, inner, generator=g) / inner**0.5
        x = torch.randn(1, rows, inner, generator=g)
        y = narrow_product(x, w)
        assert y.is_contiguous()  # row-major, as the 1-row step's (the elementwise ops after it vectorise alike)
        for r in range(rows):
            alone = torch.zeros(FP32_TILE, inner)
            alone[0] = x[0, r]
            assert torch.equal(y[0, r], (w @ alone.T).T[0]), (out, inner, rows, r)
    a = torch.randn(2, 3, rows, 64, generator=g)  # attention's products: tiles along the rows of the left operand
    v = torch.randn(2, 3, 64, 64, generator=g)
    tiled = in_tiles(a, lambda t: t @ v)
    assert all(torch.equal(tiled[..., r : r + 1, :], in_tiles(a[..., r : r + 1, :], lambda t: t @ v)) for r in range(rows))


CHAIN_CASES = [(5, True), (ATTN_BLOCK - 20, True), (3 * ATTN_BLOCK + 7, True), (ATTN_BLOCK - 20, False)]


@pytest.mark.parametrize(("prefix", "whole_blocks"), CHAIN_CASES)
def test_chain_rows_bitwise_equal_the_1_row_step_at_every_width(model: LlamaModel, prefix: int, whole_blocks: bool) -> None:
    """Widths 1..64 after a prompt of `prefix` tokens (the chains cross attention blocks): every row equals
    the 1-row step at its position, bit for bit."""
    ids = torch.randint(0, SMOLLM2_SHAPES.vocab_size, (1, prefix + 64), generator=torch.Generator().manual_seed(prefix))
    with torch.inference_mode():
        cache = _prefill(model, ids, prefix, prefix + 128, whole_blocks)
        ref = _ar_rows(model, cache, ids[:, prefix:], list(range(prefix, prefix + 64)))
        bad = []
        for width in range(1, 65):
            cache.truncate(prefix)  # type: ignore[attr-defined]
            logits, _ = model(ids[:, prefix : prefix + width], torch.arange(prefix, prefix + width)[None], cache)
            bad += [(width, j) for j in range(width) if not torch.equal(logits[0, j], ref[j])]
    assert not bad, f"rows that differ from the 1-row step (width, row): {bad[:10]}"


def _random_tree(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(-1, j) for j in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_tree_nodes_bitwise_equal_their_path_and_kept_rows_equal_ar(model: LlamaModel, seed: int) -> None:
    """A random tree of 3..63 nodes after a random prompt: each node's logits equal the 1-row steps along its
    path; after keeping one path (compact), the cache rows equal those the 1-row steps wrote."""
    rng = random.Random(seed)
    prefix = rng.choice([9, ATTN_BLOCK - 3, 2 * ATTN_BLOCK + 30])
    n = rng.choice([3, 15, 40, 63])
    parents = _random_tree(rng, n)
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    ids = torch.randint(0, SMOLLM2_SHAPES.vocab_size, (1, prefix + 1 + n), generator=torch.Generator().manual_seed(seed))
    rows = ids[:, prefix:]  # the pending token, then the nodes
    mask = tree_mask(parents)
    with torch.inference_mode():
        cache = _prefill(model, ids, prefix, prefix + 128)
        tree_logits, _ = model(rows, torch.tensor([[prefix, *(prefix + d for d in depth)]]), cache, None if mask is None else mask[None])
        tree_k, tree_v = cache.k.clone(), cache.v.clone()  # type: ignore[attr-defined]
        bad = []
        for j in rng.sample(range(n), min(n, 12)):
            path = [j]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            path_rows = [0, *(1 + i for i in reversed(path))]
            cache.truncate(prefix)  # type: ignore[attr-defined]
            ar = _ar_rows(model, cache, rows[:, path_rows], list(range(prefix, prefix + len(path_rows))))
            if not torch.equal(ar[-1], tree_logits[0, 1 + j]):
                bad.append(j)
        assert not bad, f"tree nodes whose logits differ from their path's 1-row steps: {bad}"
        # rollback: keep the last path checked; its rows, compacted, are the 1-row steps' rows
        ar_k, ar_v = cache.k[:, :, :, : prefix + len(path_rows)].clone(), cache.v[:, :, :, : prefix + len(path_rows)].clone()  # type: ignore[attr-defined]
        cache.k.copy_(tree_k)  # type: ignore[attr-defined]
        cache.v.copy_(tree_v)  # type: ignore[attr-defined]
        cache.length = prefix + 1 + n  # type: ignore[attr-defined]
        cache.compact(prefix, [prefix + r for r in path_rows])  # type: ignore[attr-defined]
        assert torch.equal(cache.k[:, :, :, : cache.length], ar_k)  # type: ignore[attr-defined]
        assert torch.equal(cache.v[:, :, :, : cache.length], ar_v)  # type: ignore[attr-defined]


def test_narrow_product_does_not_depend_on_the_layout_of_its_input() -> None:
    """An elementwise op on a narrow product's output (a transposed view) keeps its column-major layout, so the
    MLP's down product of a verify gets a column-major input where the 1-row step's is row-major. On an AMD EPYC
    without native bf16, oneDNN then rounded some rows differently (row 22 of a 23-row chain): the product must
    read its input row-major whatever the layout, so a row's bits cannot depend on it."""
    from fastdecode.models.llama import narrow_product

    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(1536, 576, generator=g) * 0.05).to(torch.bfloat16)
    w2 = (torch.randn(576, 1536, generator=g) * 0.05).to(torch.bfloat16)
    for rows in (1, 2, 23, 64):  # up to one chunk of LINEAR_CHUNK rows (more are concatenated: row-major)
        x = torch.randn(1, rows, 576, generator=g).to(torch.bfloat16)
        act = torch.nn.functional.silu(narrow_product(x, w1))  # (1, rows, 1536), column-major for rows > 1
        assert rows == 1 or not act.is_contiguous()
        out = narrow_product(act, w2)
        assert torch.equal(out.view(torch.int16), narrow_product(act.contiguous(), w2).view(torch.int16))


def test_plan_refuses_rows_that_are_not_tree_paths() -> None:
    """A row that sees two rows at one position (or skips one) has no position order: the ordinary attention."""
    pos = torch.tensor([[10, 11, 11]])
    both = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 1, 1]]], dtype=torch.bool)  # row 2 sees both rows at 11
    assert position_plan(pos, both, 10, rep=3) is None
    gap = torch.tensor([[[1, 0, 0], [0, 1, 0], [1, 0, 1]]], dtype=torch.bool)  # row 1 misses the pending row
    assert position_plan(pos, gap, 10, rep=3) is None
    tree = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    plan = position_plan(pos, tree, 10, rep=3)
    assert plan is not None and not plan.chain and plan.prefix == 0
    assert plan.slots[0, 2, 10:12].tolist() == [10, 12]  # row 2 reads position 11 from its own slot


def test_decoding_to_the_last_slot_of_a_cache_of_any_length(model: LlamaModel) -> None:
    """A cache whose length is no multiple of the attention block (a capped context, a caller's own cache):
    steps and trees run to its very last slot, and a 3-row chain there equals its 1-row steps."""
    ids = torch.randint(0, SMOLLM2_SHAPES.vocab_size, (1, 100), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        cache = _prefill(model, ids, 97, 100, whole_blocks=False)
        assert cache.max_len == 100  # type: ignore[attr-defined]
        ref = _ar_rows(model, cache, ids[:, 97:], [97, 98, 99])  # to the last slot
        cache.truncate(97)  # type: ignore[attr-defined]
        logits, _ = model(ids[:, 97:], torch.arange(97, 100)[None], cache)
        assert all(torch.equal(logits[0, j], ref[j]) for j in range(3))
        cache.truncate(97)  # type: ignore[attr-defined]
        tree = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)  # two children of the pending row
        logits, _ = model(ids[:, 97:], torch.tensor([[97, 98, 98]]), cache, tree)
        assert torch.equal(logits[0, 1], ref[1])
