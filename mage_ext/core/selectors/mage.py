"""MAGE: the all-[MASK] first step of a block selects, later steps reuse (spec section 2).

Per non-dense layer and block:
  step 0 (denoise)  exact attention with scores (its output is the step's output), then top-k of
                    the importance scores per (sequence, KV head) -> the block's Selection
  steps >= 1        sparse attention over the Selection + the block's own keys
  commit forward    sparse (reuses the Selection) or exact, per ``PolicyConfig.commit_attention``
With ``adaptive`` the top-k of every layer waits for ``end_step(0)``: budgets are redistributed
across layers from each layer's step-0 dispersion (spec 2.7, ``policy.adaptive_budgets``).

Usage (the generation loop does this through ``MageCache``)::

    sel = make_selector(PolicyConfig(method="mage", k=512))
    sel.reset(batch, n_layers); sel.begin_block(); sel.begin_step(0)
    out, selection = sel.attend(ctx, q, k_block, v_block, layer_kv)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import ops
from ..policy import adaptive_budgets, dispersion_score
from .base import LayerKV, Selection, Selector, StepContext, dense, sparse
from .common import reads_whole_cache

_CHUNK = 4096  # cache entries per chunk of the plain-torch adaptive statistics


class MageSelector(Selector):
    name = "mage"

    def __init__(self, config):
        self.config = config
        self.batch, self.n_layers = 0, 0
        self.selections: list = []
        self._pending: dict = {}
        self._buffers: dict = {}  # per layer: the Selection tensors every block is copied into

    def reset(self, batch: int, n_layers: int) -> None:
        super().reset(batch, n_layers)
        self.selections = [None] * n_layers
        self._pending = {}
        self._buffers = {}

    def _keep(self, layer: int, sel: Selection) -> None:
        """Stores a block's selection in the layer's fixed tensors (same shape every block with a
        fixed budget), so a CUDA graph of the later steps captured once stays valid."""
        buf = self._buffers.get(layer)
        if buf is not None and buf.indices.shape == sel.indices.shape:
            buf.indices.copy_(sel.indices)
            buf.counts.copy_(sel.counts)
            sel = buf
        else:
            self._buffers[layer] = sel
        self.selections[layer] = sel

    def begin_block(self) -> None:
        self.selections = [None] * self.n_layers
        self._pending = {}

    def replayed(self, kind: str) -> None:
        # A replayed first forward wrote this block's selections into the fixed buffers (the
        # copies _keep captured). Without this, a later step that runs Python (its graph's
        # warm-up or capture, when an earlier block ended after its first step) found none.
        if kind == "first":
            self.selections = [self._buffers.get(layer) for layer in range(self.n_layers)]

    def attend(self, ctx: StepContext, q: Tensor, k_block: Tensor, v_block: Tensor,
               kv: LayerKV) -> tuple[Tensor, Optional[Selection]]:
        cfg = self.config
        if reads_whole_cache(cfg, ctx):
            return dense(ctx, q, k_block, v_block, kv)
        if ctx.phase == "denoise" and ctx.step == 0:
            out, lse, scores = ops.attention_with_scores(q, kv.k, kv.v, kv.lens, k_block, v_block,
                                                         ctx.scale)
            budget = cfg.budget(ctx.layer, ctx.n_layers)
            if cfg.adaptive:
                sizes, cover = _dispersion_stats(q, kv, k_block, lse, ctx.scale, budget)
                self._pending[ctx.layer] = (scores, kv.lens, sizes, cover)
            else:
                self._keep(ctx.layer, _select(scores, kv.lens, [budget] * kv.lens.numel(), cfg))
            return out, None
        sel = self.selections[ctx.layer]
        if sel is None:
            raise RuntimeError(f"MageSelector: layer {ctx.layer} has no selection for step "
                               f"{ctx.step} ({ctx.phase}); step 0 of the block must run first")
        return sparse(ctx, q, k_block, v_block, kv, sel)

    def end_step(self, step: int) -> None:
        if step != 0 or not self._pending:
            return
        layers = sorted(self._pending)
        mean_budget = self.config.budget(layers[0], self.n_layers)
        # Budgets are per sequence so a sequence's tokens do not depend on its batch mates.
        dispersion = [[dispersion_score(self._pending[l][2][b].tolist(),
                                        self._pending[l][3][b].tolist()) for l in layers]
                      for b in range(self.batch)]
        if self.tp is not None:  # a layer's score is the max over its heads, held by all ranks
            device = self._pending[layers[0]][0].device
            dispersion = self.tp.all_reduce(torch.tensor(dispersion, dtype=torch.float64,
                                                         device=device), "max").tolist()
        per_seq = [adaptive_budgets(s, mean_budget, self.config.k_min) for s in dispersion]
        for i, layer in enumerate(layers):
            scores, lens = self._pending[layer][0], self._pending[layer][1]
            self._keep(layer, _select(scores, lens, [ks[i] for ks in per_seq], self.config))
        self._pending = {}


def _select(scores: Tensor, lens: Tensor, budgets: list, cfg) -> Selection:
    """Top-k per (sequence, KV head) with one budget per sequence, clamped to the capacity."""
    capacity = scores.shape[-1]
    clamp = [max(1, min(int(k), capacity)) for k in budgets]
    if len(set(clamp)) == 1:
        return Selection(*_topk(scores, lens, clamp[0], cfg))
    width = max(clamp)
    indices = torch.full((*scores.shape[:2], width), -1, dtype=torch.int32, device=scores.device)
    counts = torch.zeros(scores.shape[:2], dtype=torch.int32, device=scores.device)
    for b, k in enumerate(clamp):
        idx, cnt = _topk(scores[b:b + 1], lens[b:b + 1], k, cfg)
        indices[b, :, :k], counts[b] = idx[0], cnt[0]
    return Selection(indices, counts)


def _topk(scores, lens, k, cfg):
    # n_sink + n_recent never exceed k (PolicyConfig checks) but may exceed a clamped k.
    sink = min(cfg.n_sink, k)
    recent = min(cfg.n_recent, k - sink)
    return ops.topk_select(scores, lens, k, sink, recent)


def _dispersion_stats(q: Tensor, kv: LayerKV, k_block: Tensor, lse: Tensor, scale: float,
                      local_k: int) -> tuple[Tensor, Tensor]:
    """|U_h| and p_h per (sequence, KV head) from the step-0 attention (spec 2.7), in plain torch.

    U_h is the union over the G*B query rows of head h of each row's top-``local_k`` cache
    entries; p_h is the share of the rows' softmax mass (normalised over cache + block, i.e. by
    ``lse``) that falls inside U_h. Computed chunk by chunk over the cache.
    """
    batch, hq, block, dim = q.shape
    hkv, capacity = kv.k.shape[1], kv.k.shape[2]
    rows = (hq // hkv) * block
    qf = q.float().reshape(batch, hkv, rows, dim)
    lse_f = lse.float().reshape(batch, hkv, rows, 1)
    local_k = max(1, min(local_k, capacity))
    pos = torch.arange(capacity, device=q.device)
    valid = pos.unsqueeze(0) < kv.lens.unsqueeze(1).long()          # [batch, capacity]

    def logits(c0, c1):
        lg = torch.einsum("bhrd,bhcd->bhrc", qf, kv.k[:, :, c0:c1].float()) * scale
        return lg.masked_fill(~valid[:, None, None, c0:c1], float("-inf"))

    top_v = torch.full((batch, hkv, rows, 0), float("-inf"), device=q.device)
    top_i = torch.zeros((batch, hkv, rows, 0), dtype=torch.long, device=q.device)
    for c0 in range(0, capacity, _CHUNK):
        c1 = min(capacity, c0 + _CHUNK)
        v = torch.cat([top_v, logits(c0, c1)], dim=-1)
        i = torch.cat([top_i, pos[c0:c1].expand(batch, hkv, rows, c1 - c0)], dim=-1)
        top_v, arg = v.topk(min(local_k, v.shape[-1]), dim=-1)
        top_i = i.gather(-1, arg)
    picked = top_v > float("-inf")                                    # rows shorter than local_k
    hits = torch.zeros((batch, hkv, capacity), dtype=torch.int32, device=q.device)
    hits.scatter_add_(-1, top_i.flatten(2), picked.flatten(2).int())
    union = (hits > 0) & valid[:, None, :]
    mass = torch.zeros((batch, hkv), device=q.device)
    for c0 in range(0, capacity, _CHUNK):
        c1 = min(capacity, c0 + _CHUNK)
        probs = torch.exp(logits(c0, c1) - lse_f)                     # exact softmax entries
        mass += (probs * union[:, :, None, c0:c1]).sum(dim=(-1, -2))
    return union.sum(-1), mass / rows
