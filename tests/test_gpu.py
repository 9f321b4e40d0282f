"""The CUDA-graph runner computes what the model computes.

The static forward (padded widths, span buckets, scratch slots, the tree mask as a bias) is checked against
`LlamaModel` on a tiny random model in fp32: eagerly on the CPU (what CI runs), and captured in CUDA graphs
on a GPU (skipped without one; scripts/gpu.sh runs them on the device).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from conftest import run_engine

from fastdecode import cuda_graphs
from fastdecode.cuda_graphs import GraphRunner, span_bucket, width_bucket
from fastdecode.drafters import make_drafter
from fastdecode.engine import Engine, GenerationStats, StopConditions
from fastdecode.models.llama import LlamaModel, ModelConfig
from fastdecode.sampling import SamplingParams

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))]
CFG = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16,
                  max_position=600, tie_embeddings=True)


def tiny(device: str, cfg: ModelConfig = CFG) -> LlamaModel:
    torch.manual_seed(0)
    m = LlamaModel(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.to(device).eval()


def test_buckets() -> None:
    assert [width_bucket(t) for t in (1, 2, 3, 16, 17, 64, 65, 999, 2048)] == [1, 2, 4, 16, 32, 64, 128, 1024, 2048]
    assert span_bucket(1, 4096) == 256 and span_bucket(257, 4096) == 512 and span_bucket(5000, 4096) == 4096


@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_model(device: str) -> None:
    model = tiny(device)
    runner = GraphRunner(model, compile=False, verbose=False)
    ref, got = model.new_cache(1, 600), runner.new_target_cache(1, 600)
    gen = torch.Generator().manual_seed(0)

    def both(ids, pos, mask=None, **kw):
        with torch.no_grad():
            a = model(ids.to(device), pos.to(device), ref, None if mask is None else mask.to(device), **kw)
            b = runner(ids, pos, got, mask, **kw)
        assert ref.length == got.length
        return a, b

    (la, ha), (lb, hb) = both(torch.randint(0, 101, (1, 300), generator=gen), torch.arange(300)[None])  # prefill, width 512
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hb, ha, atol=1e-4, rtol=1e-4)
    # a tree: node 1 and 2 are siblings under the pending token, node 3 is a child of node 2
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)[None]
    (la, _), (lb, _) = both(torch.randint(0, 101, (1, 4), generator=gen), torch.tensor([[300, 301, 301, 302]]), mask)
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
    n = ref.length
    torch.testing.assert_close(got.k[:, :, :, :n], ref.k[:, :, :, :n], atol=1e-5, rtol=1e-5)
    ref.compact(300, [300, 302, 303])
    got.compact(300, [300, 302, 303])
    for T in (1, 3, 9, 17, 64, 100):  # every decode bucket, and a width past them (a prefill chunk)
        s = ref.length
        (la, _), (lb, _) = both(torch.randint(0, 101, (1, T), generator=gen), torch.arange(s, s + T)[None], num_logits=min(T, 5))
        torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
    (_, ha), (lb, hb) = both(torch.randint(0, 101, (1, 2), generator=gen), torch.arange(ref.length, ref.length + 2)[None], hidden_only=True)
    assert lb is None
    torch.testing.assert_close(hb, ha, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_in_chunks(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_graphs, "PREFILL_WIDTHS", (128,))  # chunks of 128 rows
    model = tiny(device)
    runner = GraphRunner(model, compile=False, verbose=False)
    ref, got = model.new_cache(1, 600), runner.new_target_cache(1, 600)
    ids = torch.randint(0, 101, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la, _ = model(ids.to(device), torch.arange(300, device=device)[None], ref)
        lb, _ = runner(ids, torch.arange(300)[None], got)
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
    assert got.length == 300


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "method,options",
    [("ar", {}), ("pld", {}), ("pld", {"branches": 3}), ("_self", {}), ("_random-tree", {}), ("layerskip", {"layers": (0, 2)})],
)
def test_engine_same_tokens(device: str, method: str, options: dict) -> None:
    """Greedy and seeded sampling give the same tokens through the runner as through the model (fp32); `_self`
    drafts with the target in a cache of its own, which must not share the runner's storage; `layerskip`'s
    partial forwards run in the runner's layer-subset cache and graphs."""
    model = tiny(device)
    runner = GraphRunner(model, compile=False, verbose=False)
    prompt = [int(x) for x in torch.randint(0, 20, (40,), generator=torch.Generator().manual_seed(2))] * 2
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=3)):
        outs = []
        for target in (model, runner):
            st = GenerationStats()
            steps = Engine(target).generate(prompt, make_drafter(method, **options), params, StopConditions(60), st)
            outs.append([t for piece in steps for t in piece])
        assert outs[0] == outs[1]


