"""WindowSelector: the block reads only the last ``window`` cache entries (plus itself).

With ``dense_layers=0`` and ``window`` = one block this is the evaluation's control: if a task
can still be solved when the answer block sees nothing but itself and the last prompt block, the
answer did not depend on the cache and the task proves nothing about sparse attention.
"""
from __future__ import annotations

import torch

from .base import LayerKV, Selection, Selector, StepContext, dense, sparse


def last_window(lens: torch.Tensor, n_kv_heads: int, window: int) -> Selection:
    """Indices of the last min(window, lens[b]) cache positions, ascending, -1 padded."""
    lens = lens.long()
    pos = torch.arange(window, device=lens.device)
    counts = torch.clamp(lens, max=window)
    idx = (lens - counts)[:, None] + pos[None, :]
    idx = torch.where(pos[None, :] < counts[:, None], idx, torch.full_like(idx, -1))
    b = lens.shape[0]
    return Selection(idx[:, None, :].expand(b, n_kv_heads, window).to(torch.int32).contiguous(),
                     counts[:, None].expand(b, n_kv_heads).to(torch.int32).contiguous())


class WindowSelector(Selector):
    name = "window"

    def __init__(self, config):
        self.window = int(config.window)

    def attend(self, ctx: StepContext, q, k_block, v_block, kv: LayerKV):
        if self.config.is_dense_layer(ctx.layer):
            return dense(ctx, q, k_block, v_block, kv)
        sel = last_window(kv.lens, kv.k.shape[1], self.window)
        return sparse(ctx, q, k_block, v_block, kv, sel)
