"""Pieces the baseline selectors share: config checks and page-granular selection.

Quest pages and SparseD KV blocks are the same idea: score fixed-size runs of the cache, keep
the best runs, read every token in them. ``top_pages`` does that with ``ops.topk_select`` on the
page scores, so the choice of pages runs on the same kernel as MAGE's token top-k.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import ops
from ..policy import PolicyConfig
from .base import Selection, StepContext


def check_config(config, method: str) -> None:
    """Raises unless ``config`` is a PolicyConfig for ``method`` (selectors are built per method)."""
    if not isinstance(config, PolicyConfig):
        raise TypeError(f"config: expected a mage_ext.policy.PolicyConfig, got {type(config).__name__}")
    if config.method != method:
        raise ValueError(f"config.method: this selector implements '{method}', got '{config.method}'")


def reads_whole_cache(config, ctx: StepContext) -> bool:
    """Dense layers, and the commit forward when it is configured exact, read the whole cache."""
    return config.is_dense_layer(ctx.layer) or (ctx.phase == "commit"
                                                and config.commit_attention == "exact")


def n_pages(lens: Tensor, page: int) -> Tensor:
    """Pages (possibly partial at the end) covering each sequence's cache, int32 [batch]."""
    return torch.div(lens.to(torch.int64) + page - 1, page, rounding_mode="floor").to(torch.int32)


def top_pages(page_scores: Tensor, lens: Tensor, page: int, keep: int, n_sink: int = 0,
              n_recent: int = 0) -> Selection:
    """Token selection made of the ``keep`` best pages of ``page`` tokens per (sequence, KV head).

    page_scores [batch, Hkv, pages] (entries past a sequence's last page are ignored); lens int32
    [batch]. The pages holding the first n_sink and the last n_recent tokens are always kept
    (the most pages any sequence needs for that; they count towards ``keep``).
    Returns token indices ascending, clipped to lens, -1 padded.
    """
    total = int(page_scores.shape[-1])
    keep = max(1, min(keep, total))  # topk_select wants 1 <= k <= capacity
    last = n_pages(lens, page)
    sink_pages = min(-(-n_sink // page), keep)
    recent_pages = 0
    if n_recent > 0:  # pages holding the last n_recent tokens (the last page may be partial)
        first = torch.div((lens.long() - n_recent).clamp(min=0), page, rounding_mode="floor")
        recent_pages = min(int((last.long() - first).max()), keep - sink_pages)
    pages, _ = ops.topk_select(page_scores.float().contiguous(), last, keep, sink_pages,
                               recent_pages)
    # Pages come ascending and only a sequence's last page can be partial, so the valid tokens
    # of each row form a prefix: no compaction is needed.
    offs = torch.arange(page, device=pages.device, dtype=torch.int32)
    tokens = (pages.unsqueeze(-1) * page + offs).flatten(-2)
    valid = ((pages.unsqueeze(-1) >= 0).expand(*pages.shape, page).flatten(-2)
             & (tokens < lens.to(tokens.device).view(-1, 1, 1)))
    indices = torch.where(valid, tokens, torch.full_like(tokens, -1))
    return Selection(indices.contiguous(), valid.sum(-1, dtype=torch.int32))
