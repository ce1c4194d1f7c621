"""CUDA-only checks (skipped without a GPU): long caches that split across CTAs, exact
agreement of the GPU top-k with the CPU one, determinism, CUDA graphs, poisoned rows."""
import pytest
import torch

import mage_ext
from conftest import capture, requires_cuda
from reference import (assert_close_fa, make_inputs, poison, random_selection,
                       reference_attention)

pytestmark = requires_cuda


@pytest.fixture(params=["default", "mma_sync"])
def kernel_path(request, monkeypatch):
    """Runs a test on the default kernels (the wgmma ones on an sm_90a build, the sparse step's
    merge as a programmatic dependent launch) and again on the portable path (mma.sync kernels,
    ordinary launches: MAGE_DISABLE_WGMMA=1, MAGE_DISABLE_PDL=1)."""
    if request.param == "mma_sync":
        monkeypatch.setenv("MAGE_DISABLE_WGMMA", "1")
        monkeypatch.setenv("MAGE_DISABLE_PDL", "1")
    return request.param


def check_first_and_sparse_steps(inp, lens, hkv, budgets, dtype, gen):
    """attention_with_scores and sparse_attention (one random selection per budget) into
    NaN-poisoned outputs, against the fp64 reference with the FlashAttention tolerance rule."""
    dev = inp.q.device
    out, lse = torch.empty_like(inp.q), torch.empty(inp.q.shape[:3], device=dev)
    scores = torch.empty(inp.k_cache.shape[:3], device=dev)
    poison(out, lse, scores)
    mage_ext.ops.attention_with_scores_out(*inp.args(), None, out, lse, scores)
    ref64 = reference_attention(inp)
    ref_pt = reference_attention(inp, dtype=dtype)
    assert_close_fa(out, ref64[0], ref_pt[0], dtype, "out")
    assert_close_fa(lse, ref64[1], ref_pt[1], dtype, "lse")
    assert_close_fa(scores, ref64[2], ref_pt[2], dtype, "scores")
    for budget in budgets:
        idx, cnt = random_selection(lens, hkv, budget, generator=gen, device=dev)
        poison(out, lse)
        mage_ext.ops.sparse_attention_out(inp.q, inp.k_cache, inp.v_cache, idx, cnt,
                                          inp.k_block, inp.v_block, None, out, lse)
        ref64 = reference_attention(inp, idx, cnt)
        ref_pt = reference_attention(inp, idx, cnt, dtype=dtype)
        assert_close_fa(out, ref64[0], ref_pt[0], dtype, f"sparse out (k={budget})")
        assert_close_fa(lse, ref64[1], ref_pt[1], dtype, f"sparse lse (k={budget})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("hq,hkv,block", [(12, 2, 32), (28, 4, 32), (32, 8, 4), (8, 8, 64),
                                          (20, 4, 16)])  # 80 rows: a part-filled warpgroup
