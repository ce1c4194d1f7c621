"""Quest, Tidal and SparseD selectors, each against a plain reference of its own rule.

A tiny fake loop drives a selector in the documented call order (reset, begin_block, begin_step,
attend per layer, end_step, commit forward, append + on_append) over random per-layer caches.
"""
import math

import pytest
import torch

from mage_ext import ops
from mage_ext.core.policy import PolicyConfig
from mage_ext.core.selectors import LayerKV, StepContext, make_selector
from mage_ext.core.selectors.quest import QuestSelector, quest_page_scores
from mage_ext.core.selectors.sparsed import SparseDSelector
from mage_ext.core.selectors.tidal import TidalSelector
from reference import AttentionInputs, reference_attention


class FakeLoop:
    """Random per-layer caches and queries, fed to a selector in the order base.py documents."""

    def __init__(self, selector, n_layers, lens, capacity, gen, hq=6, hkv=2, dim=12, block=5,
                 steps_hint=None, report_prefill=True):
        self.sel, self.n_layers, self.gen = selector, n_layers, gen
        self.hq, self.hkv, self.dim, self.block, self.steps_hint = hq, hkv, dim, block, steps_hint
        batch = len(lens)
        self.kv = [LayerKV(self.randn(batch, hkv, capacity, dim), self.randn(batch, hkv, capacity, dim),
                           torch.tensor(lens, dtype=torch.int32)) for _ in range(n_layers)]
        selector.reset(batch, n_layers)
        if report_prefill:  # one length for all: the common prefix; attend folds the rest
            for layer, kv in enumerate(self.kv):
                selector.on_append(layer, kv, torch.zeros(batch, dtype=torch.int64), min(lens))
        self.records = []

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen)

    def attend(self, step, phase, layer, kv):
        batch = kv.k.shape[0]
        q = self.randn(batch, self.hq, self.block, self.dim)
        kb, vb = (self.randn(batch, self.hkv, self.block, self.dim) for _ in range(2))
        ctx = StepContext(layer, self.n_layers, step, phase, self.dim ** -0.5, self.steps_hint)
        out, sel = self.sel.attend(ctx, q, kb, vb, kv)
        self.records.append(dict(step=step, layer=layer, phase=phase, q=q, kb=kb, vb=vb,
                                 kv=LayerKV(kv.k.clone(), kv.v.clone(), kv.lens.clone()),
                                 out=out, sel=sel))
        return kb, vb

    def forward(self, step, phase):
        self.sel.begin_step(step)
        blocks = [self.attend(step, phase, layer, kv) for layer, kv in enumerate(self.kv)]
        self.sel.end_step(step)
        return blocks

    def run_block(self, steps):
        self.sel.begin_block()
        for step in range(steps):
            self.forward(step, "denoise")
        # the commit forward, then each layer's block KV is written and reported
        for layer, (kv, (kb, vb)) in enumerate(zip(self.kv, self.forward(steps, "commit"))):
            ops.append_kv(kv.k, kv.v, kv.lens, kb, vb)
            start = kv.lens.clone()
            kv.lens += self.block
            self.sel.on_append(layer, kv, start, self.block)

    def of(self, **match):
        return [r for r in self.records if all(r[k] == v for k, v in match.items())]


def rec_inputs(r):
    kv = r["kv"]
    return AttentionInputs(r["q"], kv.k, kv.v, kv.lens, r["kb"], r["vb"])


def ref_out(r, sel):
    """fp64 reference output of a record, over the selection (or the whole cache if None)."""
    idx, cnt = (None, None) if sel is None else (sel.indices, sel.counts)
    return reference_attention(rec_inputs(r), idx, cnt, r["kv"].k.shape[-1] ** -0.5)


def assert_out(r, sel=None):
    out, _, _ = ref_out(r, sel if sel is not None else r["sel"])
    assert torch.allclose(r["out"].double(), out, atol=2e-5, rtol=1e-4), \
        f"layer {r['layer']} step {r['step']}: output differs from the reference"


def selected(sel, b, h):
    return sel.indices[b, h, : int(sel.counts[b, h])].tolist()


def assert_top_set(chosen, scores, keep, what):
    """chosen is a top-`keep` set of `scores` (ties within 1e-9 may go either way)."""
    n = len(scores)
    assert len(chosen) == min(keep, n), f"{what}: {len(chosen)} chosen, expected {min(keep, n)}"
    rest = sorted(set(range(n)) - set(chosen))
    if chosen and rest:
        assert scores[chosen].min() >= scores[rest].max() - 1e-9, f"{what}: not a top-{keep} set"


