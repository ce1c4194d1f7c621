"""Property-based tests (hypothesis) of every op against the plain-PyTorch references.

Random shapes (batch, GQA ratio, block size, head dim 64 / 128), dtypes, scales and cache lengths
drawn around the edges (0, 1, B - 1, multiples of the CUDA key tile (64) and of the CPU chunk
(2048) +- 1, random); budgets k around the length; selections with fewer entries than k;
top-k scores with ties, NaN, -inf and -0. Outputs are written into NaN-poisoned buffers through
the *_out forms and must also equal the allocating forms bit for bit.

The example budget is bounded (EXAMPLES per test, no deadline, no example database written to
the tree), so the file costs CI tens of seconds; MAGE_HYPOTHESIS_EXAMPLES=<n> raises it for a
deeper local run. Runs on every device of conftest.DEVICES (the CPU in CI).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mage_ext
from conftest import DEVICES
from reference import (AttentionInputs, assert_close_fa, poison, random_selection,
                       reference_append, reference_attention, reference_topk)

EXAMPLES = int(os.environ.get("MAGE_HYPOTHESIS_EXAMPLES", "20"))
BUDGET = settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EDGE_LENGTHS = [0, 1, 2, 63, 64, 65, 127, 128, 129, 2047, 2048, 2049]


@st.composite
def lengths(draw, batch, block):
    """Cache lengths per sequence: edges (including B - 1 and B), else random."""
    edge = st.sampled_from(EDGE_LENGTHS + [max(block - 1, 0), block])
    return [draw(st.one_of(edge, st.integers(0, 300))) for _ in range(batch)]


@st.composite
def attention_case(draw):
    batch = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4, 7]))
    block = draw(st.sampled_from([1, 2, 5, 8, 16, 31, 32]))
    dim = draw(st.sampled_from([64, 128]))
    lens = draw(lengths(batch, block))
    capacity = max(max(lens) + draw(st.sampled_from([0, 1, 7])), 1)
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.one_of(st.none(), st.floats(0.02, 1.5)))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, hkv, group, block, dim, lens, capacity, dtype, scale, seed


def make(case, device):
    batch, hkv, group, block, dim, lens, capacity, dtype, scale, seed = case
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    inp = AttentionInputs(randn(batch, hkv * group, block, dim), randn(batch, hkv, capacity, dim),
                          randn(batch, hkv, capacity, dim),
                          torch.tensor(lens, dtype=torch.int32, device=device),
                          randn(batch, hkv, block, dim), randn(batch, hkv, block, dim))
    return inp, g


def poisoned_outputs(inp):
    out = torch.empty_like(inp.q, memory_format=torch.contiguous_format)
    lse = torch.empty(inp.q.shape[:3], device=inp.q.device)
    poison(out, lse)
    return out, lse


@pytest.mark.parametrize("device", DEVICES)
@BUDGET
@given(case=attention_case())
def test_first_step_and_dense_attention(device, case):
    inp, _ = make(case, device)
    dtype, scale = case[7], case[8]
    ref64 = reference_attention(inp, scale=scale)
    ref_pt = reference_attention(inp, scale=scale, dtype=dtype)
    out, lse = poisoned_outputs(inp)
    scores = torch.empty(inp.k_cache.shape[:3], device=device)
    poison(scores)
    mage_ext.ops.attention_with_scores_out(*inp.args(), scale, out, lse, scores)
    assert_close_fa(out, ref64[0], ref_pt[0], dtype, "out")
    assert_close_fa(lse, ref64[1], ref_pt[1], dtype, "lse")
    assert_close_fa(scores, ref64[2], ref_pt[2], dtype, "scores")
    again = mage_ext.attention_with_scores(*inp.args(), scale=scale)
    assert all(torch.equal(a, b) for a, b in zip((out, lse, scores), again))
    d_out, d_lse = poisoned_outputs(inp)
    mage_ext.ops.dense_attention_out(*inp.args(), scale, d_out, d_lse)
    assert_close_fa(d_out, ref64[0], ref_pt[0], dtype, "dense out")
    assert_close_fa(d_lse, ref64[1], ref_pt[1], dtype, "dense lse")


@st.composite
def sparse_case(draw):
    case = draw(attention_case())
    lens = case[5]
    n = max(lens)
    k = draw(st.one_of(st.sampled_from([1, max(n - 1, 1), max(n, 1), n + 1]),
                       st.integers(1, max(n, 1) + 3)))
    short = draw(st.booleans())  # some rows read fewer entries than they could
    return case, k, short


@pytest.mark.parametrize("device", DEVICES)
@BUDGET
@given(sc=sparse_case())
def test_sparse_attention(device, sc):
    case, k, short = sc
    inp, g = make(case, device)
    lens, dtype, scale, hkv = case[5], case[7], case[8], case[1]
    indices, counts = random_selection(lens, hkv, k, generator=g, short=short)
    mage_ext.check_selection(indices, counts, case[6], inp.cache_lens.cpu())
    indices, counts = indices.to(device), counts.to(device)
    ref64 = reference_attention(inp, indices, counts, scale=scale)
    ref_pt = reference_attention(inp, indices, counts, scale=scale, dtype=dtype)
    out, lse = poisoned_outputs(inp)
    mage_ext.ops.sparse_attention_out(inp.q, inp.k_cache, inp.v_cache, indices, counts,
                                      inp.k_block, inp.v_block, scale, out, lse)
    assert_close_fa(out, ref64[0], ref_pt[0], dtype, "sparse out")
    assert_close_fa(lse, ref64[1], ref_pt[1], dtype, "sparse lse")
    again = mage_ext.sparse_attention(inp.q, inp.k_cache, inp.v_cache, indices, counts,
                                      inp.k_block, inp.v_block, scale)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])


@st.composite
def topk_case(draw):
    batch = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    lens = draw(lengths(batch, 32))
    capacity = max(max(lens) + draw(st.sampled_from([0, 1, 9])), 1)
    n = max(lens)
    k = draw(st.one_of(st.sampled_from([1, max(n - 1, 1), max(n, 1), n + 1]),
                       st.integers(1, capacity)))
    k = min(k, capacity)
    n_sink = draw(st.integers(0, min(k, 4)))
    n_recent = draw(st.integers(0, min(k - n_sink, 4)))
    levels = draw(st.sampled_from([3, 50, 0]))  # few distinct values (ties), many, continuous
    specials = draw(st.booleans())  # NaN, -inf, -0 among the scores
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, hkv, lens, capacity, k, n_sink, n_recent, levels, specials, seed


@pytest.mark.parametrize("device", DEVICES)
@BUDGET
@given(case=topk_case())
def test_topk_select(device, case):
    batch, hkv, lens, capacity, k, n_sink, n_recent, levels, specials, seed = case
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, hkv, capacity, generator=g)
    if levels:
        scores = torch.floor(scores * levels) / levels
    if specials:
        flat = scores.view(-1)
        for value in (float("nan"), float("-inf"), -0.0, 0.0):
            at = torch.randint(0, flat.numel(), (max(1, flat.numel() // 20),), generator=g)
            flat[at] = value
    lens_t = torch.tensor(lens, dtype=torch.int32)
    want_idx, want_cnt = reference_topk(scores, lens, k, n_sink, n_recent)
    idx = torch.empty(batch, hkv, k, dtype=torch.int32, device=device)
    cnt = torch.empty(batch, hkv, dtype=torch.int32, device=device)
    poison(idx, cnt)
    mage_ext.ops.topk_select_out(scores.to(device), lens_t.to(device), k, n_sink, n_recent, idx,
                                 cnt)
    assert torch.equal(cnt.cpu(), want_cnt)
    assert torch.equal(idx.cpu(), want_idx)
    mage_ext.check_selection(idx, cnt, capacity, lens_t.to(device))


@st.composite
def append_case(draw):
    batch = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    block = draw(st.sampled_from([1, 3, 8, 32]))
    dim = draw(st.sampled_from([4, 64, 128]))  # 4: rows of 8 / 16 bytes (the unvectorised copy)
    capacity = draw(st.integers(block, block + 200))
    lens = [draw(st.one_of(st.just(0), st.just(capacity - block),
                           st.integers(0, capacity - block))) for _ in range(batch)]
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, hkv, block, dim, capacity, lens, dtype, seed


@pytest.mark.parametrize("device", DEVICES)
@BUDGET
@given(case=append_case())
def test_append_kv(device, case):
    batch, hkv, block, dim, capacity, lens, dtype, seed = case
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    kc, vc = randn(batch, hkv, capacity, dim), randn(batch, hkv, capacity, dim)
    kb, vb = randn(batch, hkv, block, dim), randn(batch, hkv, block, dim)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    want_k, want_v = reference_append(kc, vc, lens_t, kb, vb)
    mage_ext.append_kv(kc, vc, lens_t, kb, vb)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@st.composite
def broken_selection(draw):
    """A valid ascending selection, then one defect: a repeat, a swap, a negative index, an index
    at the capacity, or (with cache_lens) one past the sequence's length."""
    batch, hkv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    capacity = draw(st.integers(4, 100))
    lens = [draw(st.integers(2, capacity)) for _ in range(batch)]
    k = draw(st.integers(2, capacity))
    seed = draw(st.integers(0, 2**31 - 1))
    defect = draw(st.sampled_from(["repeat", "swap", "negative", "capacity", "length"]))
    g = torch.Generator().manual_seed(seed)
    indices = torch.full((batch, hkv, k), -1, dtype=torch.int32)
    counts = torch.zeros((batch, hkv), dtype=torch.int32)
    for b, n in enumerate(lens):
        for h in range(hkv):
            c = int(torch.randint(2, min(k, n) + 1, (1,), generator=g))
            indices[b, h, :c] = torch.randperm(n, generator=g)[:c].sort().values.to(torch.int32)
            counts[b, h] = c
    b, h = draw(st.integers(0, batch - 1)), draw(st.integers(0, hkv - 1))
    c = int(counts[b, h])
    i = draw(st.integers(1, c - 1))
    if defect == "repeat":
        indices[b, h, i] = indices[b, h, i - 1]
    elif defect == "swap":
        indices[b, h, i - 1], indices[b, h, i] = int(indices[b, h, i]), int(indices[b, h, i - 1])
    elif defect == "negative":
        indices[b, h, 0] = -1 - draw(st.integers(0, 5))
    elif defect == "capacity":
        indices[b, h, c - 1] = capacity + draw(st.integers(0, 5))
    else:
        indices[b, h, c - 1] = max(lens[b], int(indices[b, h, c - 1]))
    return indices, counts, capacity, torch.tensor(lens, dtype=torch.int32), defect


@BUDGET
@given(sel=broken_selection())
def test_check_selection_and_the_cpu_op_reject_every_defect(sel):
    indices, counts, capacity, lens, defect = sel
    pattern = "does not follow" if defect in ("repeat", "swap") else "is outside the cache"
    with pytest.raises(ValueError, match=pattern):
        mage_ext.check_selection(indices, counts, capacity, lens)
    if defect == "length":  # within the capacity: only the lengths show it
        if int(indices.max()) < capacity:
            mage_ext.check_selection(indices, counts, capacity)
        return
    batch, hkv = counts.shape
    z = torch.zeros(batch, 2 * hkv, 1, 64)
    cache = torch.zeros(batch, hkv, capacity, 64)
    blk = torch.zeros(batch, hkv, 1, 64)
    with pytest.raises(RuntimeError, match=pattern.replace("(", r"\(")):
        mage_ext.sparse_attention(z, cache, cache, indices, counts, blk, blk)
