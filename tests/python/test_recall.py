"""Oracle recall, the recall meter and cache-traffic bookkeeping: hand cases and brute force."""
import math

import pytest
import torch

from mage_ext.eval.recall import RecallMeter, oracle_recall
from mage_ext.core.traffic import kv_bytes, kv_fraction
from mage_ext.core.selectors import LayerKV, Selection, StepContext
from reference import make_inputs, random_selection, reference_attention


def sel_of(rows, k):
    """Selection from lists of positions per (sequence, KV head)."""
    batch, hkv = len(rows), len(rows[0])
    indices = torch.full((batch, hkv, k), -1, dtype=torch.int32)
    counts = torch.zeros(batch, hkv, dtype=torch.int32)
    for b, per_head in enumerate(rows):
        for h, pos in enumerate(per_head):
            indices[b, h, :len(pos)] = torch.tensor(sorted(pos), dtype=torch.int32)
            counts[b, h] = len(pos)
    return Selection(indices, counts)


def tiny_case():
    """d = 1, q = 1, scale 1: logits are the keys. Sequence 0 has 5 entries, sequence 1 none."""
    keys = torch.tensor([0.0, 2.0, 1.0, -1.0, 3.0, 0.0])
    kc = torch.stack([keys, keys]).view(2, 1, 6, 1)
    kv = LayerKV(kc.clone(), torch.randn(2, 1, 6, 1), torch.tensor([5, 0], dtype=torch.int32))
    q = torch.ones(2, 1, 1, 1)
    return q, torch.zeros(2, 1, 1, 1), torch.randn(2, 1, 1, 1), kv


def test_hand_made_recall():
    q, kb, vb, kv = tiny_case()
    e = [math.exp(x) for x in (0.0, 2.0, 1.0, -1.0, 3.0)]
    # oracle top-2 = {4, 1}; T = {1, 2}: one hit, mass e^2 + e^1 of the cache's total
    r = oracle_recall(q, kb, vb, kv, sel_of([[[1, 2]], [[]]], 2), 2, 1.0)
    assert r.set_recall[0, 0].item() == pytest.approx(0.5)
    assert r.mass_recall[0, 0].item() == pytest.approx((e[1] + e[2]) / sum(e), rel=1e-6)
    assert r.oracle_mass[0, 0].item() == pytest.approx((e[4] + e[1]) / sum(e), rel=1e-6)
    assert math.isnan(r.set_recall[1, 0].item()) and math.isnan(r.mass_recall[1, 0].item())
    assert math.isnan(r.oracle_mass[1, 0].item())
    r = oracle_recall(q, kb, vb, kv, sel_of([[[0, 1, 2, 3, 4]], [[]]], 5), 3, 1.0)
    assert r.set_recall[0, 0].item() == 1.0 and r.mass_recall[0, 0].item() == pytest.approx(1.0)
    r = oracle_recall(q, kb, vb, kv, sel_of([[[]], [[]]], 2), 2, 1.0)  # read nothing
    assert r.set_recall[0, 0].item() == 0.0 and r.mass_recall[0, 0].item() == 0.0
    # k = None: the oracle has the selection's own size (3: {4, 1, 2})
    r = oracle_recall(q, kb, vb, kv, sel_of([[[1, 2, 3]], [[]]], 4), None, 1.0)
    assert r.set_recall[0, 0].item() == pytest.approx(2 / 3)
    # k > length: O is the whole cache (5 entries); the spec divides by k = 6, not |O| = 5
    r = oracle_recall(q, kb, vb, kv, sel_of([[[1, 4]], [[]]], 2), 6, 1.0)
    assert r.set_recall[0, 0].item() == pytest.approx(2 / 6)
    assert oracle_recall(q, kb, vb, kv, None, 2, 1.0) is None


