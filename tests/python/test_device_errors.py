"""The device-side error record (csrc/ops/device_errors.h): CUDA kernels that meet an input value
they cannot use (a cache length past the capacity, an append that does not fit, a selected
index outside the cache, a count outside [0, k]) write nothing out of bounds and record the
first such value; mage_ext.check_errors() raises naming the op, sequence and value, generate()
checks once per block. Also the per-device kernel attributes (a second GPU, a fresh process).

conftest.py fails any CUDA test that leaves the record set, so tests that provoke an error read
it themselves; every other CUDA test doubles as a check that valid inputs report nothing.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mage_ext
from conftest import capture, requires_cuda
from reference import make_inputs, poison, random_selection, reference_attention

CODE = {"length": 1, "append": 2, "index": 3, "count": 4}
OP = {"dense_attention": 1, "attention_with_scores": 2, "sparse_attention": 3,
      "topk_select": 4, "append_kv": 5}


def test_cpu_has_no_record():
    assert mage_ext.ops.take_error("cpu") == []
    mage_ext.check_errors("cpu")
    mage_ext.check_errors()  # every CUDA device (none here, or clean ones)


def test_cpu_ops_raise_at_once_instead():
    """The CPU kernels check the same values on the host: the error comes from the call."""
    kc = torch.zeros(1, 2, 10, 8)
    with pytest.raises(RuntimeError, match="does not fit the cache capacity 10"):
        mage_ext.append_kv(kc, kc.clone(), torch.tensor([7], dtype=torch.int32),
                           torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))


@pytest.fixture(params=["default", "mma_sync"])
def kernel_path(request, monkeypatch):
    if request.param == "mma_sync":
        monkeypatch.setenv("MAGE_DISABLE_WGMMA", "1")
        monkeypatch.setenv("MAGE_DISABLE_PDL", "1")
    return request.param


def expect_record(code, op, seq, head=None, slot=None, value=None, limit=None, device="cuda"):
    """Reads (and so clears) the record and checks its fields; returns it."""
    rec = mage_ext.ops.take_error(device)
    assert rec, "no error was recorded"
    want = {0: CODE[code], 1: OP[op], 2: seq, 3: head, 4: slot, 5: value, 6: limit}
    for i, v in want.items():
        if v is not None:
            assert rec[i] == v, f"record {rec}: field {i} is {rec[i]}, expected {v}"
    assert mage_ext.ops.take_error(device) == []  # cleared by the read
    return rec


@requires_cuda
@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 128), (torch.float16, 64),
                                       (torch.float32, 64), (torch.float16, 4)])  # 8-byte rows
@pytest.mark.parametrize("bad_len", ["past", "negative"])
def test_append_that_does_not_fit_writes_nothing_and_is_recorded(dtype, dim, bad_len):
    cap, B = 40, 8
    kc = torch.full((3, 2, cap, dim), 7.0, dtype=dtype, device="cuda")
    vc = kc.clone()
    kb = torch.randn(3, 2, B, dim, device="cuda").to(dtype)
    vb = torch.randn(3, 2, B, dim, device="cuda").to(dtype)
    first = cap - B + 1 if bad_len == "past" else -3
    lens = torch.tensor([first, 0, cap - B], dtype=torch.int32, device="cuda")
    mage_ext.append_kv(kc, vc, lens, kb, vb)
    assert (kc[0] == 7).all() and (vc[0] == 7).all()  # nothing of sequence 0 written
    assert torch.equal(kc[1, :, :B], kb[1]) and torch.equal(vc[2, :, cap - B:], vb[2])
    assert (kc[1, :, B:] == 7).all()
    with pytest.raises(RuntimeError) as err:
        mage_ext.check_errors()
    msg = str(err.value)
    assert "mage.append_kv: sequence 0" in msg and f"cache_lens[0] = {first}" in msg
    assert f"capacity {cap}" in msg and "nothing was written" in msg
    mage_ext.check_errors()  # the read cleared it


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bad", [10_000_000, 300, -5])
def test_selected_index_outside_the_cache(dtype, dim, bad, kernel_path, gen):
    """Rows of the bad (sequence, KV head) are NaN, nothing is read out of bounds, every other
    row matches the reference; the record names the op, sequence, head, slot and value."""
    lens, hkv, k = [300, 257], 2, 97
    inp = make_inputs(2, 8, hkv, 16, dim, lens, dtype, "cuda", capacity=300, generator=gen)
    idx, cnt = random_selection(lens, hkv, k, generator=gen, device="cuda")
    idx[1, 0, 5] = bad
    out, lse = torch.empty_like(inp.q), torch.empty(inp.q.shape[:3], device="cuda")
    poison(out, lse)
    mage_ext.ops.sparse_attention_out(inp.q, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block,
                                      inp.v_block, None, out, lse)
    expect_record("index", "sparse_attention", seq=1, head=0, slot=5, value=bad, limit=300)
    assert out[1, :4].isnan().all() and lse[1, :4].isnan().all()  # KV head 0 of sequence 1
    good = idx.clone()
    good[1, 0] = idx[0, 0]  # any valid selection for the poisoned head
    ref, ref_lse = reference_attention(inp, good.cpu(), cnt.cpu())[:2]
    tol = 5e-2 if dtype != torch.float32 else 1e-4
    assert torch.allclose(out[0].double().cpu(), ref[0], atol=tol)
    assert torch.allclose(out[1, 4:].double().cpu(), ref[1, 4:], atol=tol)
    assert torch.allclose(lse[0].double().cpu(), ref_lse[0], atol=tol)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_count_outside_k_is_clamped_and_recorded(dtype, kernel_path, gen):
    lens, hkv, k = [200, 150], 2, 64
    inp = make_inputs(2, 4, hkv, 8, 64, lens, dtype, "cuda", capacity=200, generator=gen)
    idx, cnt = random_selection(lens, hkv, k, generator=gen, device="cuda")
    bad = cnt.clone()
    bad[0, 1] = k + 9
    got = mage_ext.sparse_attention(inp.q, inp.k_cache, inp.v_cache, idx, bad, inp.k_block,
                                    inp.v_block)
    expect_record("count", "sparse_attention", seq=0, head=1, value=k + 9, limit=k)
    want = mage_ext.sparse_attention(inp.q, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block,
                                     inp.v_block)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@requires_cuda
@pytest.mark.parametrize("op", ["dense_attention", "attention_with_scores"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("given,used", [(4100 + 37, 4100), (-4, 0)])
def test_cache_length_outside_the_capacity(op, dtype, given, used, kernel_path, gen):
    """The kernels use the length clamped to [0, capacity] (no out-of-bounds read) and record
    it; the same call with the clamped length gives the same result."""
    cap = 4100
    inp = make_inputs(2, 12, 2, 32, 128, [cap, 77], dtype, "cuda", capacity=cap, generator=gen)
    bad = torch.tensor([77, given], dtype=torch.int32, device="cuda")
    got = getattr(mage_ext, op)(inp.q, inp.k_cache, inp.v_cache, bad, inp.k_block, inp.v_block)
    expect_record("length", op, seq=1, value=given, limit=cap)
    clamped = torch.tensor([77, used], dtype=torch.int32, device="cuda")
    want = getattr(mage_ext, op)(inp.q, inp.k_cache, inp.v_cache, clamped, inp.k_block,
                                 inp.v_block)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("capacity", [300, 20000])
def test_topk_length_outside_the_capacity(capacity, gen):
    scores = torch.rand(2, 2, capacity, generator=gen).cuda()
    bad = torch.tensor([capacity + 5, 10], dtype=torch.int32, device="cuda")
    got = mage_ext.topk_select(scores, bad, 128)
    expect_record("length", "topk_select", seq=0, value=capacity + 5, limit=capacity)
    want = mage_ext.topk_select(scores, torch.tensor([capacity, 10], dtype=torch.int32,
                                                     device="cuda"), 128)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@requires_cuda
def test_capacity_past_a_32_bit_int_is_refused():
    """The CUDA launchers cast sizes to int: a 2^31-entry score row (8 GiB) is an error, not a
    negative capacity."""
    scores = torch.empty(1, 1, 2**31, device="cuda")
    lens = torch.tensor([5], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="capacity = 2147483648 does not fit the 32-bit ints"):
        mage_ext.topk_select(scores, lens, 4)
    del scores
    torch.cuda.empty_cache()


@requires_cuda
def test_first_error_is_kept_until_read(gen):
    kc = torch.zeros(1, 2, 16, 64, device="cuda", dtype=torch.half)
    kb = torch.zeros(1, 2, 8, 64, device="cuda", dtype=torch.half)
    mage_ext.append_kv(kc, kc.clone(), torch.tensor([12], dtype=torch.int32, device="cuda"),
                       kb, kb)
    scores = torch.rand(1, 2, 16, device="cuda")
    mage_ext.topk_select(scores, torch.tensor([99], dtype=torch.int32, device="cuda"), 4)
    expect_record("append", "append_kv", seq=0, value=12, limit=16, slot=8)
    mage_ext.check_errors("cuda")


@requires_cuda
def test_error_raised_inside_a_cuda_graph_replay(gen):
    """Flag writes are kernel stores: a captured step reports on every replay that meets a bad
    value, and stays clean once the (in-place) input is fixed."""
    inp = make_inputs(2, 12, 2, 32, 128, [4000, 3000], torch.bfloat16, "cuda", generator=gen)
    _, lse0, scores = mage_ext.attention_with_scores(*inp.args())
    idx, cnt = mage_ext.topk_select(scores, inp.cache_lens, 512)
    out, lse = torch.empty_like(inp.q), torch.empty_like(lse0)
    graph = capture(lambda: mage_ext.ops.sparse_attention_out(
        inp.q, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block, inp.v_block, None, out, lse))
    graph.replay()
    mage_ext.check_errors()
    saved = int(idx[1, 1, 7])
    idx[1, 1, 7] = 5000
    graph.replay()
    with pytest.raises(RuntimeError, match=r"mage.sparse_attention: sequence 1, KV head 1: "
                                           r"indices\[1, 1, 7\] = 5000"):
        mage_ext.check_errors()
    idx[1, 1, 7] = saved
    graph.replay()
    mage_ext.check_errors()


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_each_device_has_its_own_record():
    kc = torch.zeros(1, 2, 16, 64, device="cuda:1", dtype=torch.half)
    kb = torch.zeros(1, 2, 8, 64, device="cuda:1", dtype=torch.half)
    mage_ext.append_kv(kc, kc.clone(), torch.tensor([9], dtype=torch.int32, device="cuda:1"),
                       kb, kb)
    mage_ext.append_kv(kc.to("cuda:0"), kc.to("cuda:0"),
                       torch.tensor([0], dtype=torch.int32, device="cuda:0"), kb.to("cuda:0"),
                       kb.to("cuda:0"))
    assert mage_ext.ops.take_error("cuda:0") == []
    expect_record("append", "append_kv", seq=0, value=9, device="cuda:1")


@requires_cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_generate_raises_at_the_end_of_the_block(cuda_graphs, monkeypatch):
    """A selector that hands the kernels an index outside the cache: generate raises after the
    block (its one synchronisation), naming the op, before the block's tokens reach anyone."""
    from mage_ext import PolicyConfig, generate
    from mage_ext.core.selectors import mage as mage_selector
    from tiny_models import MASK_ID, VOCAB, tiny_model

    real = mage_selector._topk

    def bad_topk(scores, lens, k, cfg):
        idx, cnt = real(scores, lens, k, cfg)
        idx = idx.clone()
        idx[0, 0, 0] = scores.shape[-1] + 11  # past the capacity
        return idx, cnt

    monkeypatch.setattr(mage_selector, "_topk", bad_topk)
    model = tiny_model("qwen2", layers=2, head_dim=64, seed=3).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in (200, 90)]
    blocks = []
    with pytest.raises(RuntimeError, match="mage.sparse_attention: sequence 0, KV head 0"):
        generate(model, input_ids=prompts, policy=PolicyConfig(method="mage", k=16,
                                                               dense_layers=1),
                 block_size=32, max_new_tokens=64, mask_id=MASK_ID, stop_ids=[],
                 cuda_graphs=cuda_graphs, on_block=lambda i, ids: blocks.append(i))
    assert blocks == []  # the bad block never reached on_block


