"""The fused layer ops (rms_norm, qkv_rope, silu_mul) against the transformers modules they
replace: bit-identical on the CPU (the ATen sequence) and, on a GPU, the CUDA kernels against the
same modules run on the GPU. Plus fp64 references, opcheck, poisoned and in-place outputs, bad
inputs, torch.compile, and the *_out forms inside a CUDA graph."""
import math

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import (Qwen2RMSNorm, Qwen2RotaryEmbedding,
                                                      apply_rotary_pos_emb)
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding

import mage_ext  # noqa: F401  (registers torch.ops.mage)
from mage_ext import ops
from conftest import DEVICES, requires_cuda
from reference import poison
from test_cuda import capture

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6
THETA = 1e6  # Qwen2.5 / Fast-dLLM v2's rope_theta


def randn(*shape, gen, dtype, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def near_128k_positions(batch, block, gen, device="cpu"):
    """Positions [batch, B] int64: one sequence just below 128K, one at the start, one between
    (large angles are where an fp32 or a differently rounded angle would show)."""
    starts = [131072 - block - int(torch.randint(0, 4096, (1,), generator=gen)),
              int(torch.randint(0, 64, (1,), generator=gen)),
              100000 + int(torch.randint(0, 4096, (1,), generator=gen))]
    starts = [starts[b % 3] for b in range(batch)]
    pos = torch.stack([torch.arange(s, s + block) for s in starts])
    return pos.to(device)


def rope_inv_freq(d, device="cpu"):
    """The rotary module's inv_freq (fp32) for head dim d."""
    config = Qwen2Config(hidden_size=4 * d, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=d, rope_theta=THETA)
    return Qwen2RotaryEmbedding(config).inv_freq.to(device)


def assert_equal(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if not torch.equal(got, want):
        diff = (got.float() - want.float()).abs()
        bad = (got != want).sum().item()
        raise AssertionError(f"{what}: {bad} of {got.numel()} elements differ, max |diff| "
                             f"{diff.max().item():.3g}")


# ---------------------------------------------------------------------------------------------
# The transformers module sequences the ops replace (run on the inputs' device).


def hf_rms_norm(x, weight, eps, residual=None):
    """A decoder layer's `hidden_states = residual + hidden_states` then Qwen2RMSNorm."""
    h = residual + x if residual is not None else x
    norm = Qwen2RMSNorm(x.shape[-1], eps=eps).to(device=x.device, dtype=x.dtype)
    norm.weight.data.copy_(weight)
    with torch.no_grad():
        return norm(h), h


def hf_qkv_rope(qkv, positions, hq, hkv, d, qk_norm=None, eps=EPS):
    """The attention's q/k/v projections' outputs (separate, contiguous), Qwen3's q_norm /
    k_norm when qk_norm = (q_weight, k_weight), the transpose and apply_rotary_pos_emb with the
    rotary module's cos / sin. Returns (q, k, v, inv_freq)."""
    batch, block, _ = qkv.shape
    cls_cfg, cls_rot = (Qwen3Config, Qwen3RotaryEmbedding) if qk_norm else (Qwen2Config,
                                                                              Qwen2RotaryEmbedding)
    config = cls_cfg(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv,
                     head_dim=d, rope_theta=THETA, max_position_embeddings=262144)
    rotary = cls_rot(config).to(qkv.device)
    q = qkv[..., :hq * d].contiguous().view(batch, block, hq, d)
    k = qkv[..., hq * d:(hq + hkv) * d].contiguous().view(batch, block, hkv, d)
    v = qkv[..., (hq + hkv) * d:].contiguous().view(batch, block, hkv, d)
    with torch.no_grad():
        if qk_norm:
            norms = []
            for w in qk_norm:
                m = Qwen3RMSNorm(d, eps=eps).to(device=qkv.device, dtype=qkv.dtype)
                m.weight.data.copy_(w)
                norms.append(m)
            q, k = norms[0](q), norms[1](k)
        cos, sin = rotary(qkv, positions)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v.transpose(1, 2), rotary.inv_freq


def hf_silu_mul(gate_up):
    """Qwen2MLP's act_fn(gate_proj(x)) * up_proj(x), the projections as separate tensors."""
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inter].contiguous(), gate_up[..., inter:].contiguous()
    with torch.no_grad():
        return ACT2FN["silu"](gate) * up


# ---------------------------------------------------------------------------------------------
# CPU: the ops equal the modules bit for bit.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [256, 1536])
@pytest.mark.parametrize("block", [1, 4, 32])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_is_qwen2_rmsnorm(dtype, hidden, block, with_residual, gen):
    x = randn(3, block, hidden, gen=gen, dtype=dtype, scale=4.0)
    weight = randn(hidden, gen=gen, dtype=dtype)
    residual = randn(3, block, hidden, gen=gen, dtype=dtype, scale=8.0) if with_residual else None
    want, want_h = hf_rms_norm(x, weight, EPS, residual)
    out, new_residual = ops.rms_norm(x, weight, EPS, residual)
    assert_equal(out, want, "out")
    assert_equal(new_residual, want_h, "new_residual")
    assert new_residual.data_ptr() != x.data_ptr()  # a copy of x without a residual


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(12, 2), (8, 2)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block", [1, 4, 32])
@pytest.mark.parametrize("qwen3", [False, True])
def test_qkv_rope_is_transformers_attention_prologue(dtype, heads, d, block, qwen3, gen):
    hq, hkv = heads
    qkv = randn(3, block, (hq + 2 * hkv) * d, gen=gen, dtype=dtype, scale=3.0)
    positions = near_128k_positions(3, block, gen)
    qk_norm = (randn(d, gen=gen, dtype=dtype), randn(d, gen=gen, dtype=dtype)) if qwen3 else None
    want_q, want_k, want_v, inv_freq = hf_qkv_rope(qkv, positions, hq, hkv, d, qk_norm)
    assert inv_freq.dtype == torch.float32
    q, k, v = ops.qkv_rope(qkv, positions, inv_freq, hq, hkv, d,
                           *(qk_norm if qwen3 else (None, None)), EPS)
    for got, want, name in [(q, want_q, "q"), (k, want_k, "k"), (v, want_v, "v")]:
        assert got.is_contiguous(), name
        assert_equal(got, want, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [256, 8960, 100])
@pytest.mark.parametrize("block", [1, 32])
def test_silu_mul_is_qwen2_mlp_act(dtype, inter, block, gen):
    gate_up = randn(3, block, 2 * inter, gen=gen, dtype=dtype, scale=4.0)
    assert_equal(ops.silu_mul(gate_up), hf_silu_mul(gate_up), "out")


def test_ops_close_to_float64_math(gen):
    """The modules themselves against fp64 math (guards the references above)."""
    x = randn(5, 7, 256, gen=gen, dtype=torch.float32)
    r = randn(5, 7, 256, gen=gen, dtype=torch.float32)
    w = randn(256, gen=gen, dtype=torch.float32)
    out, h = ops.rms_norm(x, w, EPS, r)
    h64 = x.double() + r.double()
    ref = w.double() * h64 / torch.sqrt(h64.pow(2).mean(-1, keepdim=True) + EPS)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    hq, hkv, d, block = 4, 2, 64, 5
    qkv = randn(2, block, (hq + 2 * hkv) * d, gen=gen, dtype=torch.float32)
    positions = torch.stack([torch.arange(block), torch.arange(1000, 1000 + block)])
    inv_freq = 1.0 / (THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    q, k, v = ops.qkv_rope(qkv, positions, inv_freq.float(), hq, hkv, d)
    ang = (positions.float()[..., None] * inv_freq.float()).double()  # angles are fp32
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    q64 = qkv[..., :hq * d].double().reshape(2, block, hq, d).transpose(1, 2)
    rot = torch.cat([-q64[..., d // 2:], q64[..., :d // 2]], -1)
    torch.testing.assert_close(q.double(), q64 * cos + rot * sin, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, qkv[..., (hq + hkv) * d:].reshape(2, block, hkv, d)
                               .transpose(1, 2))

    gu = randn(3, 64, gen=gen, dtype=torch.float32)
    g64, u64 = gu[:, :32].double(), gu[:, 32:].double()
    torch.testing.assert_close(ops.silu_mul(gu).double(), g64 * torch.sigmoid(g64) * u64,
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Preallocated outputs, in place, opcheck, compile, bad inputs (every device).


def fused_op_cases(device, dtype, gen):
    """(op, args) of every fused op on small random inputs: opcheck runs them all."""
    hidden, hq, hkv, d, block = 64, 4, 2, 32, 3
    x = randn(2, block, hidden, gen=gen, dtype=dtype, device=device)
    r = randn(2, block, hidden, gen=gen, dtype=dtype, device=device)
    w = randn(hidden, gen=gen, dtype=dtype, device=device)
    qkv = randn(2, block, (hq + 2 * hkv) * d, gen=gen, dtype=dtype, device=device)
    pos = torch.randint(0, 5000, (2, block), generator=gen).to(device)
    inv_freq = rope_inv_freq(d, device)
    qn, kn = randn(d, gen=gen, dtype=dtype, device=device), randn(d, gen=gen, dtype=dtype,
                                                                   device=device)
    gu = randn(2, block, 80, gen=gen, dtype=dtype, device=device)
    empty = lambda *s: torch.empty(*s, dtype=dtype, device=device)  # noqa: E731
    qkv_outs = (empty(2, hq, block, d), empty(2, hkv, block, d), empty(2, hkv, block, d))
    o = torch.ops.mage
    return [
        (o.rms_norm.default, (x, w, EPS, r)),
        (o.rms_norm.default, (x, w, 1e-5, None)),
        (o.rms_norm_out.default, (x, w, EPS, r, empty(x.shape), empty(x.shape))),
        (o.qkv_rope.default, (qkv, pos, inv_freq, hq, hkv, d, None, None, EPS)),
        (o.qkv_rope.default, (qkv, pos, inv_freq, hq, hkv, d, qn, kn, 1e-5)),
        (o.qkv_rope_out.default, (qkv, pos, inv_freq, hq, hkv, d, qn, kn, EPS, *qkv_outs)),
        (o.silu_mul.default, (gu,)),
        (o.silu_mul_out.default, (gu, empty(2, block, 40))),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_fused_ops(device, dtype, gen):
    for op, args in fused_op_cases(device, dtype, gen):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_out_forms_fill_poisoned_outputs_and_update_in_place(device, dtype, gen):
    x = randn(3, 5, 256, gen=gen, dtype=dtype, device=device)
    w = randn(256, gen=gen, dtype=dtype, device=device)
    r = randn(3, 5, 256, gen=gen, dtype=dtype, device=device)
    want, want_h = ops.rms_norm(x, w, EPS, r)
    out, r_out = torch.empty_like(x), torch.empty_like(x)
    poison(out, r_out)
    ops.rms_norm_out(x, w, EPS, r, out, r_out)
    assert_equal(out, want, "out")
    assert_equal(r_out, want_h, "residual_out")
    # The decoding loop's form: the residual updated in place, the output over x.
    r_inplace, x_inplace = r.clone(), x.clone()
    ops.rms_norm_out(x_inplace, w, EPS, r_inplace, x_inplace, r_inplace)
    assert_equal(x_inplace, want, "out written over x")
    assert_equal(r_inplace, want_h, "residual updated in place")
    poison(r_out)
    ops.rms_norm_out(x, w, EPS, None, out, r_out)
    assert_equal(r_out, x, "residual_out without a residual")

    hq, hkv, d = 6, 2, 64
    qkv = randn(3, 5, (hq + 2 * hkv) * d, gen=gen, dtype=dtype, device=device)
    pos = near_128k_positions(3, 5, gen, device)
    inv_freq = rope_inv_freq(d, device)
    qn, kn = randn(d, gen=gen, dtype=dtype, device=device), randn(d, gen=gen, dtype=dtype,
                                                                   device=device)
    want = ops.qkv_rope(qkv, pos, inv_freq, hq, hkv, d, qn, kn, EPS)
    got = (torch.empty_like(want[0]), torch.empty_like(want[1]), torch.empty_like(want[2]))
    poison(*got)
    ops.qkv_rope_out(qkv, pos, inv_freq, hq, hkv, d, qn, kn, EPS, *got)
    for g, wnt, name in zip(got, want, "qkv"):
        assert_equal(g, wnt, name)

    gu = randn(3, 5, 2 * 136, gen=gen, dtype=dtype, device=device)
    out = torch.empty(3, 5, 136, dtype=dtype, device=device)
    poison(out)
    ops.silu_mul_out(gu, out)
    assert_equal(out, ops.silu_mul(gu), "silu_mul out")


def lean_mlp_block(x, residual, w_norm, w_gate_up, w_down):
    """An MLP half-layer the way the lean forward builds it from the fused ops."""
    h, residual = ops.rms_norm(x, w_norm, EPS, residual)
    return ops.silu_mul(h @ w_gate_up.t()) @ w_down.t(), residual


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, gen):
    x, r = randn(2, 4, 64, gen=gen, dtype=torch.float32), randn(2, 4, 64, gen=gen,
                                                                 dtype=torch.float32)
    w = randn(64, gen=gen, dtype=torch.float32)
    wgu, wd = randn(96, 64, gen=gen, dtype=torch.float32), randn(64, 48, gen=gen,
                                                                  dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lean_mlp_block, fullgraph=True, backend=backend)
    for got, want in zip(compiled(x, r, w, wgu, wd), lean_mlp_block(x, r, w, wgu, wd)):
        torch.testing.assert_close(got, want)


def _bad_inputs(gen):
    x = randn(2, 3, 64, gen=gen, dtype=torch.bfloat16)
    w = randn(64, gen=gen, dtype=torch.bfloat16)
    qkv = randn(2, 3, 8 * 32, gen=gen, dtype=torch.bfloat16)
    pos = torch.zeros(2, 3, dtype=torch.long)
    inv = torch.ones(16)
    qn = randn(32, gen=gen, dtype=torch.bfloat16)
    rope = lambda **kw: ops.qkv_rope(**{**dict(qkv=qkv, positions=pos, inv_freq=inv,  # noqa: E731
                                               n_q_heads=4, n_kv_heads=2, head_dim=32), **kw})
    return [
        (lambda: ops.rms_norm(x, w.float(), EPS), "weight has dtype Float but x has BFloat16"),
        (lambda: ops.rms_norm(x, w[:32], EPS), "weight must have shape [64]"),
        (lambda: ops.rms_norm(x, w, EPS, x[:, :2]), "residual must have shape [2, 3, 64]"),
        (lambda: ops.rms_norm(x.double(), w.double(), EPS), "x must be float16, bfloat16"),
        (lambda: ops.rms_norm(x, w, -1.0), "eps must be a finite number >= 0"),
        (lambda: ops.rms_norm_out(x, w, EPS, None, torch.empty_like(x)[..., :32],
                                  torch.empty_like(x)), "out must have shape [2, 3, 64]"),
        (lambda: ops.rms_norm_out(x, w, EPS, None, torch.empty_like(x).transpose(0, 1)
                                  .contiguous().transpose(0, 1), torch.empty_like(x)),
         "out must be contiguous"),
        (lambda: (lambda o: ops.rms_norm_out(x, w, EPS, None, o, o))(torch.empty_like(x)),
         "out and residual_out must be different tensors"),
        (lambda: rope(n_q_heads=5), "qkv.size(2) must be (Hq + 2 * Hkv) * d"),
        (lambda: rope(positions=pos.int()), "positions must have dtype Long"),
        (lambda: rope(positions=pos[:, :2]), "positions must have shape [2, 3]"),
        (lambda: rope(inv_freq=inv.double()), "inv_freq must have dtype Float"),
        (lambda: rope(inv_freq=inv[:8]), "inv_freq must have shape [16]"),
        (lambda: rope(head_dim=31, n_q_heads=4), "head_dim must be even"),
        (lambda: rope(q_norm_weight=qn), "pass both q_norm_weight and k_norm_weight"),
        (lambda: rope(q_norm_weight=qn, k_norm_weight=qn[:16]), "k_norm_weight must have shape"),
        (lambda: rope(q_norm_weight=qn.float(), k_norm_weight=qn),
         "q_norm_weight has dtype Float but qkv has BFloat16"),
        (lambda: rope(qkv=qkv[0]), "qkv must be a 3-D tensor"),
        (lambda: ops.qkv_rope_out(qkv, pos, inv, 4, 2, 32, None, None, EPS,
                                  torch.empty(2, 4, 3, 32, dtype=torch.bfloat16),
                                  torch.empty(2, 2, 3, 32, dtype=torch.bfloat16),
                                  torch.empty(2, 2, 3, 16, dtype=torch.bfloat16)),
         "v must have shape [2, 2, 3, 32]"),
        (lambda: ops.silu_mul(x[..., :63]), "even last dim"),
        (lambda: ops.silu_mul(x.int()), "gate_up must be float16, bfloat16 or float32"),
        (lambda: ops.silu_mul_out(x, torch.empty(2, 3, 64, dtype=torch.bfloat16)),
         "out must have shape [2, 3, 32]"),
        (lambda: ops.silu_mul_out(x, torch.empty(2, 3, 32)), "out has dtype Float"),
    ]


@pytest.mark.parametrize("case", range(23))
def test_bad_inputs_name_the_argument(case, gen):
    cases = _bad_inputs(gen)
    assert len(cases) == 23
    call, message = cases[case]
    with pytest.raises(RuntimeError) as info:
        call()
    assert message in str(info.value), str(info.value)
    assert "mage." in str(info.value)


# ---------------------------------------------------------------------------------------------
# CUDA: the kernels equal the transformers modules run on the GPU, bit for bit.


RMS_SHAPES = [  # (batch, B, hidden): torch's row sum differs by rows and length (sum_order.h)
    (1, 32, 1536), (16, 32, 3584), (1, 4, 1536), (1, 1, 8192), (2, 32, 8192), (3, 5, 200),
    (7, 3, 96), (1, 1, 64), (4, 32, 4096), (1, 4096, 1536), (1, 2, 16384), (5, 1, 256),
]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_cuda_rms_norm_is_qwen2_rmsnorm_on_the_gpu(dtype, shape, with_residual, gen):
    x = randn(*shape, gen=gen, dtype=dtype, device="cuda", scale=4.0)
    weight = randn(shape[-1], gen=gen, dtype=dtype, device="cuda")
    residual = (randn(*shape, gen=gen, dtype=dtype, device="cuda", scale=8.0)
                if with_residual else None)
    want, want_h = hf_rms_norm(x, weight, EPS, residual)
    out, h = torch.empty_like(x), torch.empty_like(x)
    poison(out, h)
    ops.rms_norm_out(x, weight, EPS, residual, out, h)
    assert_equal(h, want_h, "new_residual")
    assert_equal(out, want, f"out {shape}")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [  # (batch, B, Hq, Hkv, d)
    (1, 32, 12, 2, 128), (16, 32, 28, 4, 128), (3, 4, 8, 2, 64), (1, 1, 12, 2, 128),
    (2, 4, 16, 2, 256), (5, 32, 32, 8, 128), (1, 4, 4, 1, 64)])
@pytest.mark.parametrize("qwen3", [False, True])
def test_cuda_qkv_rope_is_transformers_on_the_gpu(dtype, config, qwen3, gen):
    batch, block, hq, hkv, d = config
    qkv = randn(batch, block, (hq + 2 * hkv) * d, gen=gen, dtype=dtype, device="cuda", scale=3.0)
    positions = near_128k_positions(batch, block, gen, "cuda")
    qk_norm = ((randn(d, gen=gen, dtype=dtype, device="cuda"),
                randn(d, gen=gen, dtype=dtype, device="cuda")) if qwen3 else None)
    want_q, want_k, want_v, inv_freq = hf_qkv_rope(qkv, positions, hq, hkv, d, qk_norm)
    got = tuple(torch.empty(w.shape, dtype=dtype, device="cuda") for w in (want_q, want_k, want_v))
    poison(*got)
    ops.qkv_rope_out(qkv, positions, inv_freq, hq, hkv, d,
                     *(qk_norm if qwen3 else (None, None)), EPS, *got)
    for g, want, name in zip(got, (want_q, want_k, want_v), "qkv"):
        assert_equal(g, want, f"{name} {config}")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32, 8960), (16, 32, 18944), (3, 5, 100), (2, 7, 256)])
@pytest.mark.parametrize("aligned", [True, False])
def test_cuda_silu_mul_is_qwen2_mlp_act_on_the_gpu(dtype, shape, aligned, gen):
    *lead, inter = shape
    buf = randn(math.prod(lead) * 2 * inter + 1, gen=gen, dtype=dtype, device="cuda", scale=4.0)
    # An odd storage offset: the kernel's element-wise path.
    gate_up = buf[(0 if aligned else 1):][:math.prod(lead) * 2 * inter].view(*lead, 2 * inter)
    out = torch.empty(*lead, inter, dtype=dtype, device="cuda")
    poison(out)
    ops.silu_mul_out(gate_up, out)
    assert_equal(out, hf_silu_mul(gate_up), f"out {shape}")


@requires_cuda
def test_cuda_out_forms_replay_in_a_cuda_graph(gen):
    """rms_norm -> qkv_rope and rms_norm -> silu_mul captured in one graph (in-place residual),
    replayed on new inputs copied into the captured buffers."""
    dtype, batch, block, hidden, hq, hkv, d, inter = torch.bfloat16, 2, 32, 1536, 12, 2, 128, 8960
    dev = "cuda"
    x = torch.empty(batch, block, hidden, dtype=dtype, device=dev)
    res = torch.empty_like(x)
    w = randn(hidden, gen=gen, dtype=dtype, device=dev)
    normed = torch.empty_like(x)
    qkv = torch.empty(batch, block, (hq + 2 * hkv) * d, dtype=dtype, device=dev)
    pos = torch.empty(batch, block, dtype=torch.long, device=dev)
    inv_freq = rope_inv_freq(d, dev)
    q = torch.empty(batch, hq, block, d, dtype=dtype, device=dev)
    k, v = (torch.empty(batch, hkv, block, d, dtype=dtype, device=dev) for _ in range(2))
    gate_up = torch.empty(batch, block, 2 * inter, dtype=dtype, device=dev)
    act = torch.empty(batch, block, inter, dtype=dtype, device=dev)

    def step():
        ops.rms_norm_out(x, w, EPS, res, normed, res)
        ops.qkv_rope_out(qkv, pos, inv_freq, hq, hkv, d, None, None, EPS, q, k, v)
        ops.silu_mul_out(gate_up, act)

    def fill():
        for t, s in [(x, 4.0), (res, 8.0), (qkv, 3.0), (gate_up, 4.0)]:
            t.copy_(randn(*t.shape, gen=gen, dtype=dtype, device=dev, scale=s))
        pos.copy_(near_128k_positions(batch, block, gen, dev))

    fill()
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
    step()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations, \
        "the *_out forms allocated"
    graph = capture(step)
    for _ in range(2):
        fill()
        res0 = res.clone()
        graph.replay()
        torch.cuda.synchronize()
        want, want_h = hf_rms_norm(x, w, EPS, res0)
        assert_equal(normed, want, "graph rms_norm out")
        assert_equal(res, want_h, "graph residual")
        wq, wk, wv, _ = hf_qkv_rope(qkv, pos, hq, hkv, d)
        assert_equal(q, wq, "graph q")
        assert_equal(k, wk, "graph k")
        assert_equal(v, wv, "graph v")
        assert_equal(act, hf_silu_mul(gate_up), "graph silu_mul")
