"""Autograd of the attention ops (CPU): gradcheck in float64, gradients in fp32 / bf16 against the
float64 reference with the FlashAttention tolerance rule, opcheck with requires_grad samples,
torch.compile of a training step, determinism, bad inputs. CUDA: tests/python/test_cuda_autograd.py.
"""
import pytest
import torch

import mage_ext
from reference import (assert_close_fa, make_inputs, random_selection, reference_block_sparse,
                       reference_forward)

DIFF = ("q", "k_cache", "v_cache", "k_block", "v_block")  # the differentiable inputs, in order


def diff_tensors(inp, dtype=None):
    return [getattr(inp, name).to(dtype or getattr(inp, name).dtype) for name in DIFF]


def make_block_sparse(batch, hq, hkv, n_blocks, block_size, dim, n_ctx, k, gen, dtype=torch.float64,
                      device="cpu"):
    """Inputs of block_sparse_attention as MAGE-FT passes them: block j selects min(k, prefix)
    entries of its clean prefix [0, j * block_size) of the context (block 0: none)."""
    seq = n_blocks * block_size

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    idx, cnt = zip(*(random_selection([min(n_ctx, j * block_size)] * batch, hkv, k, generator=gen)
                     for j in range(n_blocks)))
    tensors = [randn(batch, hq, seq, dim), randn(batch, hkv, n_ctx, dim),
               randn(batch, hkv, n_ctx, dim), randn(batch, hkv, seq, dim),
               randn(batch, hkv, seq, dim)]
    return tensors, torch.stack(idx, 1).to(device), torch.stack(cnt, 1).to(device)


# ---------------------------------------------------------------------------------------------
# The three ops as functions of their differentiable inputs, with their references.

def dense_call(lens, op=mage_ext.dense_attention):
    return lambda q, kc, vc, kb, vb: op(q, kc, vc, lens, kb, vb)[:2]


def dense_ref(lens):
    return lambda q, kc, vc, kb, vb: reference_forward(q, kc, vc, lens, kb, vb)[:2]


def sparse_call(idx, cnt):
    return lambda q, kc, vc, kb, vb: mage_ext.sparse_attention(q, kc, vc, idx, cnt, kb, vb)


def sparse_ref(lens, idx, cnt):
    return lambda q, kc, vc, kb, vb: reference_forward(q, kc, vc, lens, kb, vb, idx, cnt)[:2]


def block_call(idx, cnt, bs):
    return lambda q, kc, vc, ko, vo: mage_ext.block_sparse_attention(q, kc, vc, idx, cnt, ko, vo,
                                                                     bs)


def block_ref(idx, cnt, bs):
    return lambda q, kc, vc, ko, vo: reference_block_sparse(q, kc, vc, idx, cnt, ko, vo, bs)


def loss_grads(call, tensors, w_out, w_lse):
    """Gradients of sum(out * w_out) + sum(lse * w_lse) (in float64) w.r.t. `tensors`; without
    w_lse the loss leaves lse out (the op's backward then gets no dlse, as in training)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out, lse = call(*leaves)
    loss = (out.double() * w_out).sum()
    if w_lse is not None:
        loss = loss + (lse.double() * w_lse).sum()
    return torch.autograd.grad(loss, leaves)


def check_grads_fa(call, ref, tensors64, dtype, gen, what, lse_in_loss=True):
    """The op's gradients in `dtype` against the float64 reference (FlashAttention rule)."""
    out, lse = ref(*tensors64)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    w_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64) if lse_in_loss else None
    got = loss_grads(call, [t.to(dtype) for t in tensors64], w_out, w_lse)
    want = loss_grads(ref, tensors64, w_out, w_lse)
    same = loss_grads(ref, [t.to(dtype) for t in tensors64], w_out, w_lse)
    for name, g, w, s in zip(DIFF, got, want, same):
        assert g.dtype == dtype and torch.isfinite(g).all(), f"{what} d{name}"
        assert_close_fa(g, w, s, dtype, f"{what} d{name}")


