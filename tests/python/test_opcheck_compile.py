"""torch.library.opcheck on every op, and the ops inside torch.compile(fullgraph=True)."""
import pytest
import torch

import mage_ext
from conftest import DEVICES
from reference import make_inputs, random_selection
from test_fused_ops import fused_op_cases


def sample(device, gen, dtype=torch.float32):
    inp = make_inputs(2, 6, 2, 4, 64, [19, 5], dtype, device, capacity=24, generator=gen)
    idx, cnt = random_selection([19, 5], 2, 8, generator=gen, device=device)
    return inp, idx, cnt


def backward_cases(inp, idx, cnt, gen):
    """block_sparse_attention and the backward ops, on plain (no-grad) samples; the autograd
    tests (test_autograd.py) opcheck the differentiable ops with requires_grad samples."""
    ops = torch.ops.mage
    dev, dtype = inp.q.device, inp.q.dtype
    out, lse = mage_ext.dense_attention(*inp.args())
    dout = torch.randn(out.shape, generator=gen).to(dtype).to(dev)
    dlse = torch.randn(lse.shape, generator=gen).to(dev)
    sout, slse = mage_ext.sparse_attention(inp.q, inp.k_cache, inp.v_cache, idx, cnt,
                                           inp.k_block, inp.v_block)
    # Two blocks of 2 queries over the cache (all sequences: the first 4 positions).
    bidx = torch.arange(4, dtype=torch.int32, device=dev).expand(2, 2, 2, 4).contiguous()
    bcnt = torch.full((2, 2, 2), 4, dtype=torch.int32, device=dev)
    bargs = (inp.q, inp.k_cache, inp.v_cache, bidx, bcnt, inp.k_block, inp.v_block, 2)
    bout, blse = mage_ext.block_sparse_attention(*bargs)
    return [
        (ops.block_sparse_attention.default, bargs + (None,)),
        (ops.dense_attention_backward.default, (dout, dlse) + inp.args() + (out, lse, None)),
        (ops.dense_attention_backward.default, (dout, None) + inp.args() + (out, lse, 0.2)),
        (ops.sparse_attention_backward.default,
         (dout, dlse, inp.q, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block, inp.v_block, sout,
          slse, None)),
        (ops.block_sparse_attention_backward.default,
         (dout, None) + bargs[:7] + (bout, blse, 2, None)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_every_op(device, dtype, gen):
    inp, idx, cnt = sample(device, gen, dtype)
    ops = torch.ops.mage
    scores = torch.rand(2, 2, 24, generator=gen).to(device)
    out = torch.empty_like(inp.q)
    lse = torch.empty(2, 6, 4, device=device)
    cases = [
        (ops.attention_with_scores.default, inp.args() + (None,)),
        (ops.dense_attention.default, inp.args() + (0.2,)),
        (ops.sparse_attention.default,
         (inp.q, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block, inp.v_block, None)),
        (ops.topk_select.default, (scores, inp.cache_lens, 6, 1, 1)),
        (ops.attention_with_scores_out.default,
         inp.args() + (None, out, lse, torch.empty(2, 2, 24, device=device))),
        (ops.dense_attention_out.default, inp.args() + (None, out, lse)),
        (ops.sparse_attention_out.default,
         (inp.q, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block, inp.v_block, None, out, lse)),
        (ops.topk_select_out.default,
         (scores, inp.cache_lens, 6, 0, 2, torch.empty(2, 2, 6, dtype=torch.int32, device=device),
          torch.empty(2, 2, dtype=torch.int32, device=device))),
        (ops.append_kv.default,
         (inp.k_cache.clone(), inp.v_cache.clone(), inp.cache_lens, inp.k_block, inp.v_block)),
        (ops.block_attention.default,
         (inp.q, inp.k_cache, inp.v_cache, inp.k_block, inp.v_block, 2, [19, 5], None)),
        (ops.block_attention_backward.default,
         (torch.randn_like(inp.q), inp.q, inp.k_cache, inp.v_cache, inp.k_block, inp.v_block,
          out.normal_(), lse.normal_(), 2, [19, 5], None)),
        (ops.take_error.default, (torch.device(device),)),
        (ops.check_errors.default, (torch.device(device),)),
        (ops.linear.default, (inp.q.reshape(-1, inp.q.shape[-1]),
                              inp.k_cache[0, 0, :5].contiguous(), inp.k_cache[0, 1, 0, :5])),
        (ops.linear.default, (inp.q[0], inp.v_cache[0, 0, :3].contiguous(), None)),
    ] + backward_cases(inp, idx, cnt, gen)
    covered = set()
    for op, args in cases:
        torch.library.opcheck(op, args)
        covered.add(op._schema.name)
    # The fused layer ops are opchecked in test_fused_ops.py.
    covered |= {op._schema.name for op, _ in fused_op_cases(device, dtype, gen)}
    registered = {f"mage::{name}" for name in dir(ops) if not name.startswith("_")
                  and isinstance(getattr(ops, name), torch._ops.OpOverloadPacket)}
    assert registered <= covered, f"ops without an opcheck: {registered - covered}"


def mage_step(q, k_cache, v_cache, cache_lens, k_block, v_block):
    """One block with the MAGE policy: first step selects, a later step reuses the selection."""
    out_first, _, scores = mage_ext.attention_with_scores(q, k_cache, v_cache, cache_lens,
                                                          k_block, v_block)
    idx, cnt = mage_ext.topk_select(scores, cache_lens, 8, 1, 1)
    out_later, _ = mage_ext.sparse_attention(q * 0.5, k_cache, v_cache, idx, cnt, k_block,
                                             v_block)
    return out_first + out_later


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend, gen):
    inp, _, _ = sample(device, gen)
    torch._dynamo.reset()
    compiled = torch.compile(mage_step, fullgraph=True, backend=backend)
    got = compiled(*inp.args())
    want = mage_step(*inp.args())
    torch.testing.assert_close(got, want)
