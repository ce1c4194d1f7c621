"""CUDA autograd (skipped without a GPU): gradients of every attention op against the float64
reference (FlashAttention tolerance rule), stale cache rows poisoned with NaN, outputs allocated
over NaN-poisoned memory; block_sparse_attention's forward through the sparse kernels with a
stride-0 context; deterministic accumulation; bounded memory on a long cache; torch.compile."""
import pytest
import torch

import mage_ext
from conftest import requires_cuda
from reference import assert_close_fa, make_inputs, random_selection
from test_autograd import (DIFF, TinyAttentionModel, block_call, block_ref, check_grads_fa,
                           compile_inputs, dense_call, dense_ref, diff_tensors, loss_grads,
                           make_block_sparse, sparse_call, sparse_ref)

pytestmark = requires_cuda


def poison_allocator(n_bytes=1 << 28):
    """Fills a large block of the caching allocator with NaN and frees it: the tensors allocated
    next reuse it, so an element a kernel forgets to write shows up as NaN."""
    torch.full((n_bytes // 4,), float("nan"), device="cuda")
    torch.cuda.synchronize()


class CudaCase:
    """An op on CUDA as a function of CPU tensors (moved to the GPU inside the autograd graph).
    The allocator is poisoned before the forward and again right before the op's backward runs
    (a hook on out's gradient), so outputs of either that are not fully written show up."""

    def __init__(self, call):
        self.call = call

    def __call__(self, *tensors):
        poison_allocator()
        out, lse = self.call(*(t.cuda() for t in tensors))
        if out.requires_grad:
            out.register_hook(lambda grad: poison_allocator() or grad)
        return out.cpu(), lse.cpu()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("hq,hkv,block", [(12, 2, 32), (8, 8, 4), (20, 4, 16)])
def test_grads_dense_and_sparse(dtype, dim, hq, hkv, block, gen):
    lens = [1500, 0, 777]
    inp = make_inputs(3, hq, hkv, block, dim, lens, torch.float64, capacity=1600, generator=gen)
    inp.k_cache[0, :, 1500:] = float("nan")  # stale rows past the lengths
    inp.v_cache[2, :, 777:] = float("nan")
    tensors = diff_tensors(inp)
    lens_gpu = inp.cache_lens.cuda()
    check_grads_fa(CudaCase(dense_call(lens_gpu)), dense_ref(inp.cache_lens), tensors, dtype,
                   gen, "dense")
    check_grads_fa(CudaCase(dense_call(lens_gpu, mage_ext.attention_with_scores)),
                   dense_ref(inp.cache_lens), tensors, dtype, gen, "attention_with_scores")
    for k in (300, 2048):
        idx, cnt = random_selection(lens, hkv, k, generator=gen)
        check_grads_fa(CudaCase(sparse_call(idx.cuda(), cnt.cuda())),
                       sparse_ref(inp.cache_lens, idx, cnt), tensors, dtype, gen,
                       f"sparse k={k}")


@pytest.mark.parametrize("backward", ["generic", "flash"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("hq,hkv,bs", [(12, 2, 32), (8, 4, 16)])
def test_block_sparse_forward_and_grads(backward, dtype, dim, hq, hkv, bs, gen, monkeypatch):
    # 12 blocks over their clean prefixes (the sparse kernels see the context with batch
    # stride 0), k = 64: later blocks select a part of their prefix, early ones all of it.
    # backward "flash": the opt-in FlashAttention variable-length backward (fp16 / bf16; fp32
    # takes the generic path), strict so that a failure raises instead of falling back. Its loss
    # leaves lse out: flash takes no dlse (a dlse goes the generic way), training has none.
    if backward == "flash":
        monkeypatch.setenv("MAGE_SPARSE_BACKWARD", "flash")
        monkeypatch.setenv("MAGE_BLOCK_ATTENTION_STRICT", "1")
    tensors, idx, cnt = make_block_sparse(2, hq, hkv, 12, bs, dim, 12 * bs, 64, gen)
    ref = block_ref(idx, cnt, bs)
    with torch.no_grad():
        out64, lse64 = ref(*tensors)
        out_pt, lse_pt = ref(*(t.to(dtype) for t in tensors))
        poison_allocator()
        gpu = [t.to(dtype).cuda() for t in tensors]
        out, lse = mage_ext.block_sparse_attention(*gpu[:3], idx.cuda(), cnt.cuda(), *gpu[3:], bs)
    assert_close_fa(out, out64, out_pt, dtype, "block_sparse out")
    assert_close_fa(lse, lse64, lse_pt, dtype, "block_sparse lse")
    check_grads_fa(CudaCase(block_call(idx.cuda(), cnt.cuda(), bs)), ref, tensors, dtype, gen,
                   "block_sparse", lse_in_loss=backward == "generic")


def block_sparse_grads(tensors, idx, cnt, bs, w):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out, _ = mage_ext.block_sparse_attention(*leaves[:3], idx, cnt, *leaves[3:], bs)
    (out.float() * w).sum().backward()
    return [t.grad for t in leaves]


def test_block_sparse_accumulation_is_deterministic(monkeypatch, gen):
    """Under torch.use_deterministic_algorithms(True) (the generic backward: index_put_ with
    accumulate sums each context row's contributions in a fixed order) two runs give identical
    bits. MAGE_BACKWARD_ATOMICS=1 (atomics) and the default flash backward (atomic dQ) agree up to
    rounding."""
    tensors, idx, cnt = make_block_sparse(2, 12, 2, 64, 32, 128, 2048, 512, gen,
                                          torch.bfloat16, "cuda")
    w = torch.randn(tensors[0].shape, generator=gen).cuda()
    flash = block_sparse_grads(tensors, idx, cnt, 32, w)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first = block_sparse_grads(tensors, idx, cnt, 32, w)
        second = block_sparse_grads(tensors, idx, cnt, 32, w)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for name, a, b in zip(DIFF, first, flash):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)
    monkeypatch.setenv("MAGE_SPARSE_BACKWARD", "generic")
    monkeypatch.setenv("MAGE_BACKWARD_ATOMICS", "1")
    fast = block_sparse_grads(tensors, idx, cnt, 32, w)
    for name, a, b in zip(DIFF, first, fast):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)


def test_grads_match_cpu(gen):
    """The generic backward on CUDA and on the CPU agree in fp32."""
    lens = [300, 129]
    inp = make_inputs(2, 8, 2, 32, 64, lens, torch.float32, capacity=300, generator=gen)
    idx, cnt = random_selection(lens, 2, 100, generator=gen)
    w = (torch.randn(2, 8, 32, 64, generator=gen, dtype=torch.float64),
         torch.randn(2, 8, 32, generator=gen, dtype=torch.float64))
    for cpu_call, gpu_call in ((dense_call(inp.cache_lens), dense_call(inp.cache_lens.cuda())),
                               (sparse_call(idx, cnt), sparse_call(idx.cuda(), cnt.cuda()))):
        want = loss_grads(cpu_call, diff_tensors(inp), *w)
        got = loss_grads(gpu_call, [t.cuda() for t in diff_tensors(inp)], w[0].cuda(), w[1].cuda())
        for name, a, b in zip(DIFF, got, want):
            torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-3, msg=name)


def test_long_cache_memory_is_bounded(gen):
    """Batch 8 x 64K cache, 224 rows per KV head: a [rows x capacity] fp32 matrix of all heads
    would be 1.9 GB; the chunked backward stays within the gradients plus a few hundred MB."""
    batch, hq, hkv, block, dim, cap = 8, 28, 4, 32, 128, 65536
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(batch, hq, block, dim, device=dev, dtype=dt, requires_grad=True)
    kc = torch.randn(batch, hkv, cap, dim, device=dev, dtype=dt, requires_grad=True)
    vc = torch.randn(batch, hkv, cap, dim, device=dev, dtype=dt, requires_grad=True)
    kb = torch.randn(batch, hkv, block, dim, device=dev, dtype=dt, requires_grad=True)
    vb = torch.randn(batch, hkv, block, dim, device=dev, dtype=dt, requires_grad=True)
    lens = torch.full((batch,), cap, dtype=torch.int32, device=dev)
    out, _ = mage_ext.dense_attention(q, kc, vc, lens, kb, vb)
    loss = out.float().square().sum()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = 2 * kc.numel() * kc.element_size()
    full_matrix = batch * hq * block * cap * 4
    assert extra < grads + 700 * 2**20, f"backward used {extra / 2**20:.0f} MB over its inputs"
    assert extra - grads < full_matrix / 2
    assert torch.isfinite(kc.grad.float()).all() and torch.isfinite(q.grad.float()).all()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_training_step(backend, gen):
    torch.manual_seed(0)
    model = TinyAttentionModel(dim=64).cuda()
    inputs = [t.cuda() for t in compile_inputs(gen)]
    model(*inputs).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    loss = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-4, rtol=1e-3, msg=n)