def test_long_cache_with_splits(dtype, dim, hq, hkv, block, kernel_path, gen):
    if dtype == torch.float32 and kernel_path != "default":
        pytest.skip("fp32 has one (SIMT) kernel")
    lens = [5003, 1, 2500]
    inp = make_inputs(3, hq, hkv, block, dim, lens, dtype, "cuda", capacity=5010, generator=gen)
    # 700 keys: few key tiles (narrow CTAs); 4000: enough for the wide (wgmma) CTAs.
    check_first_and_sparse_steps(inp, lens, hkv, (700, 4000), dtype, gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
def test_many_rows_per_head_at_large_batch(dtype, dim, kernel_path, gen):
    # 7 x 32 = 224 rows per KV head, 17 x 4 heads: two 2-group warpgroup CTAs per head (the
    # 224-row mma.sync CTA on the mma_sync path); lengths differ per sequence.
    lens = torch.randint(1, 400, (17,), generator=gen).tolist()
    inp = make_inputs(17, 28, 4, 32, dim, lens, dtype, "cuda", capacity=400, generator=gen)
    check_first_and_sparse_steps(inp, lens, 4, (300,), dtype, gen)


def test_cuda_matches_cpu_kernels_on_a_large_case(gen):
    inp = make_inputs(2, 12, 2, 32, 128, [20000, 13001], torch.bfloat16, "cpu", generator=gen)
    cpu = mage_ext.attention_with_scores(*inp.args())
    gpu = mage_ext.attention_with_scores(*(t.cuda() for t in inp.args()))
    for name, a, b in zip(["out", "lse", "scores"], cpu, gpu):
        rel = (a.double() - b.cpu().double()).norm() / a.double().norm()
        assert rel < 1e-2, f"{name}: relative difference {rel:.2e}"


@pytest.mark.parametrize("k,n_sink,n_recent", [(1, 0, 0), (512, 4, 64), (2048, 0, 0)])
def test_topk_matches_cpu_exactly(k, n_sink, n_recent, gen):
    lens = [131072, 3000, 2048, 70000]
    scores = torch.rand(4, 2, 131072, generator=gen)
    scores[:, :, 1000:1100] = 0.5  # ties
    scores[0, 0, 5] = float("nan")
    lens_t = torch.tensor(lens, dtype=torch.int32)
    cpu_idx, cpu_cnt = mage_ext.topk_select(scores, lens_t, k, n_sink, n_recent)
    gpu_idx, gpu_cnt = mage_ext.topk_select(scores.cuda(), lens_t.cuda(), k, n_sink, n_recent)
    assert torch.equal(cpu_cnt, gpu_cnt.cpu())
    assert torch.equal(cpu_idx, gpu_idx.cpu())


def _topk_rows(capacity, batch, k, gen):
    """Scores [batch, 2, capacity] and lengths that cover the kernel's corner cases: full and
    odd lengths (a warp's last segment past the end), lengths just above k (CTAs left empty),
    ties across CTA boundaries, a row of ties only, NaN / -inf / -0 reaching into the top k
    (the CPU kernel ranks NaN as -inf and -0 as +0)."""
    base = [capacity, capacity - 1, capacity // 2 + 7, 100, min(capacity, k + 1),
            min(capacity, k + 45)]
    lens = [base[i] if i < len(base) else
            int(torch.randint(k + 1, capacity + 1, (1,), generator=gen)) for i in range(batch)]
    scores = torch.rand(batch, 2, capacity, generator=gen)
    scores[:, :, 1000:1100] = 0.5  # ties
    scores[0, 0, 5] = float("nan")
    # Top ties around every 1/16 of the row (CTA boundaries for C = 2 .. 16): k = 512 splits
    # them across CTAs.
    for i in range(1, 16):
        p = i * capacity // 16
        scores[0, 1, max(0, p - 40): p + 40] = 2.0
    if batch > 1:
        scores[1, 1] = 0.25  # a row of ties only: the earliest positions win, across CTAs
    if batch > 2:
        row = scores[2, 0]  # NaN and -inf tie below every number; 300 numbers only
        row[:] = float("nan")
        row[::7] = float("-inf")
        row[torch.randperm(capacity, generator=gen)[:300]] = torch.rand(300, generator=gen)
        row = scores[2, 1]  # -0 and +0 tie; 200 positives only
        row[:] = 0.0
        row[::3] = -0.0
        row[torch.randperm(capacity, generator=gen)[:200]] = 1.0 + torch.rand(200, generator=gen)
    return scores, torch.tensor(lens, dtype=torch.int32)


def _check_topk(scores, lens, k, n_sink, n_recent):
    cpu_idx, cpu_cnt = mage_ext.topk_select(scores, lens, k, n_sink, n_recent)
    gpu_idx, gpu_cnt = mage_ext.topk_select(scores.cuda(), lens.cuda(), k, n_sink, n_recent)
    assert torch.equal(cpu_cnt, gpu_cnt.cpu())
    bad = (cpu_idx != gpu_idx.cpu()).any(-1).nonzero().tolist()
    assert not bad, f"rows (batch, head) {bad[:8]} differ (lens {lens.tolist()})"


# The launch picks C = 1, 2, 4, 8 or 16 CTAs per row from the capacity and the row count: the
# fewest that hold a row in registers, doubled while a CTA holds > 8K positions and all rows fit
# on the GPU at once (the row counts below are for an H200: 132 SMs). 300000 > 16 x 16K also
# takes the path that re-reads 16K-position tiles.
@pytest.mark.parametrize("capacity,batch", [
    (3000, 4),      # C = 1
    (20000, 4),     # 2, doubled to 4
    (20000, 24),    # 48 rows: too many 4-clusters at once, C = 2
    (40000, 4),     # 4, doubled to 8
    (100000, 3),    # 8, doubled to 16 (non-portable cluster size)
    (100000, 16),   # 32 rows: too many 16-clusters at once, C = 8
    (150000, 3),    # 16
    (300000, 1),    # 16, two tiles per CTA
])
@pytest.mark.parametrize("k,n_sink,n_recent", [(1, 0, 0), (512, 4, 64), (2048, 0, 0)])
def test_topk_matches_cpu_exactly_for_each_cluster_size(capacity, batch, k, n_sink, n_recent,
                                                        gen):
    scores, lens = _topk_rows(capacity, batch, k, gen)
    _check_topk(scores, lens, k, n_sink, n_recent)


@pytest.mark.parametrize("capacity", [1024, 1500, 8192, 16384, 16385, 70000])
def test_topk_short_and_odd_rows(capacity, gen):
    """Each length from k + 1 up in odd steps: the per-warp key counts and the -inf tail of the
    last segment (lengths not multiples of 32 or 1024)."""
    k = 512
    lens = torch.arange(k + 1, capacity + 1, max(1, (capacity - k) // 37), dtype=torch.int32)
    scores = torch.randn(len(lens), 1, capacity, generator=gen).exp()
    scores[:, :, 600:700] = scores[:, :, 650:651]  # ties
    _check_topk(scores, lens, k, 2, 16)


def test_topk_under_cuda_graph(gen):
    """A 16-CTA launch (batch 1, long row) captured and replayed with new scores."""
    cap = 131072
    scores = torch.rand(1, 2, cap, generator=gen).cuda()
    lens = torch.tensor([cap - 5], dtype=torch.int32, device="cuda")
    idx = torch.empty(1, 2, 512, dtype=torch.int32, device="cuda")
    cnt = torch.empty(1, 2, dtype=torch.int32, device="cuda")
    graph = capture(lambda: mage_ext.ops.topk_select_out(scores, lens, 512, 4, 64, idx, cnt))
    for _ in range(2):
        scores.copy_(torch.rand(1, 2, cap, generator=gen))
        idx.fill_(-7)
        graph.replay()
        want_idx, want_cnt = mage_ext.topk_select(scores.cpu(), lens.cpu(), 512, 4, 64)
        assert torch.equal(idx.cpu(), want_idx) and torch.equal(cnt.cpu(), want_cnt)


def test_repeated_runs_are_identical(gen):
    inp = make_inputs(2, 28, 4, 32, 128, [9000, 4097], torch.bfloat16, "cuda", generator=gen)
    first = mage_ext.attention_with_scores(*inp.args())
    for _ in range(3):
        again = mage_ext.attention_with_scores(*inp.args())
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_sparse_step_under_cuda_graph(gen):
    inp = make_inputs(2, 12, 2, 32, 128, [4000, 3000], torch.bfloat16, "cuda", generator=gen)
    _, lse0, scores = mage_ext.attention_with_scores(*inp.args())
    idx, cnt = mage_ext.topk_select(scores, inp.cache_lens, 512)
    out = torch.empty_like(inp.q)
    lse = torch.empty_like(lse0)
    q_static = inp.q.clone()
    graph = capture(lambda: mage_ext.ops.sparse_attention_out(
        q_static, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block, inp.v_block, None, out, lse))
    for _ in range(2):
        q_static.copy_(torch.randn(inp.q.shape, generator=gen).to(q_static))
        out.fill_(float("nan"))
        graph.replay()
        want, want_lse = mage_ext.sparse_attention(q_static, inp.k_cache, inp.v_cache, idx, cnt,
                                                   inp.k_block, inp.v_block)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_out_of_range_indices_poison_rows_instead_of_reading_out_of_bounds(gen):
    inp = make_inputs(2, 4, 2, 8, 64, [100, 100], torch.bfloat16, "cuda", generator=gen)
    idx, cnt = random_selection([100, 100], 2, 16, generator=gen, device="cuda")
    idx[1, 0, 3] = 10_000_000
    out, lse = mage_ext.sparse_attention(inp.q, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block,
                                         inp.v_block)
    torch.cuda.synchronize()
    assert out[1, :2].isnan().all() and lse[1, :2].isnan().all()  # KV head 0 of sequence 1
    assert not out[0].isnan().any() and not out[1, 2:].isnan().any()
    assert mage_ext.ops.take_error("cuda")[:6] == [3, 3, 1, 0, 3, 10_000_000]  # and recorded
    with pytest.raises(ValueError, match="outside the cache"):
        mage_ext.check_selection(idx, cnt, capacity=100)


def test_misaligned_output_is_refused_by_name(gen):
    inp = make_inputs(1, 4, 2, 8, 64, [100], torch.bfloat16, "cuda", generator=gen)
    out = torch.empty(inp.q.numel() + 1, dtype=inp.q.dtype, device="cuda")[1:].view(inp.q.shape)
    lse = torch.empty(inp.q.shape[:3], device="cuda")
    with pytest.raises(RuntimeError, match="out must start at a 16-byte aligned address"):
        mage_ext.ops.dense_attention_out(*inp.args(), None, out, lse)


def test_append_kv_matches_cpu(gen):
    kc = torch.randn(3, 2, 40, 128, generator=gen).bfloat16()
    vc = torch.randn(3, 2, 40, 128, generator=gen).bfloat16()
    kb = torch.randn(3, 2, 8, 128, generator=gen).bfloat16()
    vb = torch.randn(3, 2, 8, 128, generator=gen).bfloat16()
    lens = torch.tensor([0, 17, 32], dtype=torch.int32)
    kc_gpu, vc_gpu = kc.cuda(), vc.cuda()
    mage_ext.append_kv(kc, vc, lens, kb, vb)
    mage_ext.append_kv(kc_gpu, vc_gpu, lens.cuda(), kb.cuda(), vb.cuda())
    assert torch.equal(kc, kc_gpu.cpu()) and torch.equal(vc, vc_gpu.cpu())


def test_cache_views_with_batch_stride(gen):
    """A cache that is a batch slice of a larger allocation (serving: a slot pool)."""
    pool_k = torch.randn(5, 2, 300, 64, generator=gen).half().cuda()
    pool_v = torch.randn(5, 2, 300, 64, generator=gen).half().cuda()
    kc, vc = pool_k[1:4], pool_v[1:4]
    q = torch.randn(3, 6, 16, 64, generator=gen).half().cuda()
    kb = torch.randn(3, 2, 16, 64, generator=gen).half().cuda()
    vb = torch.randn(3, 2, 16, 64, generator=gen).half().cuda()
    lens = torch.tensor([300, 5, 129], dtype=torch.int32, device="cuda")
    out, lse = mage_ext.dense_attention(q, kc, vc, lens, kb, vb)
    ref, ref_lse = mage_ext.dense_attention(q, kc.contiguous(), vc.contiguous(), lens, kb, vb)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("view", ["contiguous", "batch_and_head_slice"])
def test_tma_and_cp_async_cache_loads_agree(dtype, dim, view, monkeypatch, gen):
    """The warpgroup kernels load whole cache tiles with TMA and the rest with cp.async; the
    same run with MAGE_DISABLE_TMA=1 (cp.async only) must give bit-identical results, also
    for caches that are slices of a larger pool (other batch / head strides)."""
    lens = [4100, 63, 2049]  # a partial last tile, a cache shorter than one tile, one over a split
    shape = (5, 6, 4200, dim) if view != "contiguous" else (3, 2, 4200, dim)
    pool_k = torch.randn(shape, generator=gen).to(dtype).cuda()
    pool_v = torch.randn(shape, generator=gen).to(dtype).cuda()
    if view == "contiguous":
        kc, vc = pool_k, pool_v
    else:
        kc, vc = pool_k[1:4, 2:4], pool_v[1:4, 2:4]
    q = torch.randn(3, 12, 32, dim, generator=gen).to(dtype).cuda()
    kb = torch.randn(3, 2, 32, dim, generator=gen).to(dtype).cuda()
    vb = torch.randn(3, 2, 32, dim, generator=gen).to(dtype).cuda()
    args = (q, kc, vc, torch.tensor(lens, dtype=torch.int32, device="cuda"), kb, vb)
    with_tma = mage_ext.attention_with_scores(*args) + mage_ext.dense_attention(*args)
    monkeypatch.setenv("MAGE_DISABLE_TMA", "1")
    without = mage_ext.attention_with_scores(*args) + mage_ext.dense_attention(*args)
    for name, a, b in zip(["out", "lse", "scores", "dense out", "dense lse"], with_tma, without):
        assert torch.equal(a, b), name
