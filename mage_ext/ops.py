"""Python wrappers over torch.ops.mage.* and their fake (meta) kernels for torch.compile.

Shapes (see csrc/include/mage/ops.h for the full contract):
  q           [batch, Hq, B, d]          fp16 / bf16 / fp32
  k_cache     [batch, Hkv, capacity, d]  head-major cache; rows contiguous
  v_cache     [batch, Hkv, capacity, d]
  cache_lens  [batch] int32              valid cache entries per sequence
  k_block     [batch, Hkv, B, d]         the block's own keys / values (always attended)
  v_block     [batch, Hkv, B, d]
  out         [batch, Hq, B, d]          dtype of q
  lse         [batch, Hq, B] fp32
  scores      [batch, Hkv, capacity] fp32
  indices     [batch, Hkv, k] int32      strictly ascending, -1 past counts
  counts      [batch, Hkv] int32
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "attention_with_scores",
    "dense_attention",
    "sparse_attention",
    "topk_select",
    "append_kv",
    "attention_with_scores_out",
    "dense_attention_out",
    "sparse_attention_out",
    "topk_select_out",
    "check_selection",
    "check_errors",
    "take_error",
]

_ops = torch.ops.mage


def attention_with_scores(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                          k_block: Tensor, v_block: Tensor,
                          scale: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """First step of a block: exact attention over cache + block, plus importance scores.

    Returns (out, lse, scores); scores[b, h, j] is the softmax mass cache entry j receives,
    averaged over the G*B query rows of KV head h (spec 2.1); zero for j >= cache_lens[b].
    """
    return _ops.attention_with_scores.default(q, k_cache, v_cache, cache_lens, k_block,
                                              v_block, scale)


def dense_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                    k_block: Tensor, v_block: Tensor,
                    scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Exact attention over cache[:cache_lens[b]] + the block. Returns (out, lse)."""
    return _ops.dense_attention.default(q, k_cache, v_cache, cache_lens, k_block, v_block, scale)


def sparse_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, indices: Tensor,
                     counts: Tensor, k_block: Tensor, v_block: Tensor,
                     scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Attention over the selected cache entries indices[b, h, :counts[b, h]] + the block.

    The selection of KV head h is shared by its G query heads and all B queries.
    Returns (out, lse).
    """
    return _ops.sparse_attention.default(q, k_cache, v_cache, indices, counts, k_block, v_block,
                                         scale)


def topk_select(scores: Tensor, cache_lens: Tensor, k: int, n_sink: int = 0,
                n_recent: int = 0) -> Tuple[Tensor, Tensor]:
    """Top-k cache positions per (sequence, KV head), ascending; returns (indices, counts).

    The first n_sink and last n_recent valid positions are always kept and count towards k.
    Where cache_lens[b] <= k every valid position is selected (counts = cache_lens[b]).
    """
    return _ops.topk_select.default(scores, cache_lens, k, n_sink, n_recent)


def append_kv(k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, k_block: Tensor,
              v_block: Tensor) -> None:
    """Writes the block at positions [cache_lens[b], cache_lens[b] + B); cache_lens unchanged."""
    _ops.append_kv.default(k_cache, v_cache, cache_lens, k_block, v_block)


def attention_with_scores_out(q, k_cache, v_cache, cache_lens, k_block, v_block, scale, out,
                              lse, scores) -> None:
    """attention_with_scores into preallocated out / lse / scores (CUDA-graph safe)."""
    _ops.attention_with_scores_out.default(q, k_cache, v_cache, cache_lens, k_block, v_block,
                                           scale, out, lse, scores)


def dense_attention_out(q, k_cache, v_cache, cache_lens, k_block, v_block, scale, out,
                        lse) -> None:
    """dense_attention into preallocated out / lse (CUDA-graph safe)."""
    _ops.dense_attention_out.default(q, k_cache, v_cache, cache_lens, k_block, v_block, scale,
                                     out, lse)


def sparse_attention_out(q, k_cache, v_cache, indices, counts, k_block, v_block, scale, out,
                         lse) -> None:
    """sparse_attention into preallocated out / lse (CUDA-graph safe)."""
    _ops.sparse_attention_out.default(q, k_cache, v_cache, indices, counts, k_block, v_block,
                                      scale, out, lse)


def topk_select_out(scores, cache_lens, k, n_sink, n_recent, indices, counts) -> None:
    """topk_select into preallocated indices / counts (CUDA-graph safe)."""
    _ops.topk_select_out.default(scores, cache_lens, k, n_sink, n_recent, indices, counts)


def check_selection(indices: Tensor, counts: Tensor, capacity: int,
                    cache_lens: Optional[Tensor] = None) -> None:
    """Raises ValueError unless the selection is valid: every count in [0, k], and each row's
    first counts[b, h] indices strictly ascending (sorted, no repeats) within
    [0, min(capacity, cache_lens[b])) (cache_lens optional: without it, [0, capacity)).

    The CPU sparse_attention checks all but the lengths (it takes no cache_lens) and raises at
    once. On CUDA the kernels check nothing on the host (it would need a synchronisation): an
    index outside the cache gives NaN rows and an entry in the device's error record
    (``check_errors``), a repeated or unsorted index is attended as given (a repeat counts
    twice), an index past cache_lens reads a stale entry. Call this (it synchronises) when
    indices come from elsewhere than ``topk_select``.
    """
    k = indices.shape[-1]
    if bool(((counts < 0) | (counts > k)).any()):
        raise ValueError(f"counts must lie in [0, k={k}], got values in "
                         f"[{int(counts.min())}, {int(counts.max())}]")
    valid = torch.arange(k, device=indices.device) < counts.unsqueeze(-1)
    limit = torch.full(indices.shape[:1], capacity, dtype=torch.long, device=indices.device)
    if cache_lens is not None:
        limit = limit.clamp(max=cache_lens.to(indices.device, torch.long))
    bad = valid & ((indices < 0) | (indices >= limit.view(-1, 1, 1)))
    if bool(bad.any()):
        b, h, i = (int(x) for x in bad.nonzero()[0])
        where = (f"cache_lens[{b}]={int(limit[b])}" if cache_lens is not None
                 and int(limit[b]) < capacity else f"capacity={capacity}")
        raise ValueError(f"indices[{b}, {h}, {i}] = {int(indices[b, h, i])} is outside the "
                         f"cache (expected 0 <= index < {where})")
    unordered = valid[..., 1:] & (indices[..., 1:] <= indices[..., :-1])
    if bool(unordered.any()):
        b, h, i = (int(x) for x in unordered.nonzero()[0])
        raise ValueError(f"indices[{b}, {h}, {i + 1}] = {int(indices[b, h, i + 1])} does not "
                         f"follow indices[{b}, {h}, {i}] = {int(indices[b, h, i])} (expected the "
                         "first counts[b, h] indices strictly ascending: sorted, no repeats)")


def take_error(device) -> list:
    """The device's error record ([code, op, sequence, head, slot, value, limit, 0]; see
    csrc/ops/device_errors.h), cleared by the read; [] when clean (always on the CPU).
    Synchronises the device's current stream."""
    return list(_ops.take_error.default(torch.device(device)))


