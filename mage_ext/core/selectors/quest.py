"""Quest (arXiv 2406.10774) adapted to block diffusion: query-aware page selection every step.

Per layer, the cache is cut into pages of ``quest_page_size`` tokens; each page keeps the
elementwise min and max of its keys per KV head, folded in incrementally as entries are written
(a partial last page keeps filling across appends). A query q bounds its dot product with any key
of a page by ``sum_c max(q_c * min_c, q_c * max_c)``.

Block adaptation (per-block constraint: one page set per KV head for all B queries and the G
query heads of the group): the page score is the SUM of that bound over the G*B queries of the
group. Because ``max(q*lo, q*hi) = relu(q)*hi - relu(-q)*(-lo)`` is linear in the positive and
negative parts of q, the sum equals ``sum_c (P_c * max_c + N_c * min_c)`` with P = sum of
positive parts and N = sum of negative parts of the queries: one dot product per page. The sum
(rather than the max over queries) ranks pages by the bound the group as a whole puts on them.

The top ``max(quest_min_pages, k // quest_page_size)`` pages are read at EVERY step (Quest has no
all-[MASK] pass), step 0 included; the first ``dense_layers`` layers stay dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import LayerKV, Selector, StepContext, dense, sparse
from .common import check_config, n_pages, reads_whole_cache, top_pages


def quest_page_scores(q: Tensor, page_min: Tensor, page_max: Tensor) -> Tensor:
    """Block-aggregated Quest scores [batch, Hkv, pages] (fp32) of q [batch, Hq, B, d].

    page_min / page_max [batch, Hkv, pages, d]; the query heads of KV head h are
    h*G .. h*G+G-1 (the usual GQA grouping).
    """
    hkv = page_min.shape[1]
    if q.dim() != 4 or q.shape[1] % hkv or q.shape[3] != page_min.shape[3]:
        raise ValueError(f"q: expected [batch, Hq, B, d] with Hq a multiple of Hkv={hkv} and "
                         f"d={page_min.shape[3]}, got {tuple(q.shape)}")
    batch, hq, block, dim = q.shape
    qf = q.float().reshape(batch, hkv, (hq // hkv) * block, dim)
    pos, neg = qf.clamp(min=0).sum(2), qf.clamp(max=0).sum(2)  # [batch, Hkv, d]
    return (torch.einsum("bhd,bhpd->bhp", pos, page_max.float())
            + torch.einsum("bhd,bhpd->bhp", neg, page_min.float()))


@dataclass
class _PageStats:
    lo: Tensor       # [batch, Hkv, pages, d] fp32 elementwise min (+inf where no key yet)
    hi: Tensor       # [batch, Hkv, pages, d] fp32 elementwise max (-inf where no key yet)
    covered: Tensor  # int64 [batch]: cache entries [0, covered) are folded in


class QuestSelector(Selector):
    name = "quest"

    def __init__(self, config):
        check_config(config, "quest")
        self.config = config
        self.page = config.quest_page_size
        self._stats: dict[int, _PageStats] = {}

    def reset(self, batch: int, n_layers: int) -> None:
        super().reset(batch, n_layers)
        self._stats = {}

    def page_bounds(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(min, max, covered) of ``layer`` as kept so far (for inspection and tests)."""
        if layer not in self._stats:
            raise KeyError(f"layer: no cache entries of layer {layer} have been seen yet")
        st = self._stats[layer]
        return st.lo, st.hi, st.covered

    def on_append(self, layer: int, kv: LayerKV, start: Tensor, length: int) -> None:
        if not isinstance(start, Tensor) or start.dim() != 1 or start.shape[0] != kv.k.shape[0]:
            raise ValueError(f"start: expected an integer tensor [batch={kv.k.shape[0]}], got "
                             f"{getattr(start, 'shape', type(start).__name__)}")
        if int(length) < 0:
            raise ValueError(f"length: expected >= 0, got {length}")
        start = start.to(device=kv.k.device, dtype=torch.int64)
        self._fold(layer, kv, start, start + int(length))

    def attend(self, ctx: StepContext, q: Tensor, k_block: Tensor, v_block: Tensor, kv: LayerKV):
        if reads_whole_cache(self.config, ctx):
            return dense(ctx, q, k_block, v_block, kv)
        st = self._catch_up(ctx.layer, kv)
        budget = self.config.budget(ctx.layer, ctx.n_layers)
        keep = max(self.config.quest_min_pages, budget // self.page)
        scores = quest_page_scores(q, st.lo, st.hi)
        # Pages with no key yet hold +-inf bounds (NaN scores); they lie past lens and are
        # ignored by the top-k, zeroed here so no NaN reaches the kernel.
        unseen = torch.arange(scores.shape[-1], device=scores.device) >= \
            n_pages(kv.lens, self.page).to(scores.device).view(-1, 1, 1)
        scores = scores.masked_fill(unseen, 0.0)
        sel = top_pages(scores, kv.lens, self.page, keep, self.config.n_sink,
                        self.config.n_recent)
        return sparse(ctx, q, k_block, v_block, kv, sel)

    # -- page statistics -----------------------------------------------------------------------

    def _state(self, layer: int, kv: LayerKV) -> _PageStats:
        batch, hkv, capacity, dim = kv.k.shape
        pages = math.ceil(capacity / self.page)
        st = self._stats.get(layer)
        if st is None:
            full = (batch, hkv, pages, dim)
            st = _PageStats(torch.full(full, math.inf, device=kv.k.device),
                            torch.full(full, -math.inf, device=kv.k.device),
                            torch.zeros(batch, dtype=torch.int64, device=kv.k.device))
            self._stats[layer] = st
        elif st.lo.shape[:2] != (batch, hkv) or st.lo.shape[3] != dim:
            raise ValueError(f"kv: layer {layer} cache is [batch, Hkv, *, d] = "
                             f"{tuple(kv.k.shape)} but earlier appends saw "
                             f"{tuple(st.lo.shape)}; call reset() for a new generation")
        elif st.lo.shape[2] < pages:  # the cache grew: new pages start empty
            extra = (batch, hkv, pages - st.lo.shape[2], dim)
            st.lo = torch.cat([st.lo, torch.full(extra, math.inf, device=st.lo.device)], 2)
            st.hi = torch.cat([st.hi, torch.full(extra, -math.inf, device=st.hi.device)], 2)
        return st

    def _catch_up(self, layer: int, kv: LayerKV) -> _PageStats:
        """Folds entries written without an on_append call (e.g. a reused prefill) and drops
        entries folded past a sequence's length (scratch rows of a batched prefill chunk)."""
        st = self._state(layer, kv)
        lens = kv.lens.to(device=st.covered.device, dtype=torch.int64)
        past = lens < st.covered
        if bool(past.any()):  # min/max cannot be undone: rebuild from the page holding lens on
            first = torch.where(past, lens // self.page, torch.full_like(lens, st.lo.shape[2]))
            wipe = (torch.arange(st.lo.shape[2], device=lens.device) >= first[:, None])[:, None, :, None]
            st.lo.masked_fill_(wipe, math.inf)
            st.hi.masked_fill_(wipe, -math.inf)
            st.covered = torch.where(past, first * self.page, st.covered)
        if bool((lens > st.covered).any()):
            self._fold(layer, kv, st.covered.clone(), lens)
        return st

    def _fold(self, layer: int, kv: LayerKV, lo: Tensor, hi: Tensor) -> None:
        """Folds the keys at [lo[b], hi[b]) of each sequence into the page min / max."""
        st = self._state(layer, kv)
        capacity = kv.k.shape[2]
        if bool((hi > capacity).any()):
            raise ValueError(f"start + length: entries up to {int(hi.max())} exceed the cache "
                             f"capacity {capacity}")
        active = hi > lo
        lo = torch.where(active, lo, st.covered)
        hi = torch.where(active, hi, st.covered)
        # Rewriting entries already folded: min/max cannot be undone, so every page from the
        # rewritten one on is rebuilt from the cache.
        rewrite = lo < st.covered
        if bool(rewrite.any()):
            first = torch.where(rewrite, lo // self.page, torch.full_like(lo, st.lo.shape[2]))
            wipe = (torch.arange(st.lo.shape[2], device=lo.device) >= first[:, None])[:, None, :, None]
            st.lo.masked_fill_(wipe, math.inf)
            st.hi.masked_fill_(wipe, -math.inf)
        else:
            first = torch.zeros_like(lo)
        # A gap between the folded entries and the write is read from the cache too.
        lo = torch.where(rewrite, first * self.page, st.covered)
        width = int((hi - lo).max())
        if width > 0:
            batch, hkv, _, dim = kv.k.shape
            pos = lo[:, None] + torch.arange(width, device=lo.device)
            ok = (pos < hi[:, None])[:, None, :, None]
            pos = pos.clamp(max=capacity - 1)
            keys = torch.gather(kv.k, 2, pos[:, None, :, None].expand(batch, hkv, width, dim)).float()
            page = (pos // self.page)[:, None, :, None].expand(batch, hkv, width, dim)
            st.lo.scatter_reduce_(2, page, keys.masked_fill(~ok, math.inf), "amin")
            st.hi.scatter_reduce_(2, page, keys.masked_fill(~ok, -math.inf), "amax")
        st.covered = hi.clone()
