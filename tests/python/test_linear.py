"""mage.linear (the decoding forward's GEMMs): torch.nn.functional.linear's values and autograd
on the CPU; on a GPU the experimental few-row split-K kernel (MAGE_SKINNY_GEMM=on) against an fp64 reference with the
FlashAttention tolerance rule (within 2x cuBLAS's own error in the same dtype), on odd shapes,
every row count it takes, with and without bias, deterministic, inside a CUDA graph; the inputs it
does not take go to cuBLAS unchanged; bad inputs fail by name."""
import pytest
import torch
import torch.nn.functional as F

import mage_ext  # noqa: F401  (registers torch.ops.mage)
from mage_ext import ops
from conftest import capture, requires_cuda

# (N, K): the 1.5B shape's QKV, O, gate|up and down, an LM head's width, and odd sizes
# (N not a multiple of the 64-row tile, K not of the 32-K chunk, K smaller than one group).
SHAPES = [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960), (151936 // 8, 1536),
          (200, 72), (65, 1000), (1, 8), (130, 4104)]


def test_cpu_equals_f_linear_with_its_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 24, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    y = ops.linear(x, w, b)
    assert torch.equal(y, F.linear(x, w, b))
    torch.autograd.gradcheck(ops.linear, (x, w, b))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xs, ws = x.detach().to(dtype), w.detach().to(dtype)
        assert torch.equal(ops.linear(xs, ws), F.linear(xs, ws))


def test_opcheck_and_compile():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 4, 16, generator=g), torch.randn(8, 16, generator=g), \
        torch.randn(8, generator=g)
    torch.library.opcheck(torch.ops.mage.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.mage.linear.default, (x.requires_grad_(), w, None))
    compiled = torch.compile(lambda x: ops.linear(x, w, b), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x.detach()), F.linear(x.detach(), w, b))


@pytest.mark.parametrize("bad, match", [
    (lambda x, w, b: (x, w[:, :-1], b), "x must be \\[..., K\\] with K = weight.size\\(1\\)"),
    (lambda x, w, b: (x, w[0], b), "weight must be a 2-D tensor"),
    (lambda x, w, b: (x, w.double(), b), "weight has dtype"),
    (lambda x, w, b: (x, w, b[:-1]), "bias must have shape"),
    (lambda x, w, b: (x.long(), w, b), "x must be a floating-point tensor"),
])
def test_bad_inputs_fail_by_name(bad, match):
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    with pytest.raises(RuntimeError, match=match):
        ops.linear(*bad(x, w, b))


# -- GPU ----------------------------------------------------------------------------------------

@pytest.fixture
def skinny(monkeypatch):
    """The experimental kernel switched on (cuBLAS is the default)."""
    monkeypatch.setenv("MAGE_SKINNY_GEMM", "on")
    return monkeypatch

def _case(n, k, rows, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    # activations of a normed hidden state (~1) and weights of a trained layer (~0.02)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    return x, w, b


def _assert_within_cublas_error(got, x, w, b):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    cublas = F.linear(x.cuda(), w.cuda(), None if b is None else b.cuda()).cpu()
    err = (got.cpu().double() - ref).abs().max().item()
    base = (cublas.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-5, f"max error {err:.3g}, cuBLAS's {base:.3g}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k", SHAPES)
def test_skinny_kernel_against_fp64(n, k, dtype, skinny):
    for rows, bias in [(32, True), (1, False), (7, True), (17, False), (31, False)]:
        x, w, b = _case(n, k, rows, dtype, bias, seed=n + k + rows)
        y = ops.linear(x.cuda(), w.cuda(), None if b is None else b.cuda())
        assert y.shape == (rows, n) and y.dtype == dtype
        _assert_within_cublas_error(y, x, w, b)


@requires_cuda
def test_batch_shapes_strides_and_determinism(skinny):
    x, w, b = _case(300, 520, 32, torch.bfloat16, True, seed=3)
    x3 = x.cuda().view(2, 16, 520)
    y = ops.linear(x3, w.cuda(), b.cuda())
    assert y.shape == (2, 16, 300)
    _assert_within_cublas_error(y.view(32, 300), x, w, b)
    assert torch.equal(ops.linear(x3, w.cuda(), b.cuda()), y)  # the same sums in the same order
    wide = torch.randn(2, 16, 1040, device="cuda", dtype=torch.bfloat16)
    wide[..., :520] = x3
    assert torch.equal(ops.linear(wide[..., :520], w.cuda(), b.cuda()), y)  # strided x


@requires_cuda
@pytest.mark.parametrize("splits", ["1", "3", "8"])
def test_every_split_count_gives_the_same_values_within_tolerance(splits, skinny):
    skinny.setenv("MAGE_SKINNY_SPLITS", splits)
    x, w, b = _case(640, 2056, 32, torch.bfloat16, True, seed=5)
    _assert_within_cublas_error(ops.linear(x.cuda(), w.cuda(), b.cuda()), x, w, b)


@requires_cuda
def test_inputs_outside_the_kernel_go_to_cublas(skinny):
    monkeypatch = skinny
    cases = [_case(64, 64, 33, torch.bfloat16, True, 1),    # more than 32 rows
             _case(64, 60, 8, torch.bfloat16, True, 2),     # K not a multiple of 8
             _case(64, 64, 8, torch.float32, True, 3)]      # fp32
    for x, w, b in cases:
        x, w, b = x.cuda(), w.cuda(), b.cuda()
        assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))
    x, w, b = (t.cuda() for t in _case(64, 64, 8, torch.bfloat16, True, 4))
    for off in ("off", ""):  # the default
        monkeypatch.setenv("MAGE_SKINNY_GEMM", off)
        assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))
    monkeypatch.setenv("MAGE_SKINNY_GEMM", "fast")
    with pytest.raises(RuntimeError, match="MAGE_SKINNY_GEMM must be"):
        ops.linear(x, w, b)
    monkeypatch.setenv("MAGE_SKINNY_GEMM", "on")
    monkeypatch.setenv("MAGE_SKINNY_SPLITS", "9")
    with pytest.raises(RuntimeError, match="MAGE_SKINNY_SPLITS must be"):
        ops.linear(x, w, b)


@requires_cuda
def test_in_a_cuda_graph(skinny):
    x, w, b = (t.cuda() for t in _case(1000, 1536, 32, torch.bfloat16, True, 6))
    want = ops.linear(x, w, b)
    out = {}

    def step():
        out["y"] = ops.linear(x, w, b)  # the captured run's output stays the graph's
    graph = capture(step)
    out["y"].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out["y"], want)
