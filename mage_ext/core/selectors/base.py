"""The one interface every attention policy (exact, MAGE, Quest, Tidal, SparseD) implements.

The generation loop owns a cache object; for every attention layer of every forward it calls
``selector.attend(ctx, q, k_block, v_block, kv)``. A selector decides which cache entries the
block's queries read and computes the attention with the ``torch.ops.mage`` ops. All state a
selector keeps lives on the selector instance, which belongs to one generation (no globals).

Call order within one generation::

    reset(batch, n_layers)
    for each block:
        begin_block()
        for step in 0, 1, ...:                  # step 0 is the all-[MASK] step
            begin_step(step)
            attend(ctx, ...) for layer 0..L-1    # ctx.phase == "denoise"
            end_step(step)
        begin_step(step + 1); attend(ctx with phase "commit") per layer; end_step(step + 1)
        on_append(layer, kv, start, length) per layer, after the block's KV is written

Prefill (the prompt's full blocks) uses dense attention and does not go through selectors;
``on_append`` is still called for every chunk written to the cache so metadata (Quest's page
min/max) stays current.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ... import ops


@dataclass
class LayerKV:
    """One layer's KV cache: k/v [batch, Hkv, capacity, d] (rows contiguous), lens int32 [batch]."""

    k: Tensor
    v: Tensor
    lens: Tensor


@dataclass
class Selection:
    """Cache entries a step read: indices int32 [batch, Hkv, k] ascending, -1 past counts [batch, Hkv].

    ``None`` in place of a Selection means the step read the whole cache (dense).
    """

    indices: Tensor
    counts: Tensor


@dataclass
class StepContext:
    layer: int                 # 0-based layer index
    n_layers: int
    step: int                  # 0 = first (all-[MASK]) step of the block
    phase: str                 # "denoise" or "commit" (the forward that writes the block's KV)
    scale: float               # softmax scale (1/sqrt(d) for Qwen)
    steps_hint: Optional[int] = None  # expected denoising steps per block when known (SDAR), else None


class Selector:
    """Base class: exact attention everywhere. Subclasses override what they need."""

    name = "exact"

    config = None  # the PolicyConfig, set by make_selector
    # Under tensor parallelism the TPGroup the KV heads are split over (the cache sets it); this
    # selector then sees its rank's heads. Per-head rules need nothing from it; rules over all
    # heads of a layer (MAGE's adaptive budgets) reduce over it.
    tp = None

    def reset(self, batch: int, n_layers: int) -> None:
        """A new generation starts: drop all state."""
        self.batch, self.n_layers = batch, n_layers

    def begin_block(self) -> None:
        """A new block starts (its queries are all [MASK] at the next step)."""

    def begin_step(self, step: int) -> None:
        """Before layer 0 of a forward of the current block."""

    def replayed(self, kind: str) -> None:
        """A forward of ``kind`` ('first', 'later', 'commit') ran as a CUDA graph replay: its
        device work happened, its Python did not. Host state that forward would have set must
        be taken from the device buffers the graph wrote."""

    def end_step(self, step: int) -> None:
        """After the last layer of a forward (deferred, cross-layer work such as adaptive budgets)."""

    def on_append(self, layer: int, kv: LayerKV, start: Tensor, length: int) -> None:
        """Entries [start[b], start[b] + length) of layer ``layer`` were just written to ``kv``."""

    def attend(self, ctx: StepContext, q: Tensor, k_block: Tensor, v_block: Tensor,
               kv: LayerKV) -> tuple[Tensor, Optional[Selection]]:
        """q [batch, Hq, B, d], k_block/v_block [batch, Hkv, B, d] (RoPE applied).

        Returns (out [batch, Hq, B, d], the Selection this call read or None if dense).
        """
        return dense(ctx, q, k_block, v_block, kv)


# The two attention calls every selector ends in (the selection decides which).

def dense(ctx: StepContext, q: Tensor, k_block: Tensor, v_block: Tensor,
          kv: LayerKV) -> tuple[Tensor, Optional[Selection]]:
    out, _ = ops.dense_attention(q, kv.k, kv.v, kv.lens, k_block, v_block, ctx.scale)
    return out, None


def sparse(ctx: StepContext, q: Tensor, k_block: Tensor, v_block: Tensor, kv: LayerKV,
           sel: Selection) -> tuple[Tensor, Selection]:
    out, _ = ops.sparse_attention(q, kv.k, kv.v, sel.indices, sel.counts, k_block, v_block,
                                  ctx.scale)
    return out, sel