# -- per-device kernel attributes ----------------------------------------------------------------

_ALL_OPS = textwrap.dedent("""
    import sys, torch, mage_ext

    def run(dev, dtype):
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(dev)
        # 12 x 32 = 384 rows per KV head, d 128: the kernels that need > 48 KB of shared memory
        q, kb, vb = r(2, 24, 32, 128), r(2, 2, 32, 128), r(2, 2, 32, 128)
        kc, vc = r(2, 2, 5000, 128), r(2, 2, 5000, 128)
        lens = torch.tensor([4999, 1200], dtype=torch.int32, device=dev)
        out, lse, scores = mage_ext.attention_with_scores(q, kc, vc, lens, kb, vb)
        idx, cnt = mage_ext.topk_select(scores, lens, 1000)
        sp = mage_ext.sparse_attention(q, kc, vc, idx, cnt, kb, vb)
        de = mage_ext.dense_attention(q, kc, vc, lens, kb, vb)
        mage_ext.check_errors(dev)
        return [t.cpu() for t in (out, lse, scores, idx, cnt, *sp, *de)]

    order = sys.argv[1].split(",")
    fail_first = len(sys.argv) > 2
    if fail_first:  # a first call that fails (a bad argument) before any kernel ran
        try:
            mage_ext.dense_attention(torch.zeros(1, 2, 4, 128, device=order[0]).half(),
                                     torch.zeros(1, 2, 8, 128).half(),
                                     torch.zeros(1, 2, 8, 128).half(),
                                     torch.zeros(1, dtype=torch.int32),
                                     torch.zeros(1, 2, 4, 128).half(),
                                     torch.zeros(1, 2, 4, 128).half())
            raise SystemExit("the bad call did not fail")
        except RuntimeError:
            pass
    for dtype in (torch.bfloat16, torch.float16):
        results = [run(dev, dtype) for dev in order]
        for a, b in zip(results[0], results[-1]):
            assert torch.equal(a, b), "devices disagree"
    print("ok")
""")


def _fresh_process(*args):
    r = subprocess.run([sys.executable, "-c", _ALL_OPS, *args], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@requires_cuda
def test_ops_run_in_a_fresh_process_after_a_failed_call():
    """cuda:0 after a failed first call (nothing cached from it): the shared-memory attributes
    are set by the first launch that needs them (the cache of failed attribute calls is
    unit-tested in tests/cpp/test_once_per_device.cpp)."""
    _fresh_process("cuda:0", "fail-first")


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("order", ["cuda:0,cuda:1", "cuda:1,cuda:0"])
def test_ops_on_a_second_gpu(order):
    """The kernels' shared-memory opt-in belongs to each device's context: with the attribute
    cached once per process the second device's launches failed. Both orders, each in a fresh
    process, with identical results on both devices."""
    _fresh_process(order)
