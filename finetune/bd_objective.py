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

MASK_EPS = 1e-3


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


def shift_sources(xt_blocks: list[int], block_size: int) -> torch.Tensor:
    """For each x_t slot, the layout index whose hidden state predicts it (-1: nothing, block 0 start)."""
    n_xt = len(xt_blocks) * block_size
    src = torch.empty(n_xt, dtype=torch.long)
    for e, b in enumerate(xt_blocks):
        base = e * block_size
        src[base + 1: base + block_size] = torch.arange(base, base + block_size - 1)
        src[base] = n_xt + b * block_size - 1 if b > 0 else -1
    return src


def noise(tokens: torch.Tensor, force_mask: torch.Tensor, keep: torch.Tensor, xt_blocks: list[int],
          block_size: int, mask_id: int, gen: torch.Generator | None = None):
    """x_t token ids for the entries (N, n_xt) and which of them are masked.

    `xt_blocks` is the list of distinct blocks; each gets two entries (mask m, then its complement),
    so the returned entry list is xt_blocks + xt_blocks. Per (sequence, block) t ~ U(0,1) and
    P(mask) = (1 - 1e-3) t + 1e-3; force_mask / keep override both copies."""
    n = tokens.shape[0]
    idx = torch.cat([b * block_size + torch.arange(block_size) for b in xt_blocks])
    tok, force, kp = tokens[:, idx], force_mask[:, idx], keep[:, idx]
    t = torch.rand(n, len(xt_blocks), 1, generator=gen).expand(-1, -1, block_size).reshape(n, -1)
    m = torch.rand(tok.shape, generator=gen) < (1 - MASK_EPS) * t + MASK_EPS
    masked = torch.cat([m, ~m], dim=1)
    masked = (masked | force.repeat(1, 2)) & ~kp.repeat(1, 2)
    xt = torch.where(masked, torch.full_like(tok.repeat(1, 2), mask_id), tok.repeat(1, 2))
    return xt, masked, idx.repeat(2)


def hidden_states(model, input_ids, mask, positions):
    """Final hidden states of a stock HF causal LM under an explicit boolean 4D mask."""
    out = model.model(input_ids=input_ids, attention_mask=mask[None, None],
                      position_ids=positions[None].expand(input_ids.shape[0], -1), use_cache=False)
    return out.last_hidden_state


def loss(model, tokens, weight, force_mask, keep, xt_blocks, block_size, mask_id, gen=None):
    """Weighted CE over masked x_t slots of both copies; returns (loss, stats dict)."""
    device = next(model.parameters()).device
    xt, masked, idx = noise(tokens, force_mask, keep, xt_blocks, block_size, mask_id, gen)
    entries = list(xt_blocks) + list(xt_blocks)
    n_x0 = max(entries) * block_size
    ids = torch.cat([xt, tokens[:, :n_x0]], dim=1).to(device)
    mask = cached_mask(entries, block_size, n_x0, device)
    _, _, pos = layout(entries, block_size, n_x0)
    src = shift_sources(entries, block_size)
    w = weight[:, idx] * masked * (src >= 0)
    h = hidden_states(model, ids, mask, pos.to(device))
    sel = w > 0
    rows, cols = sel.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return h.sum() * 0.0, {"tokens": 0}
    logits = model.lm_head(h[rows.to(device), src[cols].to(device)]).float()
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