# ---------------------------------------------------------------------------------------------
# gradcheck in float64: odd lengths, GQA, unequal lengths, empty caches, k > cache.

# Each shape is checked with fast gradcheck (random projections of the Jacobian), and the tiny
# one with the full Jacobian too (slow mode: one backward per output element).
GRADCHECK_SHAPES = [  # batch, hq, hkv, block, dim, lens, capacity, full Jacobian
    (2, 4, 2, 3, 8, [5, 0], 7, False),   # GQA 2, unequal lengths, an empty cache, slack capacity
    (1, 3, 1, 5, 16, [9], 9, False),     # MQA (G = 3), odd block and length
    (2, 2, 1, 2, 4, [3, 0], 4, True),    # tiny: GQA 2, an empty cache
]


def gradcheck(call, tensors, full):
    tensors = [t.requires_grad_() for t in tensors]
    return torch.autograd.gradcheck(call, tensors, fast_mode=not full)


@pytest.mark.parametrize("shape", GRADCHECK_SHAPES)
@pytest.mark.parametrize("op", [mage_ext.dense_attention, mage_ext.attention_with_scores])
def test_gradcheck_exact(shape, op, gen):
    batch, hq, hkv, block, dim, lens, cap, full = shape
    inp = make_inputs(batch, hq, hkv, block, dim, lens, torch.float64, capacity=cap, generator=gen)
    call = lambda *t: op(t[0], t[1], t[2], inp.cache_lens, t[3], t[4])  # noqa: E731
    assert gradcheck(call, diff_tensors(inp), full)


@pytest.mark.parametrize("shape,k", [(GRADCHECK_SHAPES[0], 4), (GRADCHECK_SHAPES[1], 12),
                                     (GRADCHECK_SHAPES[2], 2)])
def test_gradcheck_sparse(shape, k, gen):
    # k = 4 and 2: a part of the cache (counts 0 for the empty one); k = 12 > cache: counts < k.
    batch, hq, hkv, block, dim, lens, cap, full = shape
    inp = make_inputs(batch, hq, hkv, block, dim, lens, torch.float64, capacity=cap, generator=gen)
    idx, cnt = random_selection(lens, hkv, k, generator=gen)
    assert gradcheck(sparse_call(idx, cnt), diff_tensors(inp), full)


@pytest.mark.parametrize("batch,hq,hkv,n_blocks,bs,dim,n_ctx,k,full", [
    (2, 4, 2, 3, 4, 8, 9, 5, False),   # GQA 2, block 0 selects nothing, k < prefix later
    (2, 3, 1, 2, 3, 8, 7, 8, False),   # MQA, k > every prefix
    (1, 2, 1, 3, 2, 4, 4, 2, True),    # tiny, full Jacobian
])
def test_gradcheck_block_sparse(batch, hq, hkv, n_blocks, bs, dim, n_ctx, k, full, gen):
    tensors, idx, cnt = make_block_sparse(batch, hq, hkv, n_blocks, bs, dim, n_ctx, k, gen)
    assert gradcheck(block_call(idx, cnt, bs), tensors, full)


# ---------------------------------------------------------------------------------------------
# fp32 / bf16 gradients against the float64 reference (FlashAttention tolerance rule).

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("hq,hkv,block,lens,cap", [(6, 2, 5, [37, 0, 90], 90),
                                                   (4, 4, 8, [130], 131)])