def expand(pages, size, n):
    return [t for p in sorted(pages) for t in range(p * size, min((p + 1) * size, n))]


# ----------------------------------------------------------------------------------------------
# Quest


def ref_page_bounds(keys, n, size):
    """Elementwise min / max of keys[:, :n] per page, recomputed from scratch."""
    pages = math.ceil(n / size)
    lo = torch.stack([keys[:, p * size:min((p + 1) * size, n)].amin(1) for p in range(pages)], 1)
    hi = torch.stack([keys[:, p * size:min((p + 1) * size, n)].amax(1) for p in range(pages)], 1)
    return lo, hi


def ref_quest_score(q_rows, lo, hi):
    """sum over the group's query rows of sum_c max(q_c * min_c, q_c * max_c), written plainly."""
    return sum(torch.maximum(row * lo, row * hi).sum() for row in q_rows.double())


def quest_cfg(**kw):
    base = dict(method="quest", k=8, dense_layers=1, quest_page_size=4, quest_min_pages=2)
    return PolicyConfig(**{**base, **kw})


def test_quest_page_bounds_are_incremental_and_exact(gen):
    size, lens = 4, [3, 13, 9]
    sel = QuestSelector(quest_cfg(quest_page_size=size))
    loop = FakeLoop(sel, n_layers=2, lens=lens, capacity=40, gen=gen, block=5)
    for _ in range(3):  # appends of 5 fill partial pages across blocks
        loop.run_block(steps=2)
    for layer, kv in enumerate(loop.kv):
        lo, hi, covered = sel.page_bounds(layer)
        assert covered.tolist() == kv.lens.tolist()
        for b, n in enumerate(kv.lens.tolist()):
            rlo, rhi = ref_page_bounds(kv.k[b], n, size)
            pages = rlo.shape[1]
            assert torch.equal(lo[b, :, :pages], rlo) and torch.equal(hi[b, :, :pages], rhi)
            assert torch.isinf(lo[b, :, pages:]).all()


def test_quest_catches_up_unreported_entries_and_rewrites(gen):
    size = 4
    sel = QuestSelector(quest_cfg(quest_page_size=size))
    loop = FakeLoop(sel, n_layers=2, lens=[10, 6], capacity=30, gen=gen, report_prefill=False)
    loop.forward(0, "denoise")  # attend folds the unreported prefill
    kv = loop.kv[1]
    kv.k[0, :, 8:10] = torch.randn(2, 2, 12, generator=gen)  # rewrite inside the last page
    sel.on_append(1, kv, torch.tensor([8, 6]), 2)
    kv.lens.copy_(torch.tensor([10, 8], dtype=torch.int32))
    lo, hi, covered = sel.page_bounds(1)
    assert covered.tolist() == [10, 8]
    for b, n in enumerate([10, 8]):
        rlo, rhi = ref_page_bounds(kv.k[b], n, size)
        assert torch.equal(lo[b, :, :rlo.shape[1]], rlo) and torch.equal(hi[b, :, :rlo.shape[1]], rhi)
    # lens below what was folded (scratch rows of a batched prefill): pages are rebuilt
    kv.lens.copy_(torch.tensor([5, 8], dtype=torch.int32))
    sel.attend(StepContext(1, 2, 0, "denoise", 0.3), torch.randn(2, 6, 5, 12),
               torch.randn(2, 2, 5, 12), torch.randn(2, 2, 5, 12), kv)
    lo, hi, covered = sel.page_bounds(1)
    assert covered.tolist() == [5, 8]
    for b, n in enumerate([5, 8]):
        rlo, rhi = ref_page_bounds(kv.k[b], n, size)
        assert torch.equal(lo[b, :, :rlo.shape[1]], rlo) and torch.equal(hi[b, :, :rlo.shape[1]], rhi)
        assert torch.isinf(lo[b, :, rlo.shape[1]:]).all()


