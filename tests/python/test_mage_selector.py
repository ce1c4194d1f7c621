"""MageSelector and the adaptive budget rule against plain-PyTorch references of their rules."""
import math

import pytest
import torch

from mage_ext.core.policy import PolicyConfig, adaptive_budgets, dispersion_score
from mage_ext.core.selectors import LayerKV, StepContext, make_selector
from mage_ext.core.selectors import mage as mage_mod
from reference import make_inputs, reference_attention

SCALE = 0.3


def test_adaptive_budgets_by_hand():
    # s = [2, 6, 0 -> k_min, 12]: sum 20, K*L = 100*4 = 400
    assert adaptive_budgets([2.0, 6.0, 0.0, 12.0], 100, 16) == [40, 120, 16, 240]
    assert adaptive_budgets([1.0, 1.0, 1.0], 7, 1) == [7, 7, 7]        # floor(1/3 * 21) = 7
    assert adaptive_budgets([0.0, 0.0], 64, 8) == [64, 64]            # nothing scored yet
    with pytest.raises(ValueError, match="mean_budget"):
        adaptive_budgets([1.0], 0, 1)
    with pytest.raises(ValueError, match=">= 0"):
        adaptive_budgets([-1.0], 4, 1)


def test_dispersion_score_by_hand():
    # head 0: 4 * (1 - ln 0.5) = 6.7726; head 1: 2 * (1 - ln 1) = 2; empty head ignored
    assert dispersion_score([4, 2, 0], [0.5, 1.0, 0.0]) == pytest.approx(4 * (1 + math.log(2)))
    assert dispersion_score([0], [0.0]) == 0.0
    with pytest.raises(ValueError, match="one coverage per head"):
        dispersion_score([1, 2], [0.5])


def _inputs(gen, lens=(13, 30), hq=6, hkv=2, block=5, dim=8, capacity=34):
    return make_inputs(len(lens), hq, hkv, block, dim, list(lens), capacity=capacity,
                       generator=gen)


def _ctx(layer, step, phase="denoise", n_layers=3):
    return StepContext(layer=layer, n_layers=n_layers, step=step, phase=phase, scale=SCALE)


def _ref_topk(scores, lens, k):
    """Top-k indices per (sequence, KV head), ascending, as lists."""
    out = []
    for b in range(scores.shape[0]):
        n = int(lens[b])
        out.append([sorted(scores[b, h, :n].topk(min(k, n)).indices.tolist())
                    for h in range(scores.shape[1])])
    return out


def _selected(sel):
    return [[sel.indices[b, h, :int(sel.counts[b, h])].tolist()
             for h in range(sel.indices.shape[1])] for b in range(sel.indices.shape[0])]


def test_first_step_selects_and_later_steps_reuse(gen):
    inp = _inputs(gen)
    kv = LayerKV(inp.k_cache, inp.v_cache, inp.cache_lens)
    sel = make_selector(PolicyConfig(method="mage", k=7, dense_layers=1))
    sel.reset(2, 3)
    sel.begin_block()
    sel.begin_step(0)
    out0, none = sel.attend(_ctx(1, 0), inp.q, inp.k_block, inp.v_block, kv)
    ref_out, _, ref_scores = reference_attention(inp, scale=SCALE)
    assert none is None and torch.allclose(out0.double(), ref_out, atol=1e-5)
    sel.end_step(0)
    chosen = sel.selections[1]
    assert _selected(chosen) == _ref_topk(ref_scores, inp.cache_lens, 7)
    # a later step with new queries: sparse attention over the same selection
    inp.q = torch.randn(inp.q.shape, generator=gen)
    sel.begin_step(1)
    out1, used = sel.attend(_ctx(1, 1), inp.q, inp.k_block, inp.v_block, kv)
    ref1, _, _ = reference_attention(inp, chosen.indices, chosen.counts, scale=SCALE)
    assert used is chosen and torch.allclose(out1.double(), ref1, atol=1e-5)
    # commit forward: sparse by default
    out_c, used_c = sel.attend(_ctx(1, 2, "commit"), inp.q, inp.k_block, inp.v_block, kv)
    assert used_c is chosen and torch.allclose(out_c, out1)