def test_grads_dense_and_sparse(dtype, dim, hq, hkv, block, lens, cap, gen):
    inp = make_inputs(len(lens), hq, hkv, block, dim, lens, torch.float64, capacity=cap,
                      generator=gen)
    tensors = diff_tensors(inp)
    check_grads_fa(dense_call(inp.cache_lens), dense_ref(inp.cache_lens), tensors, dtype, gen,
                   "dense")
    check_grads_fa(dense_call(inp.cache_lens, mage_ext.attention_with_scores),
                   dense_ref(inp.cache_lens), tensors, dtype, gen, "attention_with_scores")
    for k in (16, 200):  # a part of each cache; more than any cache holds
        idx, cnt = random_selection(lens, hkv, k, generator=gen)
        check_grads_fa(sparse_call(idx, cnt), sparse_ref(inp.cache_lens, idx, cnt), tensors,
                       dtype, gen, f"sparse k={k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_grads_block_sparse(dtype, dim, gen):
    tensors, idx, cnt = make_block_sparse(2, 6, 2, 5, 8, dim, 40, 12, gen)
    check_grads_fa(block_call(idx, cnt, 8), block_ref(idx, cnt, 8), tensors, dtype, gen,
                   "block_sparse")


def test_long_cache_is_chunked(gen):
    # 5000 keys x 64 rows: the backward runs over several key chunks of the CPU budget.
    inp = make_inputs(1, 8, 2, 16, 64, [5000], torch.float64, generator=gen)
    idx, cnt = random_selection([5000], 2, 3000, generator=gen)
    check_grads_fa(dense_call(inp.cache_lens), dense_ref(inp.cache_lens), diff_tensors(inp),
                   torch.float32, gen, "dense 5000")
    check_grads_fa(sparse_call(idx, cnt), sparse_ref(inp.cache_lens, idx, cnt),
                   diff_tensors(inp), torch.float32, gen, "sparse 3000 of 5000")


# ---------------------------------------------------------------------------------------------
# Consistency between the ops, stale cache rows, determinism.

def test_ops_agree(gen):
    """A full selection is the dense op; attention_with_scores is dense; block_sparse is one
    sparse_attention per block."""
    lens = [11, 4]
    inp = make_inputs(2, 4, 2, 3, 16, lens, torch.float32, capacity=12, generator=gen)
    tensors = diff_tensors(inp)
    w = (torch.randn(2, 4, 3, 16, generator=gen, dtype=torch.float64),
         torch.randn(2, 4, 3, generator=gen, dtype=torch.float64))
    idx, cnt = random_selection(lens, 2, 12, generator=gen)  # everything, ascending
    dense = loss_grads(dense_call(inp.cache_lens), tensors, *w)
    for other in (loss_grads(sparse_call(idx, cnt), tensors, *w),
                  loss_grads(dense_call(inp.cache_lens, mage_ext.attention_with_scores), tensors,
                             *w)):
        for a, b in zip(dense, other):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)

    (q, kc, vc, ko, vo), bidx, bcnt = make_block_sparse(1, 4, 2, 3, 4, 16, 10, 6, gen,
                                                        torch.float32)
    leaves = [t.requires_grad_() for t in (q, kc, vc, ko, vo)]
    out, lse = mage_ext.block_sparse_attention(*leaves[:3], bidx, bcnt, *leaves[3:], 4)
    (out.square().sum() + lse.sum()).backward()
    per_block = [t.detach().clone().requires_grad_() for t in (q, kc, vc, ko, vo)]
    loss = 0
    for j in range(3):
        part = slice(4 * j, 4 * j + 4)
        o, l = mage_ext.sparse_attention(per_block[0][:, :, part], per_block[1], per_block[2],
                                         bidx[:, j], bcnt[:, j], per_block[3][:, :, part],
                                         per_block[4][:, :, part])
        loss = loss + o.square().sum() + l.sum()
    loss.backward()
    for a, b in zip(leaves, per_block):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=1e-4)