@pytest.mark.parametrize("device", DEVICES)
def test_layer_subset_forward_matches_model(device: str) -> None:
    """`layers=` forwards into a cache from `runner.new_cache(..., layers=n)` run the static path (graphs on a GPU)
    and compute what the model computes with those layers; the greedy tokens come from inside the forward."""
    model = tiny(device)
    runner = GraphRunner(model, compile=False, verbose=False)
    layers = (0, 2)
    ref, got = model.new_cache(1, 600, layers=2), runner.new_cache(1, 600, layers=2)
    assert got.k.shape[0] == 2 and runner.new_cache(1, 600, layers=2).k is got.k  # one storage per layer count
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for T in (70, 1, 3, 1):  # a prefill chunk, then decode widths
            s = ref.length
            ids, pos = torch.randint(0, 101, (1, T), generator=gen), torch.arange(s, s + T)[None]
            la, _ = model(ids.to(device), pos.to(device), ref, layers=layers)
            lb, _ = runner(ids, pos, got, layers=layers)
            torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
            assert got.length == ref.length
            if T <= 64:
                assert runner.last_key is not None and runner.last_key[4] == layers
                assert runner.greedy_tokens(T) == la[0].argmax(-1).tolist()
    n = ref.length
    torch.testing.assert_close(got.k[:, :, :, :n], ref.k[:, :, :, :n], atol=1e-5, rtol=1e-5)


def test_tuning_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """One launch per projection for every decode width: a tuning file can change the launch, never make it
    differ between widths (which would break bit equality of the AR step and a verify round)."""
    over = '{"decode": {"down": {"block_n": 4, "block_k": 2048, "dot": false}}}'
    t = cuda_graphs.load_tuning(over)
    assert t["decode"]["down"] == {**cuda_graphs.DEFAULT_TUNING["decode"]["down"], "block_n": 4, "block_k": 2048, "dot": False}
    assert set(t) == {"decode"}
    monkeypatch.setenv("FASTDECODE_TUNING", over)
    runner = GraphRunner(tiny("cpu"), compile=False, verbose=False)
    assert runner._linear("down")["block_n"] == 4
    # a CUDA-core launch whose K block is shorter than the projection's K gives way to tensor cores
    monkeypatch.setenv("FASTDECODE_TUNING", '{"decode": {"gu": {"block_n": 4, "block_k": 32, "dot": false}}}')
    runner = GraphRunner(tiny("cpu"), compile=False, verbose=False)  # hidden 64 > 32
    assert runner._linear("gu")["dot"] is True
    f = tmp_path / "t.json"
    f.write_text('{"narrow": {"lm": {"block_n": 64}}}')  # a file from before issue 10: narrow is read as decode
    monkeypatch.setenv("FASTDECODE_TUNING", str(f))
    assert cuda_graphs.load_tuning()["decode"]["lm"]["block_n"] == 64
    for bad, msg in (('{"decode": {"mlp": {}}}', "unknown linear 'mlp'"), (str(tmp_path / "missing.json"), "cannot read"),
                     ('{"rows": 1}', "expected the key decode"), ('{"decode": {"o": {"bn": 4}}}', "unknown launch keys"),
                     ('{"decode": [1]}', "must map projections"), ('{"narrow": {"o": 3}}', "must map projections"),
                     ('{"wide": {"lm": {"block_n": 64}}}', "no `wide` group")):
        with pytest.raises(ValueError, match=msg):
            cuda_graphs.load_tuning(bad)


