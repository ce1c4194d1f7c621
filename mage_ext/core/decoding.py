"""Per-step decoding rules of block diffusion: sampling and which [MASK] positions to fill.

Pure tensor functions (no model), shared by the generation loop and its tests.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def sample(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Token and its probability per position: logits [..., V] -> (tokens, probs) [...].

    temperature 0 is greedy (probability from the plain softmax); otherwise nucleus sampling
    over softmax(logits / temperature) restricted to the smallest top-p set.
    """
    logits = logits.float()
    if temperature <= 0:
        probs = torch.softmax(logits, dim=-1)
        p, tok = probs.max(dim=-1)
        return tok, p
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    flat = probs.reshape(-1, probs.shape[-1])
    tok = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return tok, probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1)


def threshold_unmask(probs: Tensor, masked: Tensor, threshold: float) -> Tensor:
    """Fast-dLLM v2 rule: every masked position with p > threshold, plus each row's most
    confident masked position. probs/masked [batch, n] -> bool [batch, n]."""
    conf = probs.masked_fill(~masked, float("-inf"))
    pick = conf > threshold
    best = conf.argmax(dim=-1, keepdim=True)
    pick.scatter_(-1, best, True)
    return pick & masked


def transfer_schedule(block_size: int, steps: int) -> list:
    """SDAR: tokens to fill per step, block_size split evenly, the remainder to the first steps."""
    base, extra = divmod(block_size, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def fill_most_confident(probs: Tensor, masked: Tensor, n: Tensor) -> Tensor:
    """The n[row] most confident masked positions of each row (fewer where fewer are masked).
    probs/masked [batch, m], n int [batch] -> bool [batch, m]. No host synchronisation."""
    conf = probs.masked_fill(~masked, float("-inf"))
    rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return (rank < n.unsqueeze(-1)) & masked


def low_confidence_unmask(probs: Tensor, masked: Tensor, n, dynamic: bool,
                          threshold: float) -> Tensor:
    """SDAR rules. static: the n most confident masked positions per row. dynamic: all masked
    positions with p > threshold when there are at least n of them, else the n most confident.
    ``n`` is an int or an int tensor [batch] (no host synchronisation either way)."""
    if not isinstance(n, Tensor):
        n = torch.full(masked.shape[:1], int(n), dtype=torch.long, device=masked.device)
    pick = fill_most_confident(probs, masked, n)
    if dynamic:
        high = (probs > threshold) & masked
        enough = high.sum(-1) >= n.clamp(min=1)
        pick = torch.where(enough.unsqueeze(-1), high, pick)
    return pick


def fast_dllm_unmask(probs: Tensor, masked: Tensor, sub_block: int, threshold: float) -> Tensor:
    """Fast-dLLM v2 step: the threshold rule inside each row's first sub-block that still holds
    a [MASK] (rows advance through their sub-blocks independently, so a row's tokens do not
    depend on its batch mates). probs/masked [batch, B] -> bool [batch, B]."""
    batch, block = masked.shape
    has = masked.view(batch, block // sub_block, sub_block).any(-1)
    active = has.int().argmax(-1)                       # first sub-block with a [MASK]
    sub = torch.arange(block, device=masked.device) // sub_block
    return threshold_unmask(probs, masked & (sub.unsqueeze(0) == active.unsqueeze(-1)), threshold)
