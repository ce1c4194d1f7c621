"""GenerationCache: everything one generation keeps between forwards, in one object.

It holds per-layer preallocated KV ``[batch, Hkv, capacity, d]``, one ``cache_lens`` int32
[batch] shared by all layers, the phase of the current forward, the step within the block and
the selector (the attention policy). Every attention layer of a forward calls ``attend``, which
does what the policy says for the phase:

* prefill: dense attention of the chunk over the cache + itself (block-causal), then the chunk's
  k/v are written to the cache;
* denoise: the selector decides what to read (``selector.attend``); the cache is read-only;
* commit: like denoise, then the finished block's k/v are written.

``cache_lens`` advances after the whole forward (``end_forward``), so every layer of one forward
sees the same lengths. Nothing here synchronises with the device: the host keeps an upper bound
of the lengths (``max_len``) and the KV-read accounting is folded into device totals once per
block (``end_block``), not per layer, so a forward captured in a CUDA graph replays unchanged.

Under tensor parallelism (``tp``, a ``core.distributed.TPGroup``) the cache holds this rank's KV
heads only (``n_kv_heads`` is the local count); the selector sees those heads, and
``kv_fraction`` sums the reads of all ranks.

This module does not import transformers: ``mage_ext.hf.cache.MageCache`` adds the transformers
Cache interface, the fast forward (``mage_ext.hf.fast_forward``) calls ``attend`` directly.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from .policy import PolicyConfig
from .selectors import LayerKV, Selection, StepContext, make_selector

PHASES = ("prefill", "denoise", "commit")


def _block_attention_on_gpu() -> bool:
    """A multi-block prefill chunk on the GPU takes one block_attention call (default; H200,
    1.5B shape: 0.68 s at 32K, 5.35 s at 128K) or, with MAGE_PREFILL_BLOCK_ATTENTION=0, one
    dense_attention call per block (1.99 s / 8.96 s; benchmarks/results/e2e_h200.json)."""
    return os.environ.get("MAGE_PREFILL_BLOCK_ATTENTION", "1") != "0"


class GenerationCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 *, dtype=torch.float32, device="cpu", policy: Optional[PolicyConfig] = None,
                 tp=None):
        for name, value in (("n_layers", n_layers), ("batch", batch), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim), ("capacity", capacity)):
            if int(value) <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be > 0, got {value}")
        self.n_layers, self.batch, self.capacity = n_layers, batch, capacity
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.cache_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.policy = policy or PolicyConfig(method="exact")
        self.tp = tp  # TPGroup the model's KV heads are split over, or None
        self.selector = make_selector(self.policy)
        self.selector.tp = tp
        self.selector.reset(batch, n_layers)
        self.phase = "prefill"
        self.step = 0
        self.steps_hint: Optional[int] = None
        self.recall_meter = None
        self.max_len = 0  # upper bound of cache_lens, kept on the host (no device reads)
        self._advance: Optional[Tensor] = None
        self._block: Optional[int] = None
        self._starts: Optional[list] = None
        # KV-read accounting: what each layer of the current forward read (a Selection, or None
        # for the whole cache), the last such list per kind of forward (a graph replay runs no
        # Python, so it repeats the list its capture recorded), and the forwards of the block.
        self._reads_now: list = []
        self._reads_of_kind: dict = {}
        self._block_forwards: dict = {}
        self._read = torch.zeros((), dtype=torch.float64, device=device)
        self._full = torch.zeros((), dtype=torch.float64, device=device)
        self._block_full = self._full

    # -- the attention of one layer ----------------------------------------------------------
    def layer(self, layer: int) -> LayerKV:
        return LayerKV(self.keys[layer], self.values[layer], self.cache_lens)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """One attention layer: q [batch, Hq, n, d], k/v [batch, Hkv, n, d] (RoPE applied).
        Returns [batch, Hq, n, d]."""
        kv = self.layer(layer)
        if self.phase == "prefill":
            self.write(layer, k, v)  # first: later blocks of the chunk read earlier ones
            return self._prefill_attention(q, k, v, kv, scale)
        else:
            ctx = StepContext(layer=layer, n_layers=self.n_layers, step=self.step,
                              phase=self.phase, scale=scale, steps_hint=self.steps_hint)
            out, selection = self.selector.attend(ctx, q, k, v, kv)
            self._reads_now.append(selection)
            meter = self.recall_meter
            if meter is not None and ctx.phase == "denoise" and ctx.step >= 1:
                meter.record(ctx, q, k, v, kv, selection)
        if self.phase != "denoise":
            self.write(layer, k, v)
        return out

    def _prefill_attention(self, q: Tensor, k: Tensor, v: Tensor, kv: LayerKV,
                           scale: float) -> Tensor:
        """Block-causal attention of a prefill chunk whose k/v were just appended: block j of
        the chunk reads the cache before the chunk, the chunk's blocks before j and itself."""
        n = q.shape[2]
        B = self._block or n
        if n == B:
            return ops.dense_attention(q, kv.k, kv.v, kv.lens, k, v, scale)[0]
        if self._starts is not None and (q.device.type == "cpu" or _block_attention_on_gpu()):
            return ops.block_attention(q, kv.k, kv.v, k, v, B, self._starts, scale)[0]
        # One call per block of the chunk (MAGE_PREFILL_BLOCK_ATTENTION=0 on the GPU).
        outs = []
        for j in range(n // B):
            blk = slice(j * B, (j + 1) * B)
            lens = kv.lens + j * B
            outs.append(ops.dense_attention(q[:, :, blk], kv.k, kv.v, lens, k[:, :, blk],
                                            v[:, :, blk], scale)[0])
        return torch.cat(outs, dim=2)

    def write(self, layer: int, k_block: Tensor, v_block: Tensor) -> None:
        """Writes the block's k/v at [cache_lens, cache_lens + n) and tells the selector."""
        if self.max_len + k_block.shape[2] > self.capacity:  # host-side bound: no device sync
            raise RuntimeError(f"{type(self).__name__}: writing {k_block.shape[2]} entries past "
                               f"the capacity {self.capacity} (longest sequence holds "
                               f"{self.max_len})")
        kv = self.layer(layer)
        ops.append_kv(kv.k, kv.v, kv.lens, k_block, v_block)
        self.selector.on_append(layer, kv, kv.lens.clone(), k_block.shape[2])

    # -- phases, called by the generation loop -----------------------------------------------
    def begin_prefill(self, advance: Optional[Tensor] = None, block_size: Optional[int] = None,
                      starts: Optional[list] = None) -> None:
        """Next forward writes a prompt chunk of whole blocks of ``block_size`` (default: the
        chunk is one block); sequence b keeps its first ``advance[b]`` tokens (int tensor
        [batch]; default all). The rest of a row is scratch: written past cache_lens (never
        read) and rewritten by that sequence's next real write. ``starts``: the cache lengths
        before the chunk, known on the host (lets the chunk run as one block_attention call)."""
        self.phase, self._advance, self._block = "prefill", advance, block_size
        self._starts = starts

    def begin_block(self) -> None:
        self.end_block()
        self.selector.begin_block()
        self.step = 0
        self._block_full = self.cache_lens.double().sum()  # lengths hold until the commit's end

    def begin_step(self, commit: bool = False) -> None:
        """Next forward is denoising step ``self.step`` of the block, or its commit forward."""
        self.phase, self._advance = ("commit" if commit else "denoise"), None
        self.selector.begin_step(self.step)
        self._reads_now = []

    def replayed(self, kind: str) -> None:
        """The forward of ``kind`` ran as a CUDA graph replay (no Python ran inside it)."""
        self.selector.replayed(kind)

    def forward_kind(self) -> str:
        """'prefill', 'first' (a block's all-[MASK] step), 'later' or 'commit'."""
        if self.phase == "denoise":
            return "first" if self.step == 0 else "later"
        return self.phase

    def end_forward(self, n_tokens: int) -> None:
        """After a forward of ``n_tokens`` per sequence (graph replays included): cross-layer
        selector work, then the lengths of writes advance."""
        self.advance_device(n_tokens)
        self.advance_host(n_tokens)

    def advance_device(self, n_tokens: int) -> None:
        """The device half of ``end_forward``: capturable in a CUDA graph."""
        if self.phase != "prefill":
            self.selector.end_step(self.step)
        if self.phase != "denoise":
            if self._advance is not None:
                self.cache_lens += self._advance.to(self.cache_lens.device, torch.int32)
            else:
                self.cache_lens += n_tokens

    def advance_host(self, n_tokens: int) -> None:
        """The host half of ``end_forward``: runs after every forward, replayed or not."""
        if self.phase != "prefill":
            kind = self.forward_kind()
            if self._reads_now:
                self._reads_of_kind[kind] = self._reads_now
            self._block_forwards[kind] = self._block_forwards.get(kind, 0) + 1
            self._reads_now = []
            self.step += 1
        if self.phase != "denoise":
            self.max_len += n_tokens

    # -- KV-read accounting ------------------------------------------------------------------
    def end_block(self) -> None:
        """Folds the finished block's reads into the totals: a few device ops per block (the
        next ``begin_block`` and ``kv_fraction`` call it), none per layer or forward."""
        full_layer = self._block_full
        for kind, n in self._block_forwards.items():
            reads = self._reads_of_kind.get(kind, [])
            dense = sum(1 for s in reads if s is None)
            sels = [s for s in reads if s is not None]
            read = full_layer * dense
            if sels:
                counts = [s.counts for s in sels]
                if all(c.shape == counts[0].shape for c in counts):
                    read = read + torch.stack(counts).double().mean(dim=2).sum()
                else:
                    read = read + sum(c.double().mean(dim=1).sum() for c in counts)
            self._read += read * n
            self._full += full_layer * len(reads) * n
        self._block_forwards = {}

    def kv_fraction(self) -> float:
        """Share of the cache read by denoise/commit forwards (1.0 = dense). Reads the device."""
        if self._block_forwards:
            self.end_block()
        totals = torch.stack([self._read, self._full])
        if self.tp is not None:  # each rank read its own heads: one collective, every rank calls it
            self.tp.all_reduce(totals)
        read, full = totals.tolist()
        return read / full if full > 0 else 1.0

    # -- reuse of a prefilled prompt ---------------------------------------------------------
    def copy_filled(self) -> tuple:
        """(keys, values, cache_lens) of the filled part, copied: per layer [batch, Hkv, n, d]
        with n the longest sequence. ``load_filled`` puts them into a fresh cache."""
        n = self.max_len
        return ([k[:, :, :n].clone() for k in self.keys], [v[:, :, :n].clone() for v in self.values],
                self.cache_lens.clone())

    def load_filled(self, keys: list, values: list, cache_lens: Tensor) -> None:
        """Fills a fresh cache from ``copy_filled``'s tensors; selectors fold the entries when
        they first read them (e.g. Quest's page bounds)."""
        name = f"{type(self).__name__}.load_filled"
        if len(keys) != self.n_layers or len(values) != self.n_layers:
            raise ValueError(f"{name}: {len(keys)} / {len(values)} layers of keys / values for a "
                             f"model of {self.n_layers} layers (a prefix of another model?)")
        n = keys[0].shape[2]
        batch, hkv, _, dim = self.keys[0].shape
        for layer, (k, v) in enumerate(zip(keys, values)):
            for what, t in (("keys", k), ("values", v)):
                if tuple(t.shape) != (batch, hkv, n, dim):
                    raise ValueError(f"{name}: {what}[{layer}] has shape {tuple(t.shape)}, "
                                     f"expected [batch={batch}, Hkv={hkv}, n={n}, d={dim}] "
                                     "(a prefix of another model, batch or tensor-parallel "
                                     "split?)")
        if tuple(cache_lens.shape) != (batch,):
            raise ValueError(f"{name}: cache_lens has shape {tuple(cache_lens.shape)}, expected "
                             f"[batch={batch}]")
        if n > self.capacity:
            raise ValueError(f"{name}: {n} entries exceed the capacity {self.capacity}")
        for layer in range(self.n_layers):
            self.keys[layer][:, :, :n].copy_(keys[layer])
            self.values[layer][:, :, :n].copy_(values[layer])
        self.cache_lens.copy_(cache_lens)
        self.max_len = n


__all__ = ["GenerationCache", "PHASES", "Selection"]
