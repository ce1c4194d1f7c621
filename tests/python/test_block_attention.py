"""mage.block_attention (forward, backward, autograd) against a plain-PyTorch reference built
from an explicit boolean mask, its equivalence with dense_attention (one block, and chunked
prefill block by block), the block-diffusion training layout, gradcheck, opcheck and
torch.compile, bad inputs, linear memory; and on a GPU, every fused kernel path."""
import os
import resource
import subprocess
import sys

import pytest
import torch

import mage_ext
from conftest import DEVICES, requires_cuda
from reference import assert_close_fa, max_error, rounding_noise

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (batch, Hq, Hkv, d, block, T, start, N): GQA 1/2/4/6, d 64/128, one block and many, start 0,
# start below the block size, sequences with different starts, slack past start + T - block.
SHAPES = [
    (1, 4, 4, 64, 4, 12, [0], 12),
    (2, 8, 4, 64, 4, 20, [5, 23], 47),
    (2, 8, 2, 128, 32, 96, [0, 70], 181),
    (1, 12, 2, 64, 32, 32, [41], 80),
    (2, 6, 1, 64, 4, 4, [3, 0], 7),
    (1, 4, 2, 128, 32, 128, [10], 106),
    (3, 6, 1, 64, 32, 64, [33, 33, 33], 70),
]


