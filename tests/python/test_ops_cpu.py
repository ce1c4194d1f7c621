"""The ops (on every available device) against the fp64 plain-PyTorch reference."""
import pytest
import torch

import mage_ext
from conftest import DEVICES
from reference import (assert_close_fa, make_inputs, max_error, poison, random_selection,
                       reference_attention)

# (batch, Hq, Hkv, B, d, lens): odd sizes, GQA 1..7, unequal lengths, an empty sequence.
SHAPES = [
    (1, 4, 4, 4, 64, [37]),
    (2, 12, 2, 32, 128, [300, 77]),
    (3, 7, 1, 5, 64, [0, 129, 64]),
    (2, 8, 2, 16, 64, [1, 2050]),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_with_scores_and_dense(shape, dtype, device, gen):
    batch, hq, hkv, block, dim, lens = shape
    inp = make_inputs(batch, hq, hkv, block, dim, lens, dtype, device, capacity=max(lens) + 3,
                      generator=gen)
    ref64 = reference_attention(inp)
    ref_pt = reference_attention(inp, dtype=dtype)
    out, lse, scores = mage_ext.attention_with_scores(*inp.args())
    assert out.dtype == dtype and lse.dtype == torch.float32 and scores.dtype == torch.float32
    assert_close_fa(out, ref64[0], ref_pt[0], dtype, "out")
    assert_close_fa(lse, ref64[1], ref_pt[1], dtype, "lse")
    assert_close_fa(scores, ref64[2], ref_pt[2], dtype, "scores")
    dense_out, dense_lse = mage_ext.dense_attention(*inp.args())
    assert_close_fa(dense_out, ref64[0], ref_pt[0], dtype, "dense out")
    assert_close_fa(dense_lse, ref64[1], ref_pt[1], dtype, "dense lse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 16, 97])
def test_sparse_attention(shape, dtype, device, k, gen):
    batch, hq, hkv, block, dim, lens = shape
    inp = make_inputs(batch, hq, hkv, block, dim, lens, dtype, device, generator=gen)
    idx, cnt = random_selection(lens, hkv, k, generator=gen, device=device)
    ref64 = reference_attention(inp, idx, cnt)
    ref_pt = reference_attention(inp, idx, cnt, dtype=dtype)
    out, lse = mage_ext.sparse_attention(inp.q, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block,
                                         inp.v_block)
    assert_close_fa(out, ref64[0], ref_pt[0], dtype, "sparse out")
    assert_close_fa(lse, ref64[1], ref_pt[1], dtype, "sparse lse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_with_everything_selected_equals_dense(dtype, device, gen):
    lens = [64, 23]
    inp = make_inputs(2, 8, 2, 8, 64, lens, dtype, device, generator=gen)
    scores = torch.rand(2, 2, 64, generator=gen).to(device)
    idx, cnt = mage_ext.topk_select(scores, inp.cache_lens, 64)
    sparse_out, sparse_lse = mage_ext.sparse_attention(inp.q, inp.k_cache, inp.v_cache, idx,
                                                       cnt, inp.k_block, inp.v_block)
    dense_out, dense_lse = mage_ext.dense_attention(*inp.args())
    tol = rounding_tol = torch.finfo(dtype).eps * 4
    assert max_error(sparse_out, dense_out) <= rounding_tol * dense_out.abs().max().item() + 1e-6
    assert max_error(sparse_lse, dense_lse) <= tol * 16 + 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_scale(device, gen):
    inp = make_inputs(1, 4, 2, 4, 64, [20], torch.float32, device, generator=gen)
    out, lse = mage_ext.dense_attention(*inp.args(), scale=0.3)
    ref = reference_attention(inp, scale=0.3)
    assert max_error(out, ref[0]) < 1e-5 and max_error(lse, ref[1]) < 1e-5


def topk_reference_sum(scores, lens, k, n_sink, n_recent):
    """Sum of the selected scores the rule prescribes (ties make indices ambiguous)."""
    batch, hkv, _ = scores.shape
    sums = torch.zeros(batch, hkv, dtype=torch.float64)
    for b in range(batch):
        n = lens[b]
        for h in range(hkv):
            s = scores[b, h, :n].double()
            if n <= k:
                sums[b, h] = s.sum()
                continue
            forced = s[:n_sink].sum() + s[n - n_recent:].sum()
            middle = s[n_sink:n - n_recent]
            sums[b, h] = forced + middle.topk(k - n_sink - n_recent).values.sum()
    return sums


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,n_sink,n_recent", [(1, 0, 0), (8, 2, 3), (64, 0, 0), (100, 4, 4)])
def test_topk_select(device, k, n_sink, n_recent, gen):
    lens = [100, 7, 0, 64]
    scores = torch.rand(4, 3, 100, generator=gen)
    scores[:, :, 50] = scores[:, :, 51]  # a tie
    lens_t = torch.tensor(lens, dtype=torch.int32)
    idx, cnt = mage_ext.topk_select(scores.to(device), lens_t.to(device), k, n_sink, n_recent)
    idx, cnt = idx.cpu(), cnt.cpu()
    want = topk_reference_sum(scores, lens, k, n_sink, n_recent)
    for b, n in enumerate(lens):
        for h in range(3):
            c = int(cnt[b, h])
            assert c == min(k, n)
            sel = idx[b, h, :c].long()
            assert torch.equal(sel, sel.sort().values) and sel.unique().numel() == c
            assert (sel >= 0).all() and (sel < max(n, 1)).all()
            assert (idx[b, h, c:] == -1).all()
            if n > k:
                assert set(range(n_sink)) <= set(sel.tolist())
                assert set(range(n - n_recent, n)) <= set(sel.tolist())
            got = scores[b, h, sel].double().sum()
            assert abs(got - want[b, h]) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_append_kv(device, gen):
    kc = torch.zeros(2, 2, 12, 64, device=device)
    vc = torch.zeros_like(kc)
    kb = torch.randn(2, 2, 4, 64, generator=gen).to(device)
    vb = torch.randn(2, 2, 4, 64, generator=gen).to(device)
    lens = torch.tensor([0, 8], dtype=torch.int32, device=device)
    mage_ext.append_kv(kc, vc, lens, kb, vb)
    assert torch.equal(kc[0, :, :4], kb[0]) and torch.equal(vc[1, :, 8:], vb[1])
    assert kc[0, :, 4:].abs().sum() == 0 and kc[1, :, :8].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_out_variants_write_every_element(device, gen):
    inp = make_inputs(2, 6, 2, 8, 64, [40, 13], torch.bfloat16, device, generator=gen)
    out = torch.empty_like(inp.q)
    lse = torch.empty(2, 6, 8, device=device)
    scores = torch.empty(2, 2, 40, device=device)
    poison(out, lse, scores)
    mage_ext.ops.attention_with_scores_out(*inp.args(), None, out, lse, scores)
    ref_out, ref_lse, ref_scores = mage_ext.attention_with_scores(*inp.args())
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert torch.equal(scores, ref_scores)
    idx = torch.empty(2, 2, 16, dtype=torch.int32, device=device)
    cnt = torch.empty(2, 2, dtype=torch.int32, device=device)
    poison(idx, cnt)
    mage_ext.ops.topk_select_out(scores, inp.cache_lens, 16, 1, 1, idx, cnt)
    ref_idx, ref_cnt = mage_ext.topk_select(scores, inp.cache_lens, 16, 1, 1)
    assert torch.equal(idx, ref_idx) and torch.equal(cnt, ref_cnt)
    poison(out, lse)
    mage_ext.ops.sparse_attention_out(inp.q, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block,
                                      inp.v_block, None, out, lse)
    ref_out, ref_lse = mage_ext.sparse_attention(inp.q, inp.k_cache, inp.v_cache, idx, cnt,
                                                 inp.k_block, inp.v_block)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    poison(out, lse)
    mage_ext.ops.dense_attention_out(*inp.args(), None, out, lse)
    assert not out.isnan().any() and not lse.isnan().any()


def test_hf_layout_queries_are_accepted(gen):
    """q straight from a [batch, B, Hq, d] projection (transposed view, not contiguous)."""
    inp = make_inputs(2, 4, 2, 8, 64, [10, 20], generator=gen)
    q_view = inp.q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_view.is_contiguous()
    a = mage_ext.dense_attention(q_view, *inp.args()[1:])[0]
    b = mage_ext.dense_attention(*inp.args())[0]
    assert torch.equal(a, b)