def test_stale_cache_rows_get_zero_gradient(gen):
    """NaN in cache rows past a length / outside a selection reaches no gradient; those rows get
    exact zeros."""
    lens = [6, 2]
    inp = make_inputs(2, 4, 2, 3, 16, lens, torch.float32, capacity=9, generator=gen)
    inp.k_cache[0, :, 6:] = float("nan")
    inp.v_cache[1, :, 2:] = float("nan")
    grads = loss_grads(dense_call(inp.cache_lens), diff_tensors(inp),
                       torch.ones(2, 4, 3, 16, dtype=torch.float64),
                       torch.ones(2, 4, 3, dtype=torch.float64))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[1][0, :, 6:] == 0).all() and (grads[2][1, :, 2:] == 0).all()

    idx = torch.tensor([[[1, 4, -1], [0, 5, -1]], [[1, -1, -1], [0, -1, -1]]], dtype=torch.int32)
    cnt = torch.tensor([[2, 2], [1, 1]], dtype=torch.int32)
    inp.k_cache[0, 0, 0] = float("nan")  # unselected row
    grads = loss_grads(sparse_call(idx, cnt), diff_tensors(inp),
                       torch.ones(2, 4, 3, 16, dtype=torch.float64),
                       torch.ones(2, 4, 3, dtype=torch.float64))
    assert all(torch.isfinite(g).all() for g in grads)
    selected = torch.zeros(2, 2, 9, dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            selected[b, h, idx[b, h, :cnt[b, h]].long()] = True
    assert (grads[1][~selected] == 0).all() and (grads[2][~selected] == 0).all()
    assert (grads[1][selected] != 0).all()


def test_block_sparse_backward_is_deterministic(gen):
    """Many blocks select the same context rows: their gradients are summed in a fixed order,
    so two runs (intra-op threads on) give identical bits."""
    tensors, idx, cnt = make_block_sparse(2, 4, 2, 16, 8, 64, 128, 32, gen, torch.float32)
    w = torch.randn(2, 4, 128, 64, generator=gen)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out, _ = mage_ext.block_sparse_attention(*leaves[:3], idx, cnt, *leaves[3:], 8)
        (out * w).sum().backward()
        runs.append([t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_lse_only_and_out_only_losses(gen):
    """The backward takes a missing dout (loss on lse only) and a missing dlse (out only)."""
    inp = make_inputs(1, 2, 1, 4, 8, [5], torch.float64, generator=gen)
    for pick in (0, 1):
        tensors = diff_tensors(inp)
        leaves = [t.clone().requires_grad_() for t in tensors]
        mage_ext.dense_attention(leaves[0], leaves[1], leaves[2], inp.cache_lens, leaves[3],
                                 leaves[4])[pick].sum().backward()
        ref = [t.clone().requires_grad_() for t in tensors]
        reference_forward(ref[0], ref[1], ref[2], inp.cache_lens, ref[3], ref[4])[pick].sum() \
            .backward()
        for a, b in zip(leaves, ref):  # the reference leaves None where it does not depend
            torch.testing.assert_close(a.grad, b.grad if b.grad is not None else 0 * a)


def test_no_grad_inputs_and_inference_mode(gen):
    """Only the inputs that require grad get one; without grads (the decoding path) nothing
    changes."""
    inp = make_inputs(1, 2, 1, 4, 8, [5], generator=gen)
    q = inp.q.clone().requires_grad_()
    out, lse = mage_ext.dense_attention(q, *inp.args()[1:])
    out.sum().backward()
    assert q.grad is not None and out.requires_grad and lse.requires_grad
    with torch.inference_mode():
        out2, _ = mage_ext.dense_attention(q, *inp.args()[1:])
    assert not out2.requires_grad
    torch.testing.assert_close(out2, out.detach())


# ---------------------------------------------------------------------------------------------
# opcheck with requires_grad samples, torch.compile of a training step.

def grad_samples(gen):
    inp = make_inputs(2, 6, 2, 4, 64, [19, 5], torch.float32, capacity=24, generator=gen)
    idx, cnt = random_selection([19, 5], 2, 8, generator=gen)
    (bq, bkc, bvc, bko, bvo), bidx, bcnt = make_block_sparse(2, 6, 2, 3, 4, 64, 10, 5, gen,
                                                             torch.float32)
    g = [t.requires_grad_() for t in diff_tensors(inp)]
    b = [t.requires_grad_() for t in (bq, bkc, bvc, bko, bvo)]
    ops = torch.ops.mage
    return [
        (ops.dense_attention.default, (g[0], g[1], g[2], inp.cache_lens, g[3], g[4], None)),
        (ops.attention_with_scores.default, (g[0], g[1], g[2], inp.cache_lens, g[3], g[4], 0.3)),
        (ops.sparse_attention.default, (g[0], g[1], g[2], idx, cnt, g[3], g[4], None)),
        (ops.block_sparse_attention.default, (b[0], b[1], b[2], bidx, bcnt, b[3], b[4], 4, None)),
    ]


def test_opcheck_with_grad(gen):
    for op, args in grad_samples(gen):
        torch.library.opcheck(op, args)


class TinyAttentionModel(torch.nn.Module):
    """x -> q/k/v projections -> MAGE dense, sparse and block-sparse attention -> linear head."""

    def __init__(self, d_model=32, hq=4, hkv=2, dim=16):
        super().__init__()
        self.hq, self.hkv, self.dim = hq, hkv, dim
        self.wq = torch.nn.Linear(d_model, hq * dim)
        self.wk = torch.nn.Linear(d_model, hkv * dim)
        self.wv = torch.nn.Linear(d_model, hkv * dim)
        self.head = torch.nn.Linear(hq * dim, 5)

    def heads(self, x, n):  # [batch, T, n * dim] -> [batch, n, T, dim] (contiguous rows)
        return x.unflatten(-1, (n, self.dim)).transpose(1, 2).contiguous()

    def forward(self, x_cache, x_block, lens, idx, cnt, bidx, bcnt):
        q = self.heads(self.wq(x_block), self.hq)
        kc, vc = self.heads(self.wk(x_cache), self.hkv), self.heads(self.wv(x_cache), self.hkv)
        kb, vb = self.heads(self.wk(x_block), self.hkv), self.heads(self.wv(x_block), self.hkv)
        dense, lse = mage_ext.dense_attention(q, kc, vc, lens, kb, vb)
        sparse, _ = mage_ext.sparse_attention(q, kc, vc, idx, cnt, kb, vb)
        blocks, _ = mage_ext.block_sparse_attention(q, kc, vc, bidx, bcnt, kb, vb, 2)
        mixed = (dense + sparse + blocks).transpose(1, 2).flatten(2)
        return self.head(mixed).square().mean() + 0.01 * lse.mean()


def compile_inputs(gen):
    lens = torch.tensor([12, 5], dtype=torch.int32)
    idx, cnt = random_selection([12, 5], 2, 6, generator=gen)
    bidx, bcnt = zip(*(random_selection([2 * j, 2 * j], 2, 3, generator=gen) for j in range(2)))
    return (torch.randn(2, 12, 32, generator=gen), torch.randn(2, 4, 32, generator=gen), lens, idx,
            cnt, torch.stack(bidx, 1), torch.stack(bcnt, 1))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_training_step(backend, gen):
    torch.manual_seed(0)
    model = TinyAttentionModel()
    inputs = compile_inputs(gen)
    model(*inputs).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    loss = compiled(*inputs)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4, msg=n)
    # One optimizer step through the compiled model lowers the loss.
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.step()
    assert compiled(*inputs).item() < loss.item()


# ---------------------------------------------------------------------------------------------
# Bad inputs.

def test_out_forms_refuse_grad(gen):
    inp = make_inputs(1, 2, 1, 4, 8, [5], generator=gen)
    q = inp.q.clone().requires_grad_()
    out, lse = torch.empty_like(q), torch.empty(1, 2, 4)
    with pytest.raises(RuntimeError, match="mage.dense_attention_out: q requires grad, but the "
                                           r"\*_out forms are not differentiable"):
        mage_ext.ops.dense_attention_out(q, *inp.args()[1:], None, out, lse)
    idx, cnt = random_selection([5], 1, 3, generator=gen)
    kc = inp.k_cache.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="mage.sparse_attention_out: k_cache requires grad"):
        mage_ext.ops.sparse_attention_out(inp.q, kc, inp.v_cache, idx, cnt, inp.k_block,
                                          inp.v_block, None, out, lse)
    with pytest.raises(RuntimeError, match="mage.attention_with_scores_out: q requires grad"):
        mage_ext.ops.attention_with_scores_out(q, *inp.args()[1:], None, out, lse,
                                               torch.empty(1, 1, 5))
    with torch.no_grad():  # the decoding path: fine
        mage_ext.ops.dense_attention_out(q, *inp.args()[1:], None, out, lse)
    torch.testing.assert_close(out, mage_ext.dense_attention(inp.q, *inp.args()[1:])[0])


def test_double_backward_is_refused(gen):
    inp = make_inputs(1, 2, 1, 4, 8, [5], torch.float64, generator=gen)
    q = inp.q.clone().requires_grad_()
    out, _ = mage_ext.dense_attention(q, *inp.args()[1:])
    with pytest.raises(RuntimeError, match="mage.dense_attention_backward: .* requires grad, "
                                           "but double backward is not supported"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
    tensors, idx, cnt = make_block_sparse(1, 2, 1, 2, 2, 8, 4, 2, torch.Generator())
    q = tensors[0].requires_grad_()
    out, _ = mage_ext.block_sparse_attention(q, *tensors[1:3], idx, cnt, *tensors[3:], 2)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def block_sparse_args(gen, **change):
    (q, kc, vc, ko, vo), idx, cnt = make_block_sparse(2, 4, 2, 3, 4, 16, 10, 5, gen,
                                                      torch.float32)
    args = dict(q=q, k_ctx=kc, v_ctx=vc, indices=idx, counts=cnt, k_own=ko, v_own=vo, block_size=4)
    args.update({k: v(args) for k, v in change.items()})
    return args


@pytest.mark.parametrize("change,message", [
    (dict(block_size=lambda a: 5), "T = q.size(2) = 12 is not a multiple of block_size = 5"),
    (dict(block_size=lambda a: 0), "block_size must be >= 1"),
    (dict(k_own=lambda a: a["k_own"][:, :, :8]), "k_own must have shape"),
    (dict(v_ctx=lambda a: a["v_ctx"][:, :, :9]), "v_ctx must have shape"),
    (dict(k_ctx=lambda a: a["k_ctx"].half()), "k_ctx has dtype"),
    (dict(indices=lambda a: a["indices"][:, :2]), "indices must have shape [batch=2, n_blocks=3"),
    (dict(indices=lambda a: a["indices"].long()), "indices must have dtype Int"),
    (dict(counts=lambda a: a["counts"][:, :, :1]), "counts must have shape"),
    (dict(counts=lambda a: torch.full_like(a["counts"], 6)), "counts[0, 0, 0] = 6 is outside"),
    (dict(indices=lambda a: a["indices"].masked_fill(a["indices"] >= 0, 10)),
     "= 10 is outside the cache (expected 0 <= index < capacity=10)"),
])
def test_block_sparse_rejects(change, message, gen):
    with pytest.raises(RuntimeError) as err:
        mage_ext.block_sparse_attention(**block_sparse_args(gen, **change))
    assert message in str(err.value) and "mage.block_sparse_attention" in str(err.value), \
        str(err.value)


def test_backward_ops_check_their_inputs(gen):
    inp = make_inputs(2, 4, 2, 3, 16, [5, 2], generator=gen)
    out, lse = mage_ext.dense_attention(*inp.args())
    ops = torch.ops.mage
    with pytest.raises(RuntimeError, match="mage.dense_attention_backward: dout must have shape"):
        ops.dense_attention_backward(out[:, :2], None, *inp.args(), out, lse, None)
    with pytest.raises(RuntimeError, match="mage.dense_attention_backward: lse must have dtype"):
        ops.dense_attention_backward(out, None, *inp.args(), out, lse.double(), None)
    with pytest.raises(RuntimeError, match="mage.dense_attention_backward: dlse must have shape"):
        ops.dense_attention_backward(out, lse[0], *inp.args(), out, lse, None)
    idx, cnt = random_selection([5, 2], 2, 3, generator=gen)
    with pytest.raises(RuntimeError, match=r"mage.sparse_attention_backward: indices\[0, 1, 0\]"):
        ops.sparse_attention_backward(out, None, inp.q, inp.k_cache, inp.v_cache,
                                      idx.index_fill(1, torch.tensor([1]), 99), cnt, inp.k_block,
                                      inp.v_block, out, lse, None)