def test_tree_forward_rows_must_be_paths() -> None:
    """The fused attention reads each row's keys by position: a mask that is not a set of tree paths is refused."""
    runner = GraphRunner(tiny("cpu"), compile=False, verbose=False)
    cache = runner.new_target_cache(1, 600)
    both = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 1, 1]]], dtype=torch.bool)  # row 2 sees two rows at position 11
    with torch.no_grad(), pytest.raises(ValueError, match="tree paths"):
        runner(torch.tensor([[1, 2, 3]]), torch.tensor([[10, 11, 11]]), cache, both)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_graphs_are_captured_once_and_replayed() -> None:
    model = tiny("cuda")
    runner = GraphRunner(model, compile=False, verbose=False)
    prompt = list(range(1, 50))
    for _ in range(2):
        st = GenerationStats()
        for _ in Engine(runner).generate(prompt, make_drafter("pld"), SamplingParams(), StopConditions(40), st):
            pass
    assert st.capture_s == 0.0  # the second generation found every graph it needed
    assert all(g.graph is not None for g in runner.graphs.values())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_compiled_runner_close_to_model() -> None:
    """torch.compile fuses RMSNorm/RoPE/SiLU: fp32 results stay within rounding of the model's."""
    model = tiny("cuda")
    runner = GraphRunner(model, compile=True, verbose=False)
    ref, got = model.new_cache(1, 600), runner.new_target_cache(1, 600)
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        la, _ = model(ids.cuda(), torch.arange(40, device="cuda")[None], ref)
        lb, _ = runner(ids, torch.arange(40)[None], got)
        for T in (1, 16):
            s = ref.length
            la, _ = model(ids[:, :T].cuda(), torch.arange(s, s + T, device="cuda")[None], ref)
            lb, _ = runner(ids[:, :T], torch.arange(s, s + T)[None], got)
            torch.testing.assert_close(lb, la, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 5, 16, 64])