def block_mask(tokens, block, start, ctx_len):
    """[T, ctx_len + T] bool: which context positions and own tokens each query token sees."""
    t = torch.arange(tokens)
    limit = start + (t // block) * block
    ctx = torch.arange(ctx_len).unsqueeze(0) < limit.unsqueeze(1)
    own = (t.unsqueeze(1) // block) == (t.unsqueeze(0) // block)
    return torch.cat([ctx, own], dim=1)


def reference_block_attention(q, k_ctx, v_ctx, k_own, v_own, block, start, scale=None,
                              dtype=torch.float64):
    """(out, lse) of block_attention with plain PyTorch in `dtype` on the CPU (explicit mask).
    Differentiable: autograd through it gives the reference gradients."""
    q, kc, vc, ko, vo = (t.cpu().to(dtype) for t in (q, k_ctx, v_ctx, k_own, v_own))
    batch, hq, tokens, dim = q.shape
    hkv = kc.shape[1]
    group = hq // hkv
    scale = dim ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(batch):
        ctx_len = start[b] + tokens - block
        mask = block_mask(tokens, block, start[b], ctx_len)
        keys = torch.cat([kc[b, :, :ctx_len], ko[b]], dim=1).repeat_interleave(group, 0)
        values = torch.cat([vc[b, :, :ctx_len], vo[b]], dim=1).repeat_interleave(group, 0)
        logits = (q[b] @ keys.transpose(1, 2)) * scale
        logits = logits.masked_fill(~mask, float("-inf"))
        outs.append(torch.softmax(logits, dim=-1) @ values)
        lses.append(torch.logsumexp(logits, dim=-1))
    return torch.stack(outs).double(), torch.stack(lses).double()


def make(shape, dtype, device, gen, requires_grad=False):
    batch, hq, hkv, dim, block, tokens, start, n = shape

    def rnd(*s):
        t = torch.randn(*s, generator=gen).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    return dict(q=rnd(batch, hq, tokens, dim), k_ctx=rnd(batch, hkv, n, dim),
                v_ctx=rnd(batch, hkv, n, dim), k_own=rnd(batch, hkv, tokens, dim),
                v_own=rnd(batch, hkv, tokens, dim)), block, start


INPUTS = ("q", "k_ctx", "v_ctx", "k_own", "v_own")


def run_op(t, block, start, scale=None):
    return mage_ext.block_attention(*(t[k] for k in INPUTS), block, start, scale)


def reference_grads(t, block, start, dout, dtype=torch.float64):
    leaves = {k: t[k].detach().cpu().to(dtype).requires_grad_(True) for k in INPUTS}
    out, _ = reference_block_attention(*(leaves[k] for k in INPUTS), block, start, dtype=dtype)
    out.backward(dout.cpu().double())
    return {k: leaves[k].grad.double() for k in INPUTS}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, dtype, device, gen):
    t, block, start = make(shape, dtype, device, gen)
    out, lse = run_op(t, block, start)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == t["q"].shape and lse.shape == t["q"].shape[:3]
    ref64 = reference_block_attention(*(t[k] for k in INPUTS), block, start)
    ref_pt = reference_block_attention(*(t[k] for k in INPUTS), block, start, dtype=dtype)
    assert_close_fa(out, ref64[0], ref_pt[0], dtype, "out")
    assert_close_fa(lse, ref64[1], ref_pt[1], dtype, "lse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_backward_matches_reference(shape, dtype, device, gen):
    t, block, start = make(shape, dtype, device, gen, requires_grad=True)
    out, _ = run_op(t, block, start)
    dout = torch.randn(out.shape, generator=gen).to(dtype).to(device)
    out.backward(dout)
    ref64 = reference_grads(t, block, start, dout)
    ref_pt = reference_grads(t, block, start, dout, dtype=dtype)
    for k in INPUTS:
        assert t[k].grad.dtype == dtype and t[k].grad.shape == t[k].shape
        assert_close_fa(t[k].grad, ref64[k], ref_pt[k], dtype, f"d{k}")
    # Context positions past start + T - block are never read: their gradient is exactly zero.
    tokens = t["q"].shape[2]
    for b, s in enumerate(start):
        assert torch.count_nonzero(t["k_ctx"].grad[b, :, s + tokens - block:]) == 0
        assert torch.count_nonzero(t["v_ctx"].grad[b, :, s + tokens - block:]) == 0


def test_explicit_scale_and_strided_inputs(gen):
    t, block, start = make((2, 8, 2, 64, 4, 16, [9, 2], 30), torch.float32, "cpu", gen)
    # A cache that is a slice of a larger one (free batch / head strides) and a transposed q.
    big_k = torch.randn(2, 3, 30, 64, generator=gen)
    big_v = torch.randn(2, 3, 30, 64, generator=gen)
    t["k_ctx"], t["v_ctx"] = big_k[:, 1:], big_v[:, 1:]
    t["q"] = t["q"].transpose(1, 2).contiguous().transpose(1, 2)
    out, lse = run_op(t, block, start, scale=0.3)
    ref = reference_block_attention(*(t[k] for k in INPUTS), block, start, scale=0.3)
    assert max_error(out, ref[0]) < 1e-5 and max_error(lse, ref[1]) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_block_equals_dense_attention(dtype, device, gen):
    """T == block_size: the op is dense_attention with cache_lens = start and block = own."""
    t, block, start = make((3, 12, 2, 64, 16, 16, [0, 37, 5], 40), dtype, device, gen)
    out, lse = run_op(t, block, start)
    lens = torch.tensor(start, dtype=torch.int32, device=device)
    d_out, d_lse = mage_ext.dense_attention(t["q"], t["k_ctx"], t["v_ctx"], lens, t["k_own"],
                                            t["v_own"])
    ref64 = reference_block_attention(*(t[k] for k in INPUTS), block, start)
    tol = 4 * rounding_noise(dtype, ref64[0]) + 1e-5
    assert max_error(out, d_out) <= tol
    assert max_error(lse, d_lse) <= 4 * rounding_noise(dtype, ref64[1]) + 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_equals_block_by_block(dtype, device, gen):
    """A chunk of many blocks prefilled in one call equals prefilling it block by block with
    dense_attention (the cache already holds the chunk's k/v, as after append_kv)."""
    batch, hq, hkv, dim, block, capacity = 2, 6, 2, 64, 8, 120
    prefix = [29, 64]
    tokens = 48
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    k_cache, v_cache = rnd(batch, hkv, capacity, dim), rnd(batch, hkv, capacity, dim)
    q, k_chunk, v_chunk = rnd(batch, hq, tokens, dim), rnd(batch, hkv, tokens, dim), rnd(batch, hkv, tokens, dim)
    mage_ext.append_kv(k_cache, v_cache, torch.tensor(prefix, dtype=torch.int32, device=device),
                       k_chunk, v_chunk)
    out, lse = mage_ext.block_attention(q, k_cache, v_cache, k_chunk, v_chunk, block, prefix)
    for j in range(tokens // block):
        rows = slice(j * block, (j + 1) * block)
        lens = torch.tensor([p + j * block for p in prefix], dtype=torch.int32, device=device)
        o_j, l_j = mage_ext.dense_attention(q[:, :, rows], k_cache, v_cache, lens,
                                            k_chunk[:, :, rows], v_chunk[:, :, rows])
        noise = rounding_noise(dtype, o_j.float())
        assert max_error(out[:, :, rows], o_j) <= 4 * noise + 1e-5, f"block {j}"
        assert max_error(lse[:, :, rows], l_j) <= 4 * rounding_noise(dtype, l_j.float()) + 1e-5


def two_copy_reference(q_n, q_c, k_n, k_c, v_n, v_c, block):
    """Block-diffusion training attention over [noisy; clean] (2T tokens) with the full mask:
    noisy block j sees clean blocks < j and noisy block j; clean block j sees clean blocks <= j."""
    tokens = q_n.shape[2]
    blk = torch.arange(tokens) // block
    nn = blk.unsqueeze(1) == blk.unsqueeze(0)
    nc = blk.unsqueeze(0) < blk.unsqueeze(1)
    cc = blk.unsqueeze(0) <= blk.unsqueeze(1)
    mask = torch.cat([torch.cat([nn, nc], 1), torch.cat([torch.zeros_like(nn), cc], 1)], 0)
    group = q_n.shape[1] // k_n.shape[1]
    q = torch.cat([q_n, q_c], 2)
    k = torch.cat([k_n, k_c], 2).repeat_interleave(group, 1)
    v = torch.cat([v_n, v_c], 2).repeat_interleave(group, 1)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    out = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ v
    return out[:, :, :tokens], out[:, :, tokens:]


def test_training_two_copy_layout(gen):
    """Noisy copy = block_attention(ctx = clean, own = noisy, start 0); clean copy =
    block_attention(ctx = own = clean, start 0): outputs and gradients (the clean K/V receive
    gradient from both calls, as context and as own block) equal the full-mask reference."""
    batch, hq, hkv, dim, block, tokens = 2, 6, 2, 32, 4, 24
    leaves = [torch.randn(batch, h, tokens, dim, generator=gen, dtype=torch.float64).requires_grad_()
              for h in (hq, hq, hkv, hkv, hkv, hkv)]
    q_n, q_c, k_n, k_c, v_n, v_c = leaves
    start = [0] * batch
    out_n, _ = mage_ext.block_attention(q_n, k_c, v_c, k_n, v_n, block, start)
    out_c, _ = mage_ext.block_attention(q_c, k_c, v_c, k_c, v_c, block, start)
    ref_n, ref_c = two_copy_reference(*leaves, block)
    assert max_error(out_n, ref_n) < 1e-12 and max_error(out_c, ref_c) < 1e-12
    w_n, w_c = torch.randn_like(ref_n), torch.randn_like(ref_c)
    got = torch.autograd.grad((out_n * w_n).sum() + (out_c * w_c).sum(), leaves)
    want = torch.autograd.grad((ref_n * w_n).sum() + (ref_c * w_c).sum(), leaves)
    for name, g, w in zip(["q_n", "q_c", "k_n", "k_c", "v_n", "v_c"], got, want):
        assert max_error(g, w) < 1e-11, name


@pytest.mark.parametrize("fast_mode", [True, False])
def test_gradcheck_float64(fast_mode, gen):
    """GQA 2, two sequences with different starts (one below the block size: a prefix part,
    a diagonal part with a query offset, a context slack past what is read)."""
    shape = (2, 4, 2, 8, 3, 6, [2, 5], 12) if fast_mode else (2, 4, 2, 4, 2, 4, [1, 3], 6)
    t, block, start = make(shape, torch.float64, "cpu", gen, requires_grad=True)

    def fn(*args):
        return mage_ext.block_attention(*args, block, start)[0]

    assert torch.autograd.gradcheck(fn, tuple(t[k] for k in INPUTS), fast_mode=fast_mode)


def test_gradcheck_start_zero_one_block(gen):
    t, block, start = make((1, 3, 1, 4, 5, 5, [0], 1), torch.float64, "cpu", gen,
                           requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: mage_ext.block_attention(*a, block, start)[0],
                                    tuple(t[k] for k in INPUTS))


def test_lse_has_no_gradient_and_double_backward_is_refused(gen):
    t, block, start = make((1, 4, 2, 16, 4, 8, [3], 12), torch.float64, "cpu", gen,
                           requires_grad=True)
    out, lse = run_op(t, block, start)
    assert not lse.requires_grad and out.requires_grad
    g = torch.autograd.grad(out.sum(), t["q"], create_graph=False)[0]
    assert g.shape == t["q"].shape
    out, _ = run_op(t, block, start)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), t["q"], create_graph=True)


def test_backward_op_matches_autograd(gen):
    t, block, start = make((2, 4, 2, 16, 4, 8, [3, 0], 12), torch.float32, "cpu", gen,
                           requires_grad=True)
    out, lse = run_op(t, block, start)
    dout = torch.randn_like(out)
    out.backward(dout)
    grads = mage_ext.ops.block_attention_backward(dout, *(t[k].detach() for k in INPUTS),
                                                  out.detach(), lse, block, start)
    for k, g in zip(INPUTS, grads):
        assert torch.equal(g, t[k].grad), k


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    ops = torch.ops.mage
    for dtype, grad in [(torch.float32, True), (torch.float64, True), (torch.bfloat16, False)]:
        t, block, start = make((2, 4, 2, 16, 4, 8, [3, 0], 12), dtype, device, gen,
                               requires_grad=grad)
        args = tuple(t[k] for k in INPUTS) + (block, start, None)
        torch.library.opcheck(ops.block_attention.default, args)
        out, lse = ops.block_attention.default(*(a.detach() if torch.is_tensor(a) else a
                                                 for a in args))
        bargs = (torch.randn_like(out),) + tuple(t[k].detach() for k in INPUTS) + (
            out, lse, block, start, 0.25)
        torch.library.opcheck(ops.block_attention_backward.default, bargs)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_training_step(device, gen):
    """A tiny training step (two-copy layout, shared clean K/V) through torch.compile."""
    block, start = 4, [0]
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    x_noisy, x_clean = rnd(1, 12, 16), rnd(1, 12, 16)
    weights = [rnd(16, 16).requires_grad_(), rnd(16, 8).requires_grad_(), rnd(16, 8).requires_grad_()]

    def step(x_n, x_c, wq, wk, wv):
        def heads(x, w):  # head dim 4: wq gives 4 query heads, wk / wv 2 KV heads
            return (x @ w).view(1, 12, -1, 4).transpose(1, 2)
        q_n, q_c = heads(x_n, wq), heads(x_c, wq)
        k_n, k_c, v_n, v_c = heads(x_n, wk), heads(x_c, wk), heads(x_n, wv), heads(x_c, wv)
        o_n, _ = mage_ext.block_attention(q_n, k_c, v_c, k_n, v_n, block, start)
        o_c, _ = mage_ext.block_attention(q_c, k_c, v_c, k_c, v_c, block, start)
        return o_n.square().mean() + o_c.abs().mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x_noisy, x_clean, *weights)
    got = torch.autograd.grad(loss, weights)
    loss_ref = step(x_noisy, x_clean, *weights)
    want = torch.autograd.grad(loss_ref, weights)
    torch.testing.assert_close(loss, loss_ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


BAD = [
    (dict(block_size=5), "not a multiple of block_size"),
    (dict(block_size=0), "block_size must be >= 1"),
    (dict(start=[1]), "start must have 2 entries"),
    (dict(start=[-1, 0]), r"start\[0\] = -1 must be >= 0"),
    (dict(start=[0, 9]), r"start\[1\] = 9 needs k_ctx positions up to"),
    (dict(k_own=torch.zeros(2, 2, 9, 16)), "k_own must have shape"),
    (dict(v_ctx=torch.zeros(2, 2, 12, 16, dtype=torch.float64)), "v_ctx has dtype"),
    (dict(q=torch.zeros(2, 3, 8, 16)), "not a multiple of the 2 KV heads"),
    (dict(k_ctx=torch.zeros(2, 2, 16, 12).transpose(2, 3)), "k_ctx must have a contiguous last dim"),
    (dict(q=torch.zeros(2, 4, 8, 16, dtype=torch.int32)), "q must be float16"),
    (dict(scale=-1.0), "scale must be a positive finite number"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_inputs(change, message):
    args = dict(q=torch.zeros(2, 4, 8, 16), k_ctx=torch.zeros(2, 2, 12, 16),
                v_ctx=torch.zeros(2, 2, 12, 16), k_own=torch.zeros(2, 2, 8, 16),
                v_own=torch.zeros(2, 2, 8, 16), block_size=4, start=[0, 8], scale=None)
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.mage.block_attention(*args.values())


def test_bad_backward_inputs():
    args = [torch.zeros(2, 4, 8, 16)] + [torch.zeros(2, 4, 8, 16), torch.zeros(2, 2, 12, 16),
                                         torch.zeros(2, 2, 12, 16), torch.zeros(2, 2, 8, 16),
                                         torch.zeros(2, 2, 8, 16), torch.zeros(2, 4, 8, 16),
                                         torch.zeros(2, 4, 8, dtype=torch.float16), 4, [0, 0]]
    with pytest.raises(RuntimeError, match="lse must have dtype Float"):
        torch.ops.mage.block_attention_backward(*args)


MEMORY_SCRIPT = """
import resource, sys, torch, mage_ext
torch.manual_seed(0)
T, block = 8192, 32
q = torch.randn(1, 2, T, 16, requires_grad=True)
kv = [torch.randn(1, 1, T, 16, requires_grad=True) for _ in range(4)]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, lse = mage_ext.block_attention(q, kv[0], kv[1], kv[2], kv[3], block, [0])
out.sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024, bool(torch.isfinite(out).all()), bool(torch.isfinite(q.grad).all()))
"""


def test_memory_linear_in_tokens():
    """T = 8192 forward + backward on the CPU: the process's peak memory grows by far less than
    one T x T fp32 score matrix of one head (256 MB); the chunks bound it (tile: Hkv x G*256 x
    1024 scores; local part: <= 2^23 scores)."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                         timeout=600)
    assert res.returncode == 0, res.stderr
    grew, out_ok, grad_ok = res.stdout.split()
    assert out_ok == "True" and grad_ok == "True"
    assert int(grew) < 96 * 2**20, f"peak memory grew by {int(grew) / 2**20:.0f} MB"


# ---------------------------------------------------------------------------------------------
# GPU: every kernel path (fused tensor-core kernels and the generic ATen one).

KERNELS = ["flash", "cudnn", "efficient", "generic"]
CUDA_SHAPES = [
    (1, 12, 2, 128, 32, 256, [0], 256),         # training: start 0, GQA 6
    (2, 8, 2, 64, 32, 192, [1000, 17], 1300),   # prefill chunks, different starts (prefix A)
    (2, 16, 16, 128, 16, 64, [40, 40], 130),    # MHA, equal starts (batched), start > block
    (1, 8, 4, 64, 4, 36, [2], 40),              # small block, start < block
]


def kernel_env(monkeypatch, kernel):
    monkeypatch.setenv("MAGE_BLOCK_ATTENTION_KERNEL", kernel)
    monkeypatch.setenv("MAGE_BLOCK_ATTENTION_STRICT", "1")


def poison_cuda_cache():
    """Fills freed caching-allocator memory with NaN: outputs the op allocates and leaves
    partly unwritten then fail the comparison instead of passing on zeros."""
    junk = torch.full((256 << 20,), float("nan"), device="cuda")
    del junk


def cuda_dtypes(kernel):
    return [torch.float32] if kernel == "efficient" else [torch.bfloat16, torch.float16] + (
        [torch.float32] if kernel == "generic" else [])


@requires_cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_kernels_forward_backward(kernel, shape, monkeypatch, gen):
    kernel_env(monkeypatch, kernel)
    for dtype in cuda_dtypes(kernel) + ([torch.bfloat16] if kernel == "efficient" else []):
        t, block, start = make(shape, dtype, "cuda", gen, requires_grad=True)
        poison_cuda_cache()
        out, lse = run_op(t, block, start)
        ref64 = reference_block_attention(*(t[k].detach() for k in INPUTS), block, start)
        ref_pt = reference_block_attention(*(t[k].detach() for k in INPUTS), block, start,
                                           dtype=dtype)
        what = f"{kernel} {dtype}"
        assert_close_fa(out, ref64[0], ref_pt[0], dtype, f"{what} out")
        assert_close_fa(lse, ref64[1], ref_pt[1], dtype, f"{what} lse")
        dout = torch.randn(out.shape, generator=gen).to(dtype).cuda()
        poison_cuda_cache()
        out.backward(dout)
        g64 = reference_grads(t, block, start, dout)
        g_pt = reference_grads(t, block, start, dout, dtype=dtype)
        # fp32 gradients: the CPU fp32 reference is nearly exact, so the 2x rule alone is
        # tighter than the GPU kernels' other summation order (seen: 26 ulps, SDPA efficient)
        units = 64.0 if dtype == torch.float32 else 1.0
        for k in INPUTS:
            assert_close_fa(t[k].grad, g64[k], g_pt[k], dtype, f"{what} d{k}", units)


@requires_cuda
@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
def test_cuda_fused_equals_generic(kernel, monkeypatch, gen):
    t, block, start = make((2, 12, 2, 128, 32, 512, [300, 300], 900), torch.bfloat16, "cuda",
                           gen)
    kernel_env(monkeypatch, kernel)
    out, lse = run_op(t, block, start)
    kernel_env(monkeypatch, "generic")
    g_out, g_lse = run_op(t, block, start)
    assert max_error(out, g_out) < 2e-2 and max_error(lse, g_lse) < 2e-3


@requires_cuda
def test_cuda_auto_trains_with_cudnn_and_infers_with_flash(monkeypatch, gen):
    """auto: on sm90+ a forward whose inputs require grad takes cuDNN (faster for training,
    measured; its backward too), a small one on inputs that do not (inference: activations made
    under no_grad / inference_mode) takes flash (a cuDNN graph per shape would not pay off), a
    prefill chunk of >= 2048 tokens over >= 48K keys cuDNN again. Forwards are deterministic, so auto's output is
    the forced kernel's bit for bit (backwards add dQ with atomics: their accuracy is
    test_cuda_kernels_forward_backward's)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuDNN is the training default on sm90+ only")
    t, block, start = make((1, 12, 2, 128, 32, 256, [0], 256), torch.bfloat16, "cuda", gen,
                           requires_grad=True)
    frozen = {k: v.detach() for k, v in t.items()}

    def forward(kernel, inputs):
        kernel_env(monkeypatch, kernel)
        with torch.no_grad():
            return run_op(inputs, block, start)[0]

    assert torch.equal(forward("auto", t), forward("cudnn", t))
    assert torch.equal(forward("auto", frozen), forward("flash", frozen))
    assert not torch.equal(forward("cudnn", t), forward("flash", frozen))
    # a prefill chunk: 2048 tokens over 46K + 2048 keys takes cuDNN, over 4K + 2048 flash
    chunk, block, start = make((1, 12, 2, 128, 32, 2048, [47104], 47104 + 2048), torch.bfloat16,
                               "cuda", gen)
    assert torch.equal(forward("auto", chunk), forward("cudnn", chunk))
    assert not torch.equal(forward("auto", chunk), forward("flash", chunk))
    start = [4096]
    assert torch.equal(forward("auto", chunk), forward("flash", chunk))


@requires_cuda
@pytest.mark.parametrize("hq,hkv", [(12, 2), (28, 4), (8, 8)])
def test_cuda_cudnn_prefill_chunk(hq, hkv, monkeypatch, gen):
    """A prefill chunk (512 tokens over a prefix of up to 700, batch 2 with different starts)
    through cuDNN, whose forward takes the GQA heads unexpanded: the float64 reference."""
    kernel_env(monkeypatch, "cudnn")
    t, block, start = make((2, hq, hkv, 128, 32, 512, [700, 123], 700 + 512),
                           torch.bfloat16, "cuda", gen)
    poison_cuda_cache()
    with torch.no_grad():
        out, lse = run_op(t, block, start)
    ref64 = reference_block_attention(*(t[k] for k in INPUTS), block, start)
    ref_pt = reference_block_attention(*(t[k] for k in INPUTS), block, start, dtype=torch.bfloat16)
    assert_close_fa(out, ref64[0], ref_pt[0], torch.bfloat16, "cudnn chunk out")
    assert_close_fa(lse, ref64[1], ref_pt[1], torch.bfloat16, "cudnn chunk lse")


@requires_cuda
def test_cuda_chunked_prefill_equals_block_by_block(monkeypatch, gen):
    kernel_env(monkeypatch, "auto")
    test_chunked_prefill_equals_block_by_block(torch.bfloat16, "cuda", gen)


@requires_cuda
def test_cuda_grad_of_unread_context_is_zero(monkeypatch, gen):
    kernel_env(monkeypatch, "auto")
    t, block, start = make((1, 4, 2, 64, 32, 64, [10], 200), torch.bfloat16, "cuda", gen,
                           requires_grad=True)
    poison_cuda_cache()
    out, _ = run_op(t, block, start)
    out.sum().backward()
    assert t["k_ctx"].grad[:, :, 10 + 64 - 32:].abs().max().item() == 0
    assert torch.isfinite(t["k_ctx"].grad).all()


@requires_cuda
@pytest.mark.parametrize("kernel", ["flash", "generic"])
def test_cuda_no_host_synchronisation(kernel, monkeypatch, gen):
    """Forward and backward enqueue work only: no host sync (CUDA-graph and prefill-loop safe)."""
    kernel_env(monkeypatch, kernel)
    t, block, start = make((2, 12, 2, 128, 32, 256, [1000, 7], 1400), torch.bfloat16, "cuda",
                           gen, requires_grad=True)
    run_op(t, block, start)[0].sum().backward()  # warm-up: first calls may initialise state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = run_op(t, block, start)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
