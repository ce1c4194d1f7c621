"""Bad inputs give an error naming the argument (never a crash or silent garbage)."""
import pytest
import torch

import mage_ext
from reference import make_inputs


@pytest.fixture
def inp(gen):
    return make_inputs(2, 4, 2, 8, 64, [32, 5], capacity=32, generator=gen)


def replace(inp, **kw):
    args = dict(q=inp.q, k_cache=inp.k_cache, v_cache=inp.v_cache, cache_lens=inp.cache_lens,
                k_block=inp.k_block, v_block=inp.v_block)
    args.update(kw)
    return args


@pytest.mark.parametrize("change,message", [
    (lambda i: dict(q=i.q[0]), "q must be a 4-D tensor"),
    (lambda i: dict(q=torch.randn(2, 5, 8, 64)), "not a multiple of the 2 KV heads"),
    (lambda i: dict(k_cache=i.k_cache.half()), "k_cache has dtype"),
    (lambda i: dict(q=i.q.to(torch.int32)), "q must be float16, bfloat16 or float32"),
    (lambda i: dict(v_cache=i.v_cache[:, :, :16]), "v_cache must have shape"),
    (lambda i: dict(k_block=i.k_block[:, :, :7]), "k_block must have shape"),
    (lambda i: dict(cache_lens=i.cache_lens[:1]), "cache_lens must have 2 entries"),
    (lambda i: dict(cache_lens=i.cache_lens.long()), "cache_lens must have dtype Int"),
    (lambda i: dict(cache_lens=torch.tensor([33, 5], dtype=torch.int32)), "cache_lens[0] = 33"),
    (lambda i: dict(cache_lens=torch.tensor([3, -1], dtype=torch.int32)), "cache_lens[1] = -1"),
    (lambda i: dict(k_cache=torch.randn(2, 2, 0, 64), v_cache=torch.randn(2, 2, 0, 64)),
     "k_cache is empty"),
    (lambda i: dict(k_cache=i.k_cache.transpose(2, 3).contiguous().transpose(2, 3)),
     "k_cache must have contiguous rows"),
])
@pytest.mark.parametrize("op", ["dense_attention", "attention_with_scores"])
def test_attention_rejects(inp, change, message, op):
    with pytest.raises(RuntimeError, match=None) as err:
        getattr(mage_ext, op)(**replace(inp, **change(inp)))
    assert message in str(err.value), str(err.value)
    assert f"mage.{op}" in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to mix devices")
def test_device_mix_is_rejected(inp):
    with pytest.raises(RuntimeError, match="k_cache is on cpu but q is on cuda"):
        mage_ext.dense_attention(**replace(inp, q=inp.q.cuda()))


@pytest.mark.parametrize("indices,counts,message", [
    (lambda: torch.full((2, 2, 4), 32, dtype=torch.int32), None, "is outside the cache"),
    (lambda: torch.full((2, 2, 4), -1, dtype=torch.int32), None, "= -1 is outside the cache"),
    (None, lambda: torch.full((2, 2), 5, dtype=torch.int32), "counts[0, 0] = 5"),
    (None, lambda: torch.full((2,), 4, dtype=torch.int32), "counts must be a 2-D tensor"),
    (None, lambda: torch.full((2, 3), 4, dtype=torch.int32), "counts must have shape"),
    (lambda: torch.zeros(2, 3, 4, dtype=torch.int32), None, "indices must have shape"),
    (lambda: torch.zeros(2, 2, 4, dtype=torch.int64), None, "indices must have dtype Int"),
    (lambda: torch.tensor([0, 1, 1, 2], dtype=torch.int32).expand(2, 2, 4), None,
     "indices[0, 0, 2] = 1 does not follow indices[0, 0, 1] = 1"),  # a repeat: counted twice
    (lambda: torch.tensor([0, 3, 2, 5], dtype=torch.int32).expand(2, 2, 4), None,
     "indices[0, 0, 2] = 2 does not follow"),  # not ascending
])
def test_sparse_rejects(inp, indices, counts, message):
    idx = indices() if indices else torch.arange(4, dtype=torch.int32).expand(2, 2, 4)
    cnt = counts() if counts else torch.full((2, 2), 4, dtype=torch.int32)
    with pytest.raises(RuntimeError) as err:
        mage_ext.sparse_attention(inp.q, inp.k_cache, inp.v_cache, idx, cnt, inp.k_block,
                                  inp.v_block)
    assert message in str(err.value), str(err.value)


def test_check_selection_helper():
    idx = torch.tensor([[[0, 5, 9]]], dtype=torch.int32)
    three = torch.tensor([[3]], dtype=torch.int32)
    mage_ext.check_selection(idx, three, capacity=10)
    mage_ext.check_selection(idx, three, capacity=10, cache_lens=torch.tensor([10]))
    with pytest.raises(ValueError, match=r"indices\[0, 0, 2\] = 9 is outside"):
        mage_ext.check_selection(idx, three, capacity=9)
    with pytest.raises(ValueError, match=r"indices\[0, 0, 2\] = 9 is outside the cache "
                                         r"\(expected 0 <= index < cache_lens\[0\]=9\)"):
        mage_ext.check_selection(idx, three, capacity=10, cache_lens=torch.tensor([9]))
    with pytest.raises(ValueError, match="counts must lie in"):
        mage_ext.check_selection(idx, torch.tensor([[4]], dtype=torch.int32), capacity=10)
    for bad in ([0, 5, 5], [5, 0, 9]):
        with pytest.raises(ValueError, match="does not follow"):
            mage_ext.check_selection(torch.tensor([[bad]], dtype=torch.int32), three, capacity=10)
    # entries past the count are not part of the selection
    mage_ext.check_selection(torch.tensor([[[3, -1, -1]]], dtype=torch.int32),
                             torch.tensor([[1]], dtype=torch.int32), capacity=10)


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=0), "k must be >= 1"),
    (dict(k=-3), "k must be >= 1"),
    (dict(k=33), "larger than the cache capacity 32"),
    (dict(k=4, n_sink=3, n_recent=2), "n_sink + n_recent = 5 exceeds k = 4"),
    (dict(k=4, n_sink=-1), "n_sink and n_recent must be >= 0"),
])
def test_topk_rejects(kwargs, message):
    scores = torch.rand(2, 2, 32)
    lens = torch.tensor([32, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError) as err:
        mage_ext.topk_select(scores, lens, **kwargs)
    assert message in str(err.value)


def test_topk_rejects_empty_cache_and_wrong_dtype():
    lens = torch.tensor([0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="scores is empty"):
        mage_ext.topk_select(torch.rand(1, 2, 0), lens, 1)
    with pytest.raises(RuntimeError, match="scores must have dtype Float"):
        mage_ext.topk_select(torch.rand(1, 2, 8).half(), lens, 1)


def test_append_rejects_overflow():
    kc = torch.zeros(1, 2, 10, 4)
    kb = torch.randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="does not fit the cache capacity 10"):
        mage_ext.append_kv(kc, kc.clone(), torch.tensor([7], dtype=torch.int32), kb, kb)