def test_dense_layers_and_exact_commit_read_everything(gen):
    inp = _inputs(gen)
    kv = LayerKV(inp.k_cache, inp.v_cache, inp.cache_lens)
    sel = make_selector(PolicyConfig(method="mage", k=4, dense_layers=2, commit_attention="exact"))
    sel.reset(2, 3)
    sel.begin_block()
    ref_out, _, _ = reference_attention(inp, scale=SCALE)
    for layer in (0, 1):
        out, used = sel.attend(_ctx(layer, 3), inp.q, inp.k_block, inp.v_block, kv)
        assert used is None and torch.allclose(out.double(), ref_out, atol=1e-5)
    sel.attend(_ctx(2, 0), inp.q, inp.k_block, inp.v_block, kv)
    out, used = sel.attend(_ctx(2, 1, "commit"), inp.q, inp.k_block, inp.v_block, kv)
    assert used is None and torch.allclose(out.double(), ref_out, atol=1e-5)


def test_later_step_without_first_step_is_an_error(gen):
    inp = _inputs(gen)
    sel = make_selector(PolicyConfig(method="mage", k=4, dense_layers=0))
    sel.reset(2, 3)
    sel.begin_block()
    with pytest.raises(RuntimeError, match="step 0 of the block must run first"):
        sel.attend(_ctx(0, 1), inp.q, inp.k_block, inp.v_block,
                   LayerKV(inp.k_cache, inp.v_cache, inp.cache_lens))


def test_replayed_first_step_restores_the_selection(gen):
    """A block whose first forward is a CUDA graph replay runs no Python: the selection lives only
    in the fixed buffers the graph wrote. replayed("first") takes it from there, so a later step
    that does run Python (its graph's warm-up or capture) finds it (the H200 run found a
    generation that raised here: an earlier block had ended after its first step)."""
    inp = _inputs(gen)
    kv = LayerKV(inp.k_cache, inp.v_cache, inp.cache_lens)
    sel = make_selector(PolicyConfig(method="mage", k=5, dense_layers=0))
    sel.reset(2, 3)
    sel.begin_block()
    sel.attend(_ctx(1, 0), inp.q, inp.k_block, inp.v_block, kv)  # block 0, eager first step
    chosen = _selected(sel.selections[1])
    sel.begin_block()  # block 1: its first forward replays (the buffers hold its selection)
    with pytest.raises(RuntimeError, match="step 0 of the block must run first"):
        sel.attend(_ctx(1, 1), inp.q, inp.k_block, inp.v_block, kv)
    sel.replayed("later")  # only the first forward selects
    assert sel.selections[1] is None
    sel.replayed("first")
    out, used = sel.attend(_ctx(1, 1), inp.q, inp.k_block, inp.v_block, kv)
    assert _selected(used) == chosen and sel.selections[0] is None  # layer 0 never selected
    ref, _, _ = reference_attention(inp, used.indices, used.counts, scale=SCALE)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_sink_recent_and_budget_above_capacity(gen):
    inp = _inputs(gen, lens=(3, 34))
    kv = LayerKV(inp.k_cache, inp.v_cache, inp.cache_lens)
    sel = make_selector(PolicyConfig(method="mage", k=100, dense_layers=0))
    sel.reset(2, 1)
    sel.begin_block()
    sel.attend(_ctx(0, 0, n_layers=1), inp.q, inp.k_block, inp.v_block, kv)
    assert sel.selections[0].counts.tolist() == [[3, 3], [34, 34]]   # clamped to the cache
    sel = make_selector(PolicyConfig(method="mage", k=6, n_sink=2, n_recent=2, dense_layers=0))
    sel.reset(2, 1)
    sel.begin_block()
    sel.attend(_ctx(0, 0, n_layers=1), inp.q, inp.k_block, inp.v_block, kv)
    picked = _selected(sel.selections[0])
    for h in range(2):
        assert {0, 1, 32, 33} <= set(picked[1][h]) and len(picked[1][h]) == 6


