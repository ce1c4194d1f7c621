"""The matched controls of MAGE (random / recent selection, selectors/controls.py)."""
import pytest
import torch

from mage_ext import ops
from mage_ext.core.policy import PolicyConfig
from mage_ext.core.selectors import make_selector
from mage_ext.core.selectors.controls import (RandomSelector, RecentSelector, hash_scores,
                                              recency_scores)
from mage_ext.core.selectors.window import last_window
from conftest import requires_cuda
from test_baselines import FakeLoop, ref_out

METHODS = ("random", "recent")


def _rows(sel):
    """Selected positions per (sequence, KV head) as lists."""
    return [[sel.indices[b, h, :int(sel.counts[b, h])].tolist() for h in range(sel.indices.shape[1])]
            for b in range(sel.indices.shape[0])]


def _check_valid(sel, lens, k):
    batch, hkv, width = sel.indices.shape
    assert sel.indices.dtype == torch.int32 and sel.counts.dtype == torch.int32
    assert width == k and tuple(sel.counts.shape) == (batch, hkv)
    for b, n in enumerate(lens):
        for h, row in enumerate(_rows(sel)[b]):
            assert len(row) == min(k, n) == int(sel.counts[b, h])
            assert row == sorted(set(row)) and all(0 <= i < n for i in row)
            assert (sel.indices[b, h, len(row):] == -1).all()
    ops.check_selection(sel.indices, sel.counts, 10**6, torch.tensor(lens, dtype=torch.int32))


def _loop(method, gen, k=7, lens=(37, 5, 20), capacity=48, n_layers=3, dense_layers=1, **cfg):
    sel = make_selector(PolicyConfig(method=method, k=k, dense_layers=dense_layers, **cfg))
    return FakeLoop(sel, n_layers=n_layers, lens=list(lens), capacity=capacity, gen=gen)


@pytest.mark.parametrize("method", METHODS)
def test_first_step_exact_then_selection_reused(method, gen):
    loop = _loop(method, gen, k=7)
    loop.run_block(steps=3)
    for layer in range(3):
        first, *later = loop.of(layer=layer)
        assert first["sel"] is None and torch.allclose(first["out"].double(), ref_out(first, None)[0],
                                                       atol=1e-5)
        if layer < 1:  # dense layer: every step reads the whole cache
            assert all(r["sel"] is None for r in later)
            continue
        chosen = later[0]["sel"]
        _check_valid(chosen, [37, 5, 20], 7)
        for r in later:  # later steps and the commit forward read the first step's selection
            assert r["sel"] is chosen
            assert torch.allclose(r["out"].double(), ref_out(r, chosen)[0], atol=1e-5)


def test_recent_is_the_last_k_entries(gen):
    loop = _loop("recent", gen, k=6, lens=(37, 5, 20))
    loop.run_block(steps=2)
    sel = loop.of(layer=2, step=1)[0]["sel"]
    want = last_window(torch.tensor([37, 5, 20], dtype=torch.int32), 2, 6)
    assert _rows(sel) == _rows(want)


def test_random_is_seeded_per_block_layer_and_head(gen):
    def picks(seed, blocks=2, lens=(40, 40)):
        loop = _loop("random", gen, k=8, lens=lens, capacity=80, selection_seed=seed)
        for _ in range(blocks):
            loop.run_block(steps=2)
        return [(r["layer"], _rows(r["sel"])) for r in loop.records
                if r["phase"] == "denoise" and r["step"] == 1 and r["sel"] is not None]

    a, b, c = picks(3), picks(3), picks(4)
    assert a == b and a != c                                  # same seed, same draws
    (l1, s1), (l2, s2), (_, s3), _ = a                        # block 0 layers 1, 2; block 1 ...
    assert (l1, l2) == (1, 2) and s1 != s2                    # layers draw differently
    assert s1[0][0] != s1[0][1]                               # so do the KV heads
    assert s3 != s1                                           # and the next block draws afresh
    # a sequence's draw does not depend on its batch mates (same length -> same draw)
    assert s1[0] == s1[1]
    alone = picks(3, blocks=1, lens=(40,))
    assert alone[0][1][0] == s1[0]


def test_hash_scores_properties():
    s = hash_scores(5, 2, 1, 3, 4000, "cpu")
    assert s.shape == (3, 4000) and s.dtype == torch.float32
    assert 0.0 <= float(s.min()) and float(s.max()) < 1.0
    assert torch.equal(hash_scores(5, 2, 1, 3, 100, "cpu"), s[:, :100])   # capacity-independent
    assert not torch.equal(hash_scores(6, 2, 1, 3, 4000, "cpu"), s)
    assert abs(float(s.mean()) - 0.5) < 0.02                                 # roughly uniform
    assert torch.equal(recency_scores(2, 5, "cpu")[1], torch.arange(5.0))


@pytest.mark.parametrize("method", METHODS)
def test_sink_and_recent_positions_are_kept(method, gen):
    loop = _loop(method, gen, k=6, n_sink=2, n_recent=1, dense_layers=0, lens=(30, 30))
    loop.run_block(steps=2)
    for row in _rows(loop.of(layer=0, step=1)[0]["sel"])[0]:
        assert {0, 1, 29} <= set(row) and len(row) == 6


# k >= the cache length gives the exact output: test_baselines.py runs that check for these too.


@pytest.mark.parametrize("method", METHODS)
def test_exact_commit_and_per_layer_budgets(method, gen):
    loop = _loop(method, gen, k=(4, 5, 6), dense_layers=0, commit_attention="exact")
    loop.run_block(steps=2)
    assert [r["sel"].indices.shape[-1] for r in loop.of(step=1, phase="denoise")] == [4, 5, 6]
    assert all(r["sel"] is None for r in loop.of(phase="commit"))


@pytest.mark.parametrize("cls,method", [(RandomSelector, "random"), (RecentSelector, "recent")])
def test_configs_and_call_order(cls, method, gen):
    with pytest.raises(ValueError, match="config.method"):
        cls(PolicyConfig(method="mage"))
    assert type(make_selector(PolicyConfig(method=method))) is cls
    with pytest.raises(ValueError, match="selection_seed"):
        PolicyConfig(method=method, selection_seed=-1)
    loop = _loop(method, gen, dense_layers=0)
    loop.sel.begin_block()
    with pytest.raises(RuntimeError, match="step 0 of the block must run first"):
        loop.attend(1, "denoise", 0, loop.kv[0])


@requires_cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_selection_equals_cpu(method, gen):
    """The hash and the top-k run on the device: the same draws as on the CPU (scores hold 24
    bits, so a tie at the cut is possible in principle; at 300 entries it has ~0.3% odds)."""
    from mage_ext.core.selectors import LayerKV, StepContext

    lens = torch.tensor([300, 17, 250], dtype=torch.int32)
    k = torch.randn(3, 2, 300, 8, generator=gen)
    picks = {}
    for device in ("cpu", "cuda"):
        sel = make_selector(PolicyConfig(method=method, k=40, dense_layers=0, selection_seed=9))
        sel.reset(3, 2)
        sel.begin_block()
        kv = LayerKV(k.to(device), k.to(device), lens.to(device))
        s = sel.select(StepContext(1, 2, 0, "denoise", 0.3), kv)
        picks[device] = (s.indices.cpu(), s.counts.cpu())
    assert torch.equal(picks["cpu"][0], picks["cuda"][0])
    assert torch.equal(picks["cpu"][1], picks["cuda"][1])