@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("small", [False, True])
def test_triton_kernels_close_to_model(T: int, tree: bool, small: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused Triton decode forward (bf16) is as close to the fp32 model as the bf16 model itself is, with
    the tensor-core kernels and with the CUDA-core ones (narrow column blocks, RoPE heads split in programs;
    64 rows run the wide tensor-core launch either way)."""
    if small:
        cc = {"block_n": 4, "block_k": 256, "dot": False, "num_warps": 2, "num_stages": 2}
        monkeypatch.setenv("FASTDECODE_TUNING", json.dumps({"narrow": {k: cc for k in cuda_graphs.LINEARS}}))
    cfg = ModelConfig(vocab_size=301, hidden_size=128, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=64,
                      max_position=600, tie_embeddings=True)
    exact = tiny("cuda", cfg)
    with torch.no_grad():
        for p in exact.parameters():
            p.mul_(0.3)
    model = LlamaModel(cfg).cuda().eval()
    model.load_state_dict(exact.state_dict())
    model = model.to(torch.bfloat16)
    runner = GraphRunner(model, kernels="triton", verbose=False)
    assert runner.kernels == "triton" and (runner._linear("down")["dot"] is False) == small
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 301, (1, 200), generator=gen)
    new = torch.randint(0, 301, (1, T), generator=gen)
    pos = torch.arange(200, 200 + T)[None]
    mask = None
    if tree:
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        mask[T // 2 :, 1 : T // 2] = False  # the second half hangs off the first row only
        mask = mask[None]
    out = []
    with torch.no_grad():
        for target in (exact, model, runner):
            cache = runner.new_target_cache(1, 600) if target is runner else target.new_cache(1, 600)
            dev = "cpu" if target is runner else "cuda"
            target(ids.to(dev), torch.arange(200, device=dev)[None], cache)
            logits, _ = target(new.to(dev), pos.to(dev), cache, None if mask is None else mask.to(dev))
            out.append(logits.float())
    ref = out[0]
    err_model = ((out[1] - ref).norm() / ref.norm()).item()
    err_runner = ((out[2] - ref).norm() / ref.norm()).item()
    assert err_runner < 2 * err_model + 5e-3, (err_runner, err_model)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dot", [True, False])
def test_narrow_linears_row_invariant(dot: bool) -> None:
    """A row's output from a 64-row launch equals, bit for bit, its output alone: the AR step and a verify round
    of any width see the same numbers, so greedy speculative decoding in bf16 stays token-identical."""
    from fastdecode import triton_kernels as tk

    g = torch.Generator(device="cuda").manual_seed(0)
    K, N, hd, nq, nkv = 256, 96, 64, 4, 2
    bf = torch.bfloat16
    cfg = {"block_n": 16, "block_k": 256, "dot": dot, "num_warps": 4, "num_stages": 3}
    if not dot:
        cfg["block_n"] = 4
    a = torch.randn(64, K, device="cuda", dtype=bf, generator=g)
    w = torch.randn(2 * N, K, device="cuda", dtype=bf, generator=g) * 0.05
    wq = torch.randn((nq + 2 * nkv) * hd, K, device="cuda", dtype=bf, generator=g) * 0.05
    cos, sin = torch.randn(80, hd, device="cuda"), torch.randn(80, hd, device="cuda")  # positions up to 66
    pos = torch.arange(64, device="cuda") + 3

    def run(rows: slice) -> list[torch.Tensor]:
        x = a[rows]
        M = x.shape[0]
        outs = [torch.zeros(M, N, device="cuda", dtype=bf) for _ in range(2)]
        tk.fused_linear(x, w[:N], outs[0], tk.STORE, norm_eps=1e-5, **cfg)
        tk.fused_linear(x, w, outs[1], tk.SILU, norm_eps=1e-5, **cfg)
        res = torch.ones(M, 2 * N, device="cuda", dtype=bf)
        tk.fused_linear(x, w, res, tk.RESIDUAL, res=res, **cfg)
        q = torch.zeros(M, nq, hd, device="cuda", dtype=bf)
        kc, vc = torch.zeros(nkv, 64, hd, device="cuda", dtype=bf), torch.zeros(nkv, 64, hd, device="cuda", dtype=bf)
        slots = torch.arange(M, device="cuda")
        tk.fused_linear(x, wq, q, tk.ROPE, norm_eps=1e-5, rope=(cos, sin, pos[rows], slots, kc, vc, nq, nkv, hd), **cfg)
        return [*outs, res, q, kc[:, :M].transpose(0, 1), vc[:, :M].transpose(0, 1)]

    together = run(slice(0, 64))
    for r in (0, 5, 15, 16, 40, 63):
        alone = run(slice(r, r + 1))
        for t, s1 in zip(together, alone, strict=True):
            assert torch.equal(t[r], s1[0])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefix", [7, 200])
def test_runner_rows_bitwise_equal_the_1_row_step(prefix: int) -> None:
    """Issue 10 on the GPU: through the runner's fused kernels and CUDA graphs in bf16, every row of a chain of
    any width 1..64, and every node of random trees, equals bit for bit the 1-row step at its position (the
    AR step), with the default launches of this GPU — tuned on another GPU or not."""
    import random

    from fastdecode.engine import tree_mask

    cfg = ModelConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9, num_kv_heads=3,
                      head_dim=64, max_position=1024, tie_embeddings=True)
    model = tiny("cuda", cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1)
    runner = GraphRunner(model.to(torch.bfloat16), kernels="triton", verbose=False)
    assert runner.kernels == "triton"
    cache = runner.new_target_cache(1, 1024)
    ids = torch.randint(0, cfg.vocab_size, (1, prefix + 64), generator=torch.Generator().manual_seed(prefix))

    def step_rows(tokens: torch.Tensor, positions: list[int]) -> list[torch.Tensor]:
        out = []
        for i, p in enumerate(positions):
            lg, _ = runner(tokens[:, i : i + 1], torch.tensor([[p]]), cache)
            out.append(lg[0, 0].clone())
        return out

    with torch.no_grad():
        runner(ids[:, :prefix], torch.arange(prefix)[None], cache)
        ref = step_rows(ids[:, prefix:], list(range(prefix, prefix + 64)))
        bad = []
        for width in range(1, 65):
            cache.length = prefix
            lg, _ = runner(ids[:, prefix : prefix + width], torch.arange(prefix, prefix + width)[None], cache)
            bad += [(width, j) for j in range(width) if not torch.equal(lg[0, j], ref[j])]
        assert not bad, f"chain rows that differ from the 1-row step (width, row): {bad[:10]}"
        rng = random.Random(prefix)
        for n in (3, 15, 40, 63):
            parents = [rng.randrange(-1, j) for j in range(n)]
            depth: list[int] = []
            for p in parents:
                depth.append(1 if p < 0 else depth[p] + 1)
            rows = ids[:, prefix : prefix + 1 + n]
            cache.length = prefix
            mask = tree_mask(parents)
            lg, _ = runner(rows, torch.tensor([[prefix, *(prefix + d for d in depth)]]), cache, None if mask is None else mask[None])
            tree = lg[0].clone()
            for j in rng.sample(range(n), min(n, 6)):
                path = [j]
                while parents[path[-1]] >= 0:
                    path.append(parents[path[-1]])
                path_rows = [0, *(1 + i for i in reversed(path))]
                cache.length = prefix
                ar = step_rows(rows[:, path_rows], list(range(prefix, prefix + len(path_rows))))
                assert torch.equal(ar[-1], tree[1 + j]), f"tree of {n}: node {j} differs from its path's 1-row steps"


@pytest.mark.parametrize("device", DEVICES)
def test_sps_draft_runs_through_a_runner_of_its_own(device: str, tmp_path) -> None:
    """With a graph-runner target, `sps` wraps its draft model in a runner too (its own cache storage, its own
    graphs): greedy output stays `ar`'s, and a draft identical to the target has every draft accepted."""
    from fastdecode.drafters.sps import draft_model
    from fastdecode.models.draft import init_draft, save_draft, target_info

    model = tiny(device)
    runner = GraphRunner(model, compile=False, verbose=False)
    save_draft(init_draft(model, [0, 1, 2]), tmp_path / "same", {"target": target_info(model)}, dtype=torch.float32)
    engine = Engine(runner)  # type: ignore[arg-type]
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]

    def run(method: str, **opts):
        return run_engine(runner, prompt, method, SamplingParams(), 40, engine=engine, **opts)

    ref, _ = run("ar")
    out, stats = run("sps", draft=str(tmp_path / "same"), adaptive=False, num_draft=4)
    assert out == ref and stats.drafted > 0
    assert stats.accepted >= 0.9 * stats.drafted  # fp32 on a GPU rounds by width: a tie may reject now and then
    assert isinstance(draft_model(runner, str(tmp_path / "same")), GraphRunner)