def ref_dispersion(inp, local_k, scale):
    """|U_h| and p_h with per-row loops over full softmax rows (cache + block)."""
    q, kc, kb = inp.q.double(), inp.k_cache.double(), inp.k_block.double()
    batch, hq, block, _ = q.shape
    hkv = kc.shape[1]
    g = hq // hkv
    sizes = torch.zeros(batch, hkv, dtype=torch.long)
    cover = torch.zeros(batch, hkv, dtype=torch.float64)
    for b in range(batch):
        n = int(inp.cache_lens[b])
        for h in range(hkv):
            keys = torch.cat([kc[b, h, :n], kb[b, h]])
            rows = q[b, h * g:(h + 1) * g].reshape(g * block, -1)
            probs = torch.softmax(rows @ keys.T * scale, -1)[:, :n]
            union = set()
            for r in range(rows.shape[0]):
                union |= set(probs[r].topk(min(local_k, n)).indices.tolist()) if n else set()
            idx = torch.tensor(sorted(union), dtype=torch.long)
            sizes[b, h] = len(union)
            cover[b, h] = probs[:, idx].sum() / rows.shape[0] if len(union) else 0.0
    return sizes, cover


@pytest.mark.parametrize("chunk", [5, 4096])
def test_dispersion_stats_match_reference(gen, monkeypatch, chunk):
    monkeypatch.setattr(mage_mod, "_CHUNK", chunk)
    inp = _inputs(gen, lens=(0, 9, 30))
    kv = LayerKV(inp.k_cache, inp.v_cache, inp.cache_lens)
    from mage_ext import ops
    _, lse, _ = ops.attention_with_scores(*inp.args(), SCALE)
    sizes, cover = mage_mod._dispersion_stats(inp.q, kv, inp.k_block, lse, SCALE, 3)
    want_sizes, want_cover = ref_dispersion(inp, 3, SCALE)
    assert torch.equal(sizes.long(), want_sizes)
    assert torch.allclose(cover.double(), want_cover, atol=1e-5)


def test_adaptive_budgets_drive_the_selection(gen):
    layers, k_mean, k_min = 4, 6, 2
    cfg = PolicyConfig(method="mage", k=k_mean, adaptive=True, k_min=k_min, dense_layers=1)
    sel = make_selector(cfg)
    sel.reset(2, layers)
    sel.begin_block()
    sel.begin_step(0)
    stats, kvs = {}, {}
    for layer in range(layers):
        inp = _inputs(gen, lens=(20, 31))
        kvs[layer] = (inp, LayerKV(inp.k_cache, inp.v_cache, inp.cache_lens))
        sel.attend(_ctx(layer, 0, n_layers=layers), inp.q, inp.k_block, inp.v_block,
                   kvs[layer][1])
        if layer >= 1:
            stats[layer] = ref_dispersion(inp, k_mean, SCALE)
    assert all(s is None for s in sel.selections)          # deferred to end_step(0)
    sel.end_step(0)
    assert sel.selections[0] is None                        # dense layer
    for b in range(2):
        scores = [dispersion_score(stats[l][0][b].tolist(), stats[l][1][b].tolist())
                  for l in range(1, layers)]
        budgets = adaptive_budgets(scores, k_mean, k_min)
        for l, k in zip(range(1, layers), budgets):
            inp = kvs[l][0]
            _, _, ref_scores = reference_attention(inp, scale=SCALE)
            got = _selected(sel.selections[l])[b]
            assert got == _ref_topk(ref_scores, inp.cache_lens, k)[b], (b, l, k)
