"""The block-diffusion training objective (spec section 5) in a layout that scales to long contexts.

Sequence layout fed to the model, for a batch whose sequences have n_blocks blocks of size B:
    [ x_t copy of block b for each entry b of xt_blocks | x_0 blocks 0 .. max(xt_blocks) - 1 ]
Every x_t entry keeps its original RoPE positions (b*B .. b*B + B-1); x_0 uses 0 .. len-1.
Attention (True = may attend), for query i and key j:
    x_t -> x_t : same entry only (bidirectional within the noisy block)
    x_t -> x_0 : block(j) < block(i) (strictly earlier blocks; `window` w keeps only the last w)
    x_0 -> x_0 : block(j) <= block(i) (block-causal)
    x_0 -> x_t : never
Why entries rather than "all blocks": an x_t block depends only on itself and earlier clean blocks,
so giving x_t copies to a subset of blocks is the exact objective restricted to those blocks. Short
sequences give every block two entries (the mask and its complement, sharing one x_0), long ones only
the last few blocks -- the layout is ~L tokens instead of 2L, so SDPA's O(L^2) mask fits 16K.
Token shift: position p's logits come from the hidden state of p-1: the same entry's previous slot, or,
at a block start, x_0's position p-1 -- the clean state that the commit forward gives at inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mage_ext.train import TrainLayout
from mage_ext.train.objective import (  # noqa: F401 (MASK_EPS, noise: re-exported)
    MASK_EPS, noise, shift_sources, upcast_logits)

ATTENTIONS = ("sdpa", "mage")


def layout(xt_blocks: list[int], block_size: int, n_x0: int | None = None):
    """Per layout position: entry id (-1 for x_0), block index, RoPE position. n_x0 defaults to the
    x_0 prefix the x_t entries need."""
    if not xt_blocks:
        raise ValueError("xt_blocks must name at least one block")
    if min(xt_blocks) < 0:
        raise ValueError(f"xt_blocks must be >= 0, got {xt_blocks}")
    if n_x0 is None:
        n_x0 = max(xt_blocks) * block_size
    if n_x0 % block_size:
        raise ValueError(f"n_x0 must be a multiple of block_size={block_size}, got {n_x0}")
    ar = torch.arange(block_size)
    entry = torch.cat([torch.full((block_size,), e) for e in range(len(xt_blocks))]
                      + [torch.full((n_x0,), -1)])
    pos = torch.cat([b * block_size + ar for b in xt_blocks] + [torch.arange(n_x0)])
    return entry, pos // block_size, pos


def attention_mask(xt_blocks: list[int], block_size: int, n_x0: int | None = None,
                   window: int | None = None, device=None) -> torch.Tensor:
    """Boolean (Lq, Lq) mask of the layout above; True where attention is allowed."""
    entry, blk, _ = layout(xt_blocks, block_size, n_x0)
    entry, blk = entry.to(device), blk.to(device)
    xt = entry >= 0
    xi, xj = xt[:, None], xt[None, :]
    bi, bj = blk[:, None], blk[None, :]
    earlier = bj < bi
    if window is not None:
        earlier &= bj >= bi - window
    return ((xi & xj & (entry[:, None] == entry[None, :]))
            | (xi & ~xj & earlier)
            | (~xi & ~xj & (bj <= bi)))


_MASKS: dict = {}


def cached_mask(xt_blocks, block_size, n_x0, device, window=None) -> torch.Tensor:
    """attention_mask built on the device once per layout (a 16K mask takes seconds on a CPU)."""
    key = (tuple(xt_blocks), block_size, n_x0, window, str(device))
    if key not in _MASKS:
        if len(_MASKS) >= 4:                     # a phase uses a few lengths; keep memory bounded
            _MASKS.pop(next(iter(_MASKS)))
        _MASKS[key] = attention_mask(xt_blocks, block_size, n_x0, window, device)
    return _MASKS[key]


def hidden_states(model, input_ids, mask, positions):
    """Final hidden states of a stock HF causal LM under an explicit boolean 4D mask."""
    out = model.model(input_ids=input_ids, attention_mask=mask[None, None],
                      position_ids=positions[None].expand(input_ids.shape[0], -1), use_cache=False)
    return out.last_hidden_state


def mage_hidden_states(model, xt, x0, xt_blocks, block_size):
    """The same hidden states through the MAGE ops (mage_ext.train.TrainLayout): no L x L mask.
    xt [N, 2 n_xt] holds both copies; xt_blocks must be consecutive blocks."""
    b0 = xt_blocks[0]
    if list(xt_blocks) != list(range(b0, b0 + len(xt_blocks))):
        raise ValueError(f"attention='mage' needs consecutive xt_blocks, got {xt_blocks}")
    n_xt = len(xt_blocks) * block_size
    lay = TrainLayout(block_size, n_xt, x0.shape[1], start_block=b0)
    return lay.hidden_states(model, [xt[:, :n_xt], xt[:, n_xt:]], x0, ["exact", "exact"])


def loss(model, tokens, weight, force_mask, keep, xt_blocks, block_size, mask_id, gen=None,
         attention: str = "sdpa"):
    """Weighted CE over masked x_t slots of both copies; returns (loss, stats dict).
    attention: "sdpa" (stock SDPA with the dense mask: the reference) or "mage" (the ops)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    device = next(model.parameters()).device
    xt, masked, idx = noise(tokens, force_mask, keep, xt_blocks, block_size, mask_id, gen)
    entries = list(xt_blocks) + list(xt_blocks)
    n_x0 = max(entries) * block_size
    src = shift_sources(entries, block_size)
    w = weight[:, idx] * masked * (src >= 0)
    if attention == "mage":
        h = mage_hidden_states(model, xt.to(device), tokens[:, :n_x0].to(device), xt_blocks,
                               block_size)
    else:
        ids = torch.cat([xt, tokens[:, :n_x0]], dim=1).to(device)
        mask = cached_mask(entries, block_size, n_x0, device)
        _, _, pos = layout(entries, block_size, n_x0)
        h = hidden_states(model, ids, mask, pos.to(device))
    sel = w > 0
    rows, cols = sel.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return h.sum() * 0.0, {"tokens": 0}
    logits = upcast_logits(model.lm_head(h[rows.to(device), src[cols].to(device)]))
    target = tokens[:, idx][rows, cols].to(device)
    ce = F.cross_entropy(logits, target, reduction="none")
    wsel = w[rows, cols].to(device)
    value = (ce * wsel).sum() / wsel.sum()
    stats = {"tokens": int(rows.numel())}
    forced = force_mask[:, idx][rows, cols].to(device)        # the answers: loss and accuracy apart
    if forced.any():
        with torch.no_grad():
            stats["answer_ce"] = float(ce[forced].mean())
            stats["answer_acc"] = float((logits[forced].argmax(-1) == target[forced]).float().mean())
    return value, stats