@pytest.mark.parametrize("device", DEVICES)
def test_eagle_tree_through_a_runner_is_ar(device: str, tmp_path) -> None:
    """With a graph-runner target, `eagle` gets the runner's features (prefill and each step's rows, copied
    out of the graphs' buffers) and its tree is verified in one graph replay: greedy output stays `ar`'s."""
    from fastdecode.models.draft import init_eagle, save_draft, target_info

    model = tiny(device)
    runner = GraphRunner(model, compile=False, verbose=False)
    draft = init_eagle(model, [0])
    save_draft(draft, tmp_path / "e", {"target": target_info(model)}, dtype=torch.float32)
    engine = Engine(runner)  # type: ignore[arg-type]
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]

    def run(method: str, **opts):
        return run_engine(runner, prompt, method, SamplingParams(), 40, engine=engine, **opts)

    ref, _ = run("ar")
    for width in (1, 8):
        out, stats = run("eagle", draft=str(tmp_path / "e"), adaptive=False, num_draft=4, width=width)
        assert out == ref and stats.drafted > 0


@pytest.mark.parametrize("device", DEVICES)
def test_rsd_tree_through_a_runner_is_ar_and_samples(device: str, tmp_path) -> None:
    """With a graph-runner target, `rsd` runs its draft model eagerly in a plain cache of its own (tree masks
    over the whole cache): greedy output stays `ar`'s, the target as its own draft has nearly every path
    accepted, and the rejection sampler's per-sibling distributions live on the device the verifier reads."""
    from fastdecode.drafters.rsd import tree_size
    from fastdecode.models.draft import init_draft, save_draft, target_info

    model = tiny(device)
    runner = GraphRunner(model, compile=False, verbose=False)
    save_draft(init_draft(model, [0, 1, 2]), tmp_path / "same", {"target": target_info(model)}, dtype=torch.float32)
    engine = Engine(runner)  # type: ignore[arg-type]
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    opts = dict(draft=str(tmp_path / "same"), adaptive=False, branches=(3, 2, 1))

    ref, _ = run_engine(runner, prompt, "ar", SamplingParams(), 40, engine=engine)
    out, stats = run_engine(runner, prompt, "rsd", SamplingParams(), 40, engine=engine, **opts)
    assert out == ref and stats.drafted > 0
    assert {t.rows for t in stats.trace[:-1]} == {1 + tree_size((3, 2, 1))}
    assert stats.accepted >= 0.9 * 3 * (stats.steps - 1)  # fp32 on a GPU rounds by width: a tie may cut a path now and then
    params = SamplingParams(temperature=1.0, seed=1, sampler="rejection")
    out, stats = run_engine(runner, prompt, "rsd", params, 40, engine=engine, **opts)
    assert len(out) == 40 and stats.accepted > 0