def check_errors(device=None) -> None:
    """Raises RuntimeError naming the op, sequence and value when a CUDA kernel met an input
    value it could not use (a cache length past the capacity, an append that does not fit, a
    selected index outside the cache, a count outside [0, k]); the record is cleared by the
    read. ``device``: one device, or None for every CUDA device (devices no MAGE kernel ran on
    are skipped without a sync).

    The CUDA ops check such values in the kernels (a host check would need a synchronisation
    per call and break CUDA graph capture) and write nothing out of bounds; this reads what
    they found. It synchronises the device's current stream: call it where you synchronise
    anyway (``generate`` does once per block). The CPU ops raise at once instead.
    """
    if device is not None:
        _ops.check_errors.default(torch.device(device))
        return
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            _ops.check_errors.default(torch.device("cuda", i))


# ---------------------------------------------------------------------------------------------
# Fake kernels: output shapes for torch.compile / export. Shape rules mirror ops/checks.cpp.


def _attention_dims(q, k_cache, k_block):
    torch._check(q.dim() == 4, lambda: "q must be [batch, Hq, B, d]")
    torch._check(k_cache.dim() == 4, lambda: "k_cache must be [batch, Hkv, capacity, d]")
    batch, hq, block, dim = q.shape
    hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    torch._check(hq % hkv == 0, lambda: "Hq must be a multiple of Hkv")
    torch._check(k_block.shape == (batch, hkv, block, dim),
                 lambda: "k_block must be [batch, Hkv, B, d]")
    return batch, hq, hkv, block, dim, capacity


@torch.library.register_fake("mage::attention_with_scores")
def _attention_with_scores_fake(q, k_cache, v_cache, cache_lens, k_block, v_block, scale=None):
    batch, hq, hkv, block, _, capacity = _attention_dims(q, k_cache, k_block)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, hq, block), dtype=torch.float32),
            q.new_empty((batch, hkv, capacity), dtype=torch.float32))


@torch.library.register_fake("mage::dense_attention")
def _dense_attention_fake(q, k_cache, v_cache, cache_lens, k_block, v_block, scale=None):
    batch, hq, _, block, _, _ = _attention_dims(q, k_cache, k_block)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, hq, block), dtype=torch.float32))


@torch.library.register_fake("mage::sparse_attention")
def _sparse_attention_fake(q, k_cache, v_cache, indices, counts, k_block, v_block, scale=None):
    batch, hq, _, block, _, _ = _attention_dims(q, k_cache, k_block)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, hq, block), dtype=torch.float32))


@torch.library.register_fake("mage::topk_select")
def _topk_select_fake(scores, cache_lens, k, n_sink=0, n_recent=0):
    torch._check(scores.dim() == 3, lambda: "scores must be [batch, Hkv, capacity]")
    batch, hkv, _ = scores.shape
    return (scores.new_empty((batch, hkv, k), dtype=torch.int32),
            scores.new_empty((batch, hkv), dtype=torch.int32))


@torch.library.register_fake("mage::attention_with_scores_out")
def _attention_with_scores_out_fake(q, k_cache, v_cache, cache_lens, k_block, v_block, scale,
                                    out, lse, scores):
    return None


@torch.library.register_fake("mage::dense_attention_out")
def _dense_attention_out_fake(q, k_cache, v_cache, cache_lens, k_block, v_block, scale, out,
                              lse):
    return None


@torch.library.register_fake("mage::sparse_attention_out")
def _sparse_attention_out_fake(q, k_cache, v_cache, indices, counts, k_block, v_block, scale,
                               out, lse):
    return None


@torch.library.register_fake("mage::topk_select_out")
def _topk_select_out_fake(scores, cache_lens, k, n_sink, n_recent, indices, counts):
    return None


@torch.library.register_fake("mage::append_kv")
def _append_kv_fake(k_cache, v_cache, cache_lens, k_block, v_block):
    return None
