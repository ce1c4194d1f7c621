"""SparseD (arXiv 2509.24014) adapted to block diffusion: full early steps, then a fixed pattern.

Per block, with steps = ctx.steps_hint or ``sparsed_steps``: the first
``n_full = max(1, ceil(sparsed_skip * steps))`` steps read the whole cache (at least one, since
the pattern is computed from a full step). At the last full step each non-dense layer runs
``ops.attention_with_scores``; the importance of a cache block of ``sparsed_kv_block`` tokens is
the SUM of the block/group-averaged scores of its tokens (the mass it receives; a partial last
block is not inflated as a mean would). The top ``k // sparsed_kv_block`` blocks (at least one)
are kept, the same budget as the other methods rather than SparseD's ``select`` fraction, and
reused unchanged for the block's remaining steps and, unless commit_attention is exact, its
commit forward.

Adaptation: SparseD pools (query block, KV block) pairs per head; the per-block constraint here
means one pattern per KV head shared by the block's B queries and the G heads of the group, so
the query side is pooled over the whole block (which is what the scores already are).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import ops
from .base import LayerKV, Selection, Selector, StepContext, dense, sparse
from .common import check_config, reads_whole_cache, top_pages


def pooled_block_scores(scores: Tensor, kv_block: int) -> Tensor:
    """Sum of scores [batch, Hkv, capacity] over runs of kv_block tokens -> [batch, Hkv, blocks]."""
    batch, hkv, capacity = scores.shape
    blocks = math.ceil(capacity / kv_block)
    padded = torch.nn.functional.pad(scores.float(), (0, blocks * kv_block - capacity))
    return padded.view(batch, hkv, blocks, kv_block).sum(-1)


class SparseDSelector(Selector):
    name = "sparsed"

    def __init__(self, config):
        check_config(config, "sparsed")
        self.config = config
        self._patterns: dict[int, Selection] = {}

    def reset(self, batch: int, n_layers: int) -> None:
        super().reset(batch, n_layers)
        self._patterns = {}

    def begin_block(self) -> None:
        self._patterns = {}

    def full_steps(self, ctx: StepContext) -> int:
        """How many leading steps of a block read the whole cache."""
        steps = ctx.steps_hint if ctx.steps_hint is not None else self.config.sparsed_steps
        if steps <= 0:
            raise ValueError(f"ctx.steps_hint: expected a positive step count, got {steps}")
        return max(1, math.ceil(self.config.sparsed_skip * steps))

    def attend(self, ctx: StepContext, q: Tensor, k_block: Tensor, v_block: Tensor, kv: LayerKV):
        if reads_whole_cache(self.config, ctx):
            return dense(ctx, q, k_block, v_block, kv)
        pattern = self._patterns.get(ctx.layer)
        if ctx.phase == "commit":  # a block that finished within its full steps has no pattern
            return (sparse(ctx, q, k_block, v_block, kv, pattern) if pattern is not None
                    else dense(ctx, q, k_block, v_block, kv))
        n_full = self.full_steps(ctx)
        if ctx.step < n_full - 1:
            return dense(ctx, q, k_block, v_block, kv)
        if ctx.step == n_full - 1 or pattern is None:  # last full step (or a missed one)
            out, _, scores = ops.attention_with_scores(q, kv.k, kv.v, kv.lens, k_block, v_block,
                                                       ctx.scale)
            size = self.config.sparsed_kv_block
            keep = max(1, self.config.budget(ctx.layer, ctx.n_layers) // size)
            self._patterns[ctx.layer] = top_pages(pooled_block_scores(scores, size), kv.lens,
                                                  size, keep, self.config.n_sink,
                                                  self.config.n_recent)
            return out, None
        return sparse(ctx, q, k_block, v_block, kv, pattern)