# ------------------------------------------------------------------ many sequences in one forward (the server, issue 13)

def _bf16_runner(max_position: int = 1024, vocab_size: int = 4096) -> GraphRunner:
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_layers=2, num_heads=9, num_kv_heads=3,
                      head_dim=64, max_position=max_position, tie_embeddings=True)
    model = tiny("cuda", cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1)
    runner = GraphRunner(model.to(torch.bfloat16), kernels="triton", verbose=False)
    assert runner.kernels == "triton" and runner.batches_sequences
    return runner


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_batched_sequences_bitwise_equal_their_batch1_forwards() -> None:
    """The server's batched forward on the GPU: the verify rows of several sequences — an AR row, chains, draft
    trees, a 64-row chain, caches of different lengths — in one forward through the fused kernels give every row
    the bits of its own sequence's batch-1 forward (logits and greedy tokens), and write the same K/V rows; over
    two rounds with compaction between, in buckets of 16 to 512 rows."""
    import random

    from fastdecode.cuda_graphs import BATCH_WIDTHS, PoolKVCache
    from fastdecode.engine import tree_mask
    from fastdecode.serve.batching import Rows

    runner = _bf16_runner()
    rng = random.Random(0)
    prefixes = [7, 130, 300, 64, 1, 520]
    pool = runner.new_pool(len(prefixes))
    assert all(isinstance(c, PoolKVCache) for c in pool)
    prompts = [torch.randint(0, 4096, (1, n), generator=torch.Generator().manual_seed(n)) for n in prefixes]

    def tree(n: int) -> list[int]:
        return [rng.randrange(-1, j) for j in range(n)]

    def rows_of(i: int, width_or_parents: Any, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if isinstance(width_or_parents, int):
            T = width_or_parents
            return torch.randint(0, 4096, (1, T)), torch.arange(start, start + T)[None], None
        parents = width_or_parents
        depth: list[int] = []
        for p in parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        mask = tree_mask(parents)
        toks = torch.randint(0, 4096, (1, 1 + len(parents)))
        return toks, torch.tensor([[start, *(start + d for d in depth)]]), None if mask is None else mask[None]

    with torch.no_grad():
        for cache, prompt in zip(pool, prompts, strict=True):  # prefill by the batch-1 path, rows copied into the pool
            cache.length = 0
            runner.run_in_storage(cache, lambda rc, p=prompt: runner(p, torch.arange(p.shape[1])[None], rc))
            assert cache.length == prompt.shape[1]
        for shapes in ([1, 5, tree(12), 64, tree(40), 1], [1, 1, 1, 1, 1, 1], [tree(63), 64, 64, 64, tree(30), 64]):
            batch = []
            for i, (shp, c) in enumerate(zip(shapes, pool, strict=True)):
                toks, pos, mask = rows_of(i, shp, c.length)
                batch.append(Rows(toks, pos, c, mask))
            # references: each sequence alone, batch-1, in the runner's own cache holding the same rows
            refs = []
            for r in batch:
                c, n0 = r.cache, r.cache.length  # the rows the reference writes past n0 are rewritten by the batch

                def one(rc: Any, r: Rows = r) -> tuple[torch.Tensor, torch.Tensor]:
                    lg, hd = runner(r.tokens, r.positions, rc, r.mask)
                    return lg[0].clone(), hd[0].clone()

                lg, hd = runner.run_in_storage(c, one)
                refs.append((lg, hd, c.k[:, :, :, n0 : c.length].clone()))
                c.length = n0
            n = sum(r.width for r in batch)
            out = runner.forward_batch(batch)
            assert next(w for w in BATCH_WIDTHS if w >= n) in runner.batch_graphs
            for i, (r, (lg, hd, am), (rlg, rhd, rk)) in enumerate(zip(batch, out, refs, strict=True)):
                assert torch.equal(lg, rlg), f"sequence {i}: logits differ from its batch-1 forward"
                assert torch.equal(hd, rhd) and am == rlg.argmax(-1).tolist()
                assert torch.equal(r.cache.k[:, :, :, r.cache.length - r.width : r.cache.length], rk)
            for r in batch:  # keep the first row and the deepest path, as the engine compacts an accepted path
                c = r.cache
                s0 = c.length - r.width
                c.compact(s0, [s0, *range(s0 + 1, s0 + min(3, r.width))] if r.mask is None else [s0])
        with pytest.raises(ValueError, match="pool"):
            stray = runner.new_target_cache(1, 100)
            runner.forward_batch([Rows(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), stray, None)])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_scheduler_batches_requests_on_the_gpu_and_each_equals_batch1_ar() -> None:
    """The server's scheduler on the GPU: requests of several lossless methods at once run in batched rounds
    (one forward for all their verify rows, each sequence its own cache of the pool), and every greedy answer
    is token for token the batch-1 `ar` answer; the pool's caches come back when the requests end."""
    import threading

    from fastdecode.api import Generator
    from fastdecode.drafters import get_method, make_options
    from fastdecode.models.loader import resolve
    from fastdecode.serve.metrics import ServerMetrics
    from fastdecode.serve.protocol import RequestSpec
    from fastdecode.serve.scheduler import Job, Scheduler, wait_ready
    from fastdecode.tokenizer import Tokenizer

    path = os.environ.get("FASTDECODE_TEST_GGUF", "/root/models/smollm2.gguf")
    try:
        tok = Tokenizer(resolve(path if os.path.isfile(path) else "smollm2"))
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"needs SmolLM2's tokenizer: {e}")
    runner = _bf16_runner(max_position=512, vocab_size=49152)
    gen = Generator(runner, tok)
    prompts = [[int(x) for x in torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n))] * 2 for n in (9, 20, 33, 50)]
    methods = [("ar", {}), ("pld", {}), ("pld", {"branches": 3}), ("ngram", {}), ("lookahead", {})]
    jobs = [(p, m, o) for p in prompts for m, o in methods]
    refs = {tuple(p): gen.generate(p, "ar", max_new_tokens=40, raw=True) for p in prompts}
    sched = Scheduler(lambda: gen, ServerMetrics(), max_batch=8)
    sched.start()
    try:
        assert wait_ready(sched, 60) and sched.batching
        done = threading.Semaphore(0)
        results: list[list[Any]] = [[] for _ in jobs]
        for i, (p, m, o) in enumerate(jobs):
            spec = RequestSpec("completion", p, m, make_options(get_method(m), o), SamplingParams(), 40)

            def emit(ev: Any, i: int = i) -> None:
                results[i].append(ev)
                if ev.kind != "text":
                    done.release()

            sched.submit(Job(spec, emit))
        for _ in jobs:
            assert done.acquire(timeout=120)
    finally:
        sched.stop()
    for (p, m, o), evs in zip(jobs, results, strict=True):
        assert evs[-1].kind == "done", (m, o, evs[-1])
        text = "".join(e.text for e in evs if e.kind == "text")
        assert text == refs[tuple(p)].text, (m, o)
        assert evs[-1].usage["completion_tokens"] == len(refs[tuple(p)].token_ids)
    samples = {x.name: x.value for x in next(iter(sched.metrics.batch_sequences.collect())).samples}
    assert samples["fastdecode_batch_sequences_sum"] > samples["fastdecode_batch_sequences_count"] > 0  # batched, not in turns
    assert sched._target is not None and len(sched._target._free) == 8 and not sched._target._held


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or CUDA,
                    reason="the fused kernels on a CPU: run with TRITON_INTERPRET=1 where Triton is installed (no GPU)")