def brute_force(inp, sel, ks, scale):
    _, _, scores = reference_attention(inp, scale=scale)
    batch, hkv, _ = scores.shape
    set_r = torch.full((batch, hkv), float("nan"), dtype=torch.float64)
    mass_r, oracle_r = set_r.clone(), set_r.clone()
    for b, n in enumerate(inp.cache_lens.tolist()):
        for h in range(hkv):
            row = scores[b, h, :n]
            chosen = set(sel.indices[b, h, :int(sel.counts[b, h])].tolist())
            oracle = set(row.argsort(descending=True)[:min(int(ks[b, h]), n)].tolist())
            if oracle:  # the spec: |T & O| / k, also where the cache is shorter than k
                set_r[b, h] = len(chosen & oracle) / int(ks[b, h])
            if n:
                mass_r[b, h] = row[sorted(chosen)].sum() / row.sum()
                oracle_r[b, h] = row[sorted(oracle)].sum() / row.sum()
    return set_r, mass_r, oracle_r


@pytest.mark.parametrize("k_kind", ["int", "none", "tensor"])
def test_recall_matches_brute_force(k_kind, gen):
    lens, hkv = [17, 4, 30, 0], 2
    inp = make_inputs(4, 6, hkv, 5, 12, lens, capacity=33, generator=gen)
    indices, counts = random_selection(lens, hkv, 8, generator=gen)
    counts[2, 1] = 5  # a row that read less than its budget
    indices[2, 1, 5:] = -1
    sel = Selection(indices, counts)
    kv = LayerKV(inp.k_cache, inp.v_cache, inp.cache_lens)
    k = {"int": 8, "none": None,
         "tensor": torch.randint(1, 12, (4, hkv), generator=gen, dtype=torch.int32)}[k_kind]
    ks = counts if k is None else (torch.full((4, hkv), k) if isinstance(k, int) else k)
    r = oracle_recall(inp.q, inp.k_block, inp.v_block, kv, sel, k, 0.3)
    ref_set, ref_mass, ref_oracle = brute_force(inp, sel, ks, 0.3)
    assert torch.allclose(r.set_recall, ref_set, equal_nan=True)
    assert torch.allclose(r.mass_recall, ref_mass, atol=1e-6, equal_nan=True)
    assert torch.allclose(r.oracle_mass, ref_oracle, atol=1e-6, equal_nan=True)
    if k_kind == "none":   # O has the selection's size: no selection of it reads more mass
        ok = ~r.mass_recall.isnan()
        assert (r.mass_recall[ok] <= r.oracle_mass[ok] + 1e-12).all()


@pytest.mark.parametrize("length", [1, 3, 7, 8, 9])
def test_set_recall_at_short_contexts_divides_by_k(length, gen):
    """Caches shorter than, equal to and just longer than k = 8: a selection reading the whole
    cache has set recall min(length, k) / k (the spec's |T & O| / k), mass recall 1."""
    k, hkv = 8, 2
    inp = make_inputs(1, 4, hkv, 3, 16, [length], capacity=12, generator=gen)
    kv = LayerKV(inp.k_cache, inp.v_cache, inp.cache_lens)
    everything = sel_of([[list(range(length))] * hkv], 12)
    r = oracle_recall(inp.q, inp.k_block, inp.v_block, kv, everything, k, 0.25)
    want = torch.full((1, hkv), min(length, k) / k, dtype=torch.float64)
    assert torch.allclose(r.set_recall, want)
    assert torch.allclose(r.mass_recall, torch.ones(1, hkv, dtype=torch.float64))
    ks = torch.full((1, hkv), k)
    ref_set, _, _ = brute_force(inp, everything, ks, 0.25)
    assert torch.allclose(r.set_recall, ref_set)
    # the meter averages the same values
    meter = RecallMeter(k=k)
    meter.record(StepContext(1, 2, 1, "denoise", 0.25), inp.q, inp.k_block, inp.v_block, kv,
                 everything)
    assert meter.summary()["set_recall"] == pytest.approx(min(length, k) / k)