@pytest.mark.parametrize("k,min_pages", [(8, 2), (4, 3), (13, 1)])
def test_quest_scores_pages_and_output_match_reference(k, min_pages, gen):
    size, hq, hkv = 4, 6, 2
    cfg = quest_cfg(k=k, quest_page_size=size, quest_min_pages=min_pages)
    sel = QuestSelector(cfg)
    loop = FakeLoop(sel, n_layers=3, lens=[21, 7, 16], capacity=45, gen=gen, hq=hq, hkv=hkv)
    loop.run_block(steps=2)
    loop.run_block(steps=1)
    keep = max(min_pages, k // size)
    group = hq // hkv
    sparse_records = [r for r in loop.records if r["layer"] >= 1 and r["phase"] == "denoise"]
    assert len(sparse_records) == 2 * 3  # every step of every non-dense layer selects
    for r in sparse_records:
        s = r["sel"]
        for b, n in enumerate(r["kv"].lens.tolist()):
            for h in range(hkv):
                rlo, rhi = ref_page_bounds(r["kv"].k[b, h:h + 1], n, size)
                rows = r["q"][b, h * group:(h + 1) * group].reshape(-1, r["q"].shape[-1])
                ref = torch.stack([ref_quest_score(rows, rlo[0, p], rhi[0, p])
                                   for p in range(rlo.shape[1])])
                got = quest_page_scores(r["q"][b:b + 1], rlo[None].expand(1, hkv, -1, -1),
                                        rhi[None].expand(1, hkv, -1, -1))[0, h]
                assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4)
                chosen = sorted({i // size for i in selected(s, b, h)})
                assert_top_set(chosen, ref, keep, f"pages b={b} h={h}")
                assert selected(s, b, h) == expand(chosen, size, n)
        assert_out(r)


def test_quest_dense_layers_and_commit_modes(gen):
    for mode in ("sparse", "exact"):
        loop = FakeLoop(make_selector(quest_cfg(dense_layers=2, commit_attention=mode)),
                        n_layers=3, lens=[30, 17], capacity=45, gen=gen)
        loop.run_block(steps=2)
        assert all(r["sel"] is None for r in loop.of(layer=0) + loop.of(layer=1))
        assert all(r["sel"] is not None for r in loop.of(layer=2, phase="denoise"))
        assert (loop.of(layer=2, phase="commit")[0]["sel"] is None) == (mode == "exact")
        for r in loop.records:
            assert_out(r)


def test_quest_keeps_sink_and_recent_pages(gen):
    size = 4
    sel = QuestSelector(quest_cfg(k=12, quest_page_size=size, n_sink=1, n_recent=3))
    loop = FakeLoop(sel, n_layers=2, lens=[30, 19], capacity=40, gen=gen)
    loop.forward(0, "denoise")
    s = loop.of(layer=1)[0]["sel"]
    for b, n in enumerate([30, 19]):
        for h in range(2):
            pages = {i // size for i in selected(s, b, h)}
            assert 0 in pages and {t // size for t in range(n - 3, n)} <= pages
            assert len(pages) == 3


# ----------------------------------------------------------------------------------------------
# Tidal


def test_tidal_selection_layers_feed_the_following_layers(gen):
    k = 7
    cfg = PolicyConfig(method="tidal", k=k, dense_layers=1, tidal_selection_layers=(2, 4))
    loop = FakeLoop(TidalSelector(cfg), n_layers=6, lens=[25, 9, 18], capacity=40, gen=gen)
    loop.run_block(steps=2)
    for step in range(2):
        recs = {r["layer"]: r for r in loop.of(step=step, phase="denoise")}
        for layer in (0, 1, 2, 4):  # dense, nothing to reuse yet, selection layers
            assert recs[layer]["sel"] is None
            assert_out(recs[layer])
        for src, users in ((2, (3,)), (4, (5,))):
            _, _, scores = ref_out(recs[src], None)
            s = recs[users[0]]["sel"]
            for b, n in enumerate(recs[src]["kv"].lens.tolist()):
                for h in range(2):
                    assert_top_set(selected(s, b, h), scores[b, h, :n], k, f"layer {src} b={b}")
            for layer in users:
                assert torch.equal(recs[layer]["sel"].indices, s.indices)
                assert_out(recs[layer])
    # selection is redone every step: different queries give different picks
    assert not all(torch.equal(a["sel"].indices, b["sel"].indices)
                   for a, b in zip(loop.of(step=0, layer=3), loop.of(step=1, layer=3)))


# ----------------------------------------------------------------------------------------------
# SparseD


def test_sparsed_full_steps_then_fixed_pattern(gen):
    size, k = 4, 9
    cfg = PolicyConfig(method="sparsed", k=k, dense_layers=1, sparsed_skip=0.4, sparsed_kv_block=size)
    sel = SparseDSelector(cfg)
    loop = FakeLoop(sel, n_layers=3, lens=[23, 10], capacity=45, gen=gen, steps_hint=5)
    assert sel.full_steps(StepContext(0, 3, 0, "denoise", 1.0, 5)) == 2
    patterns = []
    for _ in range(2):
        loop.run_block(steps=5)
        for layer in (1, 2):
            recs = loop.of(layer=layer)[-6:]
            assert recs[0]["sel"] is None and recs[1]["sel"] is None  # ceil(0.4 * 5) full steps
            _, _, scores = ref_out(recs[1], None)  # the pattern comes from the last full step
            pat = recs[2]["sel"]
            for b, n in enumerate(recs[1]["kv"].lens.tolist()):
                pooled = torch.stack([scores[b, :, i:i + size].sum(-1) for i in range(0, n, size)], -1)
                for h in range(2):
                    chosen = sorted({i // size for i in selected(pat, b, h)})
                    assert_top_set(chosen, pooled[h], k // size, f"blocks b={b} h={h}")
                    assert selected(pat, b, h) == expand(chosen, size, n)
            for r in recs[2:]:  # steps 2..4 and the commit forward reuse it unchanged
                assert r["sel"] is pat
                assert_out(r)
            patterns.append(pat.indices)
    assert not torch.equal(patterns[0], patterns[2])  # a new block recomputes the pattern


def test_sparsed_uses_config_steps_without_hint_and_short_blocks(gen):
    cfg = PolicyConfig(method="sparsed", k=8, dense_layers=0, sparsed_skip=0.0, sparsed_steps=3,
                       sparsed_kv_block=4)
    loop = FakeLoop(SparseDSelector(cfg), n_layers=1, lens=[12], capacity=30, gen=gen)
    loop.run_block(steps=3)  # skip 0 still needs one full step to find the pattern
    assert [r["sel"] is None for r in loop.records] == [True, False, False, False]
    cfg = cfg.replace(sparsed_skip=1.0)
    loop = FakeLoop(SparseDSelector(cfg), n_layers=1, lens=[12], capacity=30, gen=gen)
    loop.run_block(steps=2)  # the block finished within its full steps: commit is dense
    assert all(r["sel"] is None for r in loop.records)


# ----------------------------------------------------------------------------------------------
# All three


@pytest.mark.parametrize("method", ["quest", "tidal", "sparsed", "random", "recent"])
def test_budget_covering_the_cache_gives_the_exact_output(method, gen):  # + MAGE's controls
    cfg = PolicyConfig(method=method, k=64, dense_layers=1, tidal_selection_layers=(1,),
                       quest_page_size=4, sparsed_kv_block=8, sparsed_steps=3)
    loop = FakeLoop(make_selector(cfg), n_layers=3, lens=[37, 5, 20], capacity=64, gen=gen)
    loop.run_block(steps=3)
    assert any(r["sel"] is not None for r in loop.records)
    for r in loop.records:
        dense, _ = ops.dense_attention(r["q"], r["kv"].k, r["kv"].v, r["kv"].lens, r["kb"], r["vb"],
                                       r["kv"].k.shape[-1] ** -0.5)
        assert torch.allclose(r["out"], dense, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls,method", [(QuestSelector, "quest"), (TidalSelector, "tidal"),
                                        (SparseDSelector, "sparsed")])
def test_selectors_reject_wrong_configs(cls, method):
    with pytest.raises(TypeError, match="config"):
        cls({"method": method})
    with pytest.raises(ValueError, match="config.method"):
        cls(PolicyConfig(method="mage"))
    assert type(make_selector(PolicyConfig(method=method))) is cls


def test_quest_on_append_rejects_bad_arguments():
    sel = QuestSelector(quest_cfg())
    kv = LayerKV(torch.zeros(2, 1, 8, 4), torch.zeros(2, 1, 8, 4), torch.zeros(2, dtype=torch.int32))
    sel.reset(2, 1)
    with pytest.raises(ValueError, match="start"):
        sel.on_append(0, kv, torch.zeros(3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="length"):
        sel.on_append(0, kv, torch.zeros(2, dtype=torch.int64), -1)
    with pytest.raises(ValueError, match="capacity"):
        sel.on_append(0, kv, torch.tensor([4, 0]), 5)
    with pytest.raises(ValueError, match="q:"):
        quest_page_scores(torch.zeros(2, 3, 5, 4), torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))


def test_sparsed_pooling_sums_each_kv_block_partial_last_included():
    from mage_ext.core.selectors.sparsed import pooled_block_scores
    scores = torch.arange(10, dtype=torch.float32).view(1, 1, 10)
    assert pooled_block_scores(scores, 4).tolist() == [[[6.0, 22.0, 17.0]]]
