"""Cache traffic bookkeeping: how much of the KV cache an attention call read.

Pure functions of (selection, lens): a selection reads K and V rows of counts[b, h] entries per
(sequence, KV head); dense reads lens[b] per KV head. The block's own keys are not cache traffic.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .selectors.base import Selection


def _check(selection: Optional[Selection], lens: Tensor) -> None:
    if not isinstance(lens, Tensor) or lens.dim() != 1:
        raise ValueError(f"lens: expected an integer tensor [batch], got "
                         f"{getattr(lens, 'shape', type(lens).__name__)}")
    if selection is not None and (selection.counts.dim() != 2
                                  or selection.counts.shape[0] != lens.shape[0]):
        raise ValueError(f"selection.counts: expected [batch={lens.shape[0]}, Hkv], got "
                         f"{tuple(selection.counts.shape)}")


def kv_bytes(selection: Optional[Selection], lens: Tensor, n_kv_heads: int, head_dim: int,
             elem_size: int) -> tuple[int, int]:
    """(bytes read by this call, bytes a dense call reads) of K and V cache rows.

    selection None means the call was dense. n_kv_heads / head_dim / elem_size describe the cache.
    """
    _check(selection, lens)
    row = 2 * head_dim * elem_size  # one K row and one V row
    dense = int(lens.long().sum()) * n_kv_heads * row
    read = dense if selection is None else int(selection.counts.long().sum()) * row
    return read, dense


def entries_read(selection: Optional[Selection], lens: Tensor) -> tuple[Tensor, Tensor]:
    """(cache entries read per KV head, entries a dense call reads), summed over the batch.

    0-d float64 tensors on the device, no host synchronisation: a generation loop accumulates
    them per call and reads the ratio once at the end.
    """
    full = lens.double().sum()
    read = full if selection is None else selection.counts.double().mean(dim=1).sum()
    return read, full


def kv_fraction(selection: Optional[Selection], lens: Tensor) -> float:
    """Share of the dense cache traffic this call read (1.0 when dense or the cache is empty)."""
    _check(selection, lens)
    read, full = entries_read(selection, lens)
    return float(read / full) if float(full) > 0 else 1.0