def test_meter_skips_dense_commit_and_first_step_and_averages(gen):
    lens, hkv = [20, 9], 2
    meter, expect = RecallMeter(k=6), {}
    for layer in (2, 3):
        for step, phase in ((0, "denoise"), (1, "denoise"), (2, "denoise"), (3, "commit")):
            inp = make_inputs(2, 4, hkv, 3, 8, lens, capacity=24, generator=gen)
            kv = LayerKV(inp.k_cache, inp.v_cache, inp.cache_lens)
            sel = Selection(*random_selection(lens, hkv, 6, generator=gen))
            ctx = StepContext(layer, 4, step, phase, 0.35)
            assert meter.record(ctx, inp.q, inp.k_block, inp.v_block, kv, None) is None
            r = meter.record(ctx, inp.q, inp.k_block, inp.v_block, kv, sel)
            assert (r is None) == (step == 0 or phase == "commit")
            if r is not None:
                expect[(layer, step)] = r
    out = meter.summary()
    assert out["n"] == 2 * 2 * 2 * 2  # layers x steps x sequences x heads
    every = torch.stack([r.set_recall for r in expect.values()])
    assert out["set_recall"] == pytest.approx(every.mean().item())
    assert out["mass_recall"] == pytest.approx(
        torch.stack([r.mass_recall for r in expect.values()]).mean().item())
    assert sorted(out["per_layer"]) == [2, 3]
    layer3 = torch.stack([expect[(3, s)].mass_recall for s in (1, 2)])
    assert out["per_layer"][3]["mass_recall"] == pytest.approx(layer3.mean().item())
    assert out["oracle_mass"] == pytest.approx(
        torch.stack([r.oracle_mass for r in expect.values()]).mean().item())
    assert out["per_layer"][2]["oracle_mass"] == pytest.approx(
        torch.stack([expect[(2, s)].oracle_mass for s in (1, 2)]).mean().item())
    rec = [x for x in out["records"] if (x["layer"], x["head"], x["step"]) == (2, 1, 2)]
    assert rec[0]["set_recall"] == pytest.approx(expect[(2, 2)].set_recall[:, 1].mean().item())
    assert RecallMeter().summary()["set_recall"] is None


def test_kv_traffic():
    sel = Selection(torch.zeros(2, 2, 5, dtype=torch.int32),
                    torch.tensor([[3, 5], [0, 2]], dtype=torch.int32))
    lens = torch.tensor([10, 4], dtype=torch.int32)
    assert kv_fraction(sel, lens) == pytest.approx(10 / 28)
    assert kv_fraction(None, lens) == 1.0
    assert kv_fraction(sel, torch.zeros(2, dtype=torch.int32)) == 1.0
    assert kv_bytes(sel, lens, 2, 4, 2) == (10 * 16, 28 * 16)
    assert kv_bytes(None, lens, 2, 4, 2) == (28 * 16, 28 * 16)


def test_bad_arguments_are_named():
    q, kb, vb, kv = tiny_case()
    with pytest.raises(ValueError, match="selection.indices"):
        oracle_recall(q, kb, vb, kv, Selection(torch.zeros(2, 2, 3, dtype=torch.int32),
                                               torch.zeros(2, 2, dtype=torch.int32)), 2)
    with pytest.raises(TypeError, match="selection"):
        oracle_recall(q, kb, vb, kv, (1, 2), 2)
    good = sel_of([[[1]], [[]]], 2)
    with pytest.raises(ValueError, match="k:"):
        oracle_recall(q, kb, vb, kv, good, 0)
    with pytest.raises(ValueError, match="k:"):
        oracle_recall(q, kb, vb, kv, good, torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="k:"):
        RecallMeter(k=0)
    with pytest.raises(ValueError, match="lens"):
        kv_fraction(None, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="selection.counts"):
        kv_fraction(good, torch.zeros(3, dtype=torch.int32))