def test_opcheck_with_grad_on_cuda(gen):
    from test_autograd import grad_samples
    for op, args in grad_samples(gen):
        args = tuple(a.detach().cuda().requires_grad_(a.requires_grad)
                     if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


def test_float64_is_cpu_only(gen):
    inp = make_inputs(1, 2, 1, 4, 64, [5], torch.float64, "cuda", generator=gen)
    with pytest.raises(RuntimeError, match="float64 on the CPU only"):
        mage_ext.dense_attention(*inp.args())


def test_block_sparse_flash_backward_uneven_counts(monkeypatch, gen):
    """The FlashAttention variable-length backward with counts that differ between KV heads and
    blocks (each (block, KV head) is its own sequence) and empty selections: the generic path's
    gradients, to bf16 rounding."""
    tensors, idx, cnt = make_block_sparse(2, 8, 4, 10, 16, 128, 160, 48, gen, torch.bfloat16,
                                          "cuda")
    cnt = cnt.clone()
    cnt[:, 3::2, 1] = (cnt[:, 3::2, 1] // 2)  # head 1 keeps half its selection in odd blocks
    cnt[1, 5, 2] = 0                          # one empty selection
    slots = torch.arange(idx.shape[-1], device="cuda")
    idx = torch.where(slots < cnt.unsqueeze(-1), idx, -1)
    w = torch.randn(tensors[0].shape, generator=gen).cuda()
    monkeypatch.setenv("MAGE_BLOCK_ATTENTION_STRICT", "1")
    generic = block_sparse_grads(tensors, idx, cnt, 16, w)
    monkeypatch.setenv("MAGE_SPARSE_BACKWARD", "flash")
    flash = block_sparse_grads(tensors, idx, cnt, 16, w)
    for name, a, b in zip(DIFF, flash, generic):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)


def test_block_sparse_backward_switch_is_checked(monkeypatch, gen):
    """MAGE_SPARSE_BACKWARD takes flash or generic; anything else is an error naming it."""
    tensors, idx, cnt = make_block_sparse(1, 4, 2, 4, 16, 64, 64, 16, gen, torch.bfloat16, "cuda")
    w = torch.randn(tensors[0].shape, generator=gen).cuda()
    monkeypatch.setenv("MAGE_SPARSE_BACKWARD", "fast")
    with pytest.raises(RuntimeError, match="MAGE_SPARSE_BACKWARD must be flash or generic"):
        block_sparse_grads(tensors, idx, cnt, 16, w)
