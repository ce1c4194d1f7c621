"""TidalDecode (arXiv 2410.05076) adapted to block diffusion: selection layers feed later layers.

At every step (selection is not reused across steps):
  * layers < dense_layers read the whole cache;
  * a layer listed in ``tidal_selection_layers`` runs full attention with scores
    (``ops.attention_with_scores``; its output is the real output) and picks the top-k cache
    positions per KV head from the block/group-averaged scores (``ops.topk_select``, budget k of
    that layer, n_sink / n_recent honoured);
  * every other layer reads the positions chosen by the nearest selection layer before it.
Layers past dense_layers but before the first selection layer have nothing to reuse and read the
whole cache (TidalDecode's layers before its first selection layer are dense too).
The per-block constraint makes the selection one set per KV head for all B queries, G heads.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ... import ops
from .base import LayerKV, Selection, Selector, StepContext, dense, sparse
from .common import check_config, reads_whole_cache


class TidalSelector(Selector):
    name = "tidal"

    def __init__(self, config):
        check_config(config, "tidal")
        self.config = config
        self._current: Optional[Selection] = None  # the latest selection layer's choice, this step
        self._from_layer: Optional[int] = None

    def reset(self, batch: int, n_layers: int) -> None:
        super().reset(batch, n_layers)
        self._current = self._from_layer = None

    def begin_step(self, step: int) -> None:
        self._current = self._from_layer = None

    def attend(self, ctx: StepContext, q: Tensor, k_block: Tensor, v_block: Tensor, kv: LayerKV):
        if reads_whole_cache(self.config, ctx):
            return dense(ctx, q, k_block, v_block, kv)
        if ctx.layer in self.config.tidal_selection_layers:
            out, _, scores = ops.attention_with_scores(q, kv.k, kv.v, kv.lens, k_block, v_block,
                                                       ctx.scale)
            k = min(self.config.budget(ctx.layer, ctx.n_layers), kv.k.shape[2])
            sink = min(self.config.n_sink, k)
            indices, counts = ops.topk_select(scores, kv.lens, k, sink,
                                              min(self.config.n_recent, k - sink))
            self._current, self._from_layer = Selection(indices, counts), ctx.layer
            return out, None
        if self._current is None:
            return dense(ctx, q, k_block, v_block, kv)
        if self._from_layer >= ctx.layer:
            raise RuntimeError(f"ctx.layer: layer {ctx.layer} came after selection layer "
                               f"{self._from_layer} within one step; call begin_step() per forward")
        return sparse(ctx, q, k_block, v_block, kv, self._current)