def test_batched_sequences_under_the_triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """forward_batch's logic (pool offsets, per-row starts, ancestor tables, padding, buckets) checked without a
    GPU: the fused kernels run in Triton's interpreter (fp32), and every row of a batch of sequences — chains,
    trees, AR rows, caches of different lengths, over rounds with compaction — equals its sequence's batch-1
    forward through the same kernels bit for bit, with the same K/V rows written.
    `TRITON_INTERPRET=1 pytest tests/test_gpu.py -k interpreter` (a few minutes on 2 cores)."""
    import random

    pytest.importorskip("triton")
    from fastdecode.engine import tree_mask
    from fastdecode.serve.batching import Rows

    monkeypatch.setattr(GraphRunner, "_triton_fits", staticmethod(lambda m: True))
    cfg = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                      max_position=256, tie_embeddings=True)
    runner = GraphRunner(tiny("cpu", cfg), use_graphs=False, compile=False, kernels="triton", verbose=False)
    assert runner.kernels == "triton" and runner.batches_sequences
    rng = random.Random(0)
    prefixes = [7, 40, 1, 90]
    pool = runner.new_pool(len(prefixes))

    def tree(n: int) -> list[int]:
        return [rng.randrange(-1, j) for j in range(n)]

    with torch.no_grad():
        for c, n in zip(pool, prefixes, strict=True):
            p = torch.randint(0, 101, (1, n), generator=torch.Generator().manual_seed(n))
            c.length = 0
            runner.run_in_storage(c, lambda rc, p=p: runner(p, torch.arange(p.shape[1])[None], rc))
        for shapes in ([1, 5, tree(6), 3], [1, 1, 1, 1], [tree(9), 17, 1, tree(4)]):
            batch = []
            for shp, c in zip(shapes, pool, strict=True):
                s0 = c.length
                if isinstance(shp, int):
                    batch.append(Rows(torch.randint(0, 101, (1, shp)), torch.arange(s0, s0 + shp)[None], c, None))
                    continue
                depth: list[int] = []
                for q in shp:
                    depth.append(1 if q < 0 else depth[q] + 1)
                mask = tree_mask(shp)
                batch.append(Rows(torch.randint(0, 101, (1, 1 + len(shp))), torch.tensor([[s0, *(s0 + d for d in depth)]]), c,
                                  None if mask is None else mask[None]))
            refs = []
            for r in batch:
                c, n0 = r.cache, r.cache.length

                def one(rc: Any, r: Rows = r) -> tuple[torch.Tensor, torch.Tensor]:
                    lg, hd = runner(r.tokens, r.positions, rc, r.mask)
                    return lg[0].clone(), hd[0].clone()

                lg, hd = runner.run_in_storage(c, one)
                refs.append((lg, hd, c.k[:, :, :, n0 : c.length].clone()))
                c.length = n0
            for r, (lg, hd, greedy), (rlg, rhd, rk) in zip(batch, runner.forward_batch(batch), refs, strict=True):
                assert torch.equal(lg, rlg) and torch.equal(hd, rhd) and greedy == rlg.argmax(-1).tolist()
                assert torch.equal(r.cache.k[:, :, :, r.cache.length - r.width : r.cache.length], rk)
            for r in batch:
                c = r.cache
                s0 = c.length - r.width
                c.compact(s0, [s0, *range(s0 + 1, s0 + min(3, r.width))] if r.mask is None else [s0])
    assert sorted(runner.batch_graphs) == [16, 64]
