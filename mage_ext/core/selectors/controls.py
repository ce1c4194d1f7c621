"""Matched controls for MAGE: MAGE's schedule and budget with a selection that ignores the scores.

  random   k cache entries per (sequence, layer, KV head) drawn uniformly, a fresh draw per block
           (seeded by ``PolicyConfig.selection_seed``, the block, the layer and the head)
  recent   the last k cache entries (with n_sink = 0 this is ``window.last_window(lens, Hkv, k)``)

Everything else is MAGE's (mage.py): the first ``dense_layers`` layers read the whole cache; a
block's first (all-[MASK]) step reads the whole cache, and the selection is made there and reused
unchanged by the block's later steps and, unless ``commit_attention`` is exact, its commit
forward; n_sink / n_recent positions are kept and count towards k (``ops.topk_select`` does the
choosing, so the indices come ascending, unique, -1 padded, counts = min(k, length)). A MAGE row
and its control therefore read the same entries count at the same steps and differ only in which
entries: the top-k of the first step's scores, or a random / recent set.

The ``window`` method is the older control: no first-step exception (every step reads only the
last ``window`` entries), meant with dense_layers = 0 to show that a task needs the cache at all.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import ops
from .base import LayerKV, Selection, Selector, StepContext, dense, sparse
from .common import check_config, reads_whole_cache

_M32 = 0xFFFFFFFF


def hash_scores(seed: int, block: int, layer: int, n_kv_heads: int, capacity: int,
                device) -> Tensor:
    """Pseudo-random scores in [0, 1), float32 [Hkv, capacity], from an integer hash of (seed,
    block, layer, head, position): the same on every device and for every capacity (a position's
    score does not depend on how long the cache is), so a sequence's draw does not depend on its
    batch mates."""
    head = torch.arange(n_kv_heads, device=device, dtype=torch.int64).view(-1, 1)
    x = torch.arange(capacity, device=device, dtype=torch.int64).view(1, -1)
    for part in (seed, block, layer, head):  # fold each part in, then mix (32-bit integer hash)
        x = (x ^ (part & _M32)) * 0x45D9F3B & _M32
        x = (x ^ (x >> 16)) * 0x45D9F3B & _M32
        x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 bits: exact in float32


def recency_scores(n_kv_heads: int, capacity: int, device) -> Tensor:
    """Scores that rank later positions higher: float32 [Hkv, capacity]."""
    return torch.arange(capacity, device=device, dtype=torch.float32).expand(n_kv_heads, capacity)


class _FirstStepSelection(Selector):
    """MAGE's schedule with the selection rule left to ``scores``."""

    def __init__(self, config):
        check_config(config, self.name)
        self.config = config
        self.block = -1
        self.selections: list = []

    def reset(self, batch: int, n_layers: int) -> None:
        super().reset(batch, n_layers)
        self.block = -1
        self.selections = [None] * n_layers

    def begin_block(self) -> None:
        self.block += 1
        self.selections = [None] * self.n_layers

    def scores(self, ctx: StepContext, kv: LayerKV) -> Tensor:
        """float32 [Hkv, capacity]: the selection keeps the k best valid positions."""
        raise NotImplementedError

    def select(self, ctx: StepContext, kv: LayerKV) -> Selection:
        """This block's selection of layer ``ctx.layer`` (for tests and inspection too)."""
        batch, hkv, capacity, _ = kv.k.shape
        k = max(1, min(self.config.budget(ctx.layer, ctx.n_layers), capacity))
        sink = min(self.config.n_sink, k)
        recent = min(self.config.n_recent, k - sink)
        scores = self.scores(ctx, kv).expand(batch, hkv, capacity).contiguous()
        return Selection(*ops.topk_select(scores, kv.lens, k, sink, recent))

    def attend(self, ctx: StepContext, q: Tensor, k_block: Tensor, v_block: Tensor,
               kv: LayerKV) -> tuple[Tensor, Optional[Selection]]:
        if reads_whole_cache(self.config, ctx):
            return dense(ctx, q, k_block, v_block, kv)
        if ctx.phase == "denoise" and ctx.step == 0:
            self.selections[ctx.layer] = self.select(ctx, kv)
            return dense(ctx, q, k_block, v_block, kv)
        sel = self.selections[ctx.layer]
        if sel is None:
            raise RuntimeError(f"{type(self).__name__}: layer {ctx.layer} has no selection for "
                               f"step {ctx.step} ({ctx.phase}); step 0 of the block must run first")
        return sparse(ctx, q, k_block, v_block, kv, sel)


class RandomSelector(_FirstStepSelection):
    name = "random"

    def scores(self, ctx: StepContext, kv: LayerKV) -> Tensor:
        return hash_scores(self.config.selection_seed, self.block, ctx.layer, kv.k.shape[1],
                           kv.k.shape[2], kv.k.device)


class RecentSelector(_FirstStepSelection):
    name = "recent"

    def scores(self, ctx: StepContext, kv: LayerKV) -> Tensor:
        return recency_scores(kv.k.shape[1], kv.k.shape[2], kv.k.device)
