"""MageCache: everything one generation keeps between forwards, in one object.

Holds per-layer preallocated KV ``[batch, Hkv, capacity, d]``, one ``cache_lens`` int32 [batch]
shared by all layers, the phase of the current forward, the step within the block and the
selector. The model's attention layers see it twice:

* as the transformers cache (``past_key_values=`` / ``cache=``): ``update()`` returns the
  block's own k/v unchanged (the mage attention function reads the cache itself) and remembers
  them;
* as the ``mage_cache=`` forward kwarg, which transformers (4.56 ... 5.x) forwards untouched to the
  attention function. That is how the attention function finds it.

The cache is written only by prefill and commit forwards (``write``, through
``torch.ops.mage.append_kv``); ``cache_lens`` advances after the whole forward (``end_forward``)
so every layer of one forward sees the same lengths.

Usage (``mage_ext.generate`` does all of this)::

    cache = MageCache.for_model(model, batch=1, capacity=4096, policy=PolicyConfig())
    cache.begin_prefill()                         # dense, block-causal chunks
    model(ids, position_ids=pos, **cache.forward_kwargs(model)); cache.end_forward()
    cache.begin_block(); cache.begin_step()       # step 0 of a block (denoise)
    ...
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..policy import PolicyConfig
from ..selectors import LayerKV, Selection, make_selector
from ..eval.traffic import entries_read

try:  # subclassing keeps isinstance(cache, Cache) checks of any transformers version happy
    from transformers.cache_utils import Cache as _HFCache
except Exception:  # pragma: no cover - transformers is optional for the ops themselves
    _HFCache = object

PHASES = ("prefill", "denoise", "commit")


class MageCache(_HFCache):
    is_compileable = False

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 *, dtype=torch.float32, device="cpu", policy: Optional[PolicyConfig] = None):
        for name, value in (("n_layers", n_layers), ("batch", batch), ("n_kv_heads", n_kv_heads),
                            ("head_dim", head_dim), ("capacity", capacity)):
            if int(value) <= 0:
                raise ValueError(f"MageCache: {name} must be > 0, got {value}")
        try:
            super().__init__(layers=[])
        except TypeError:  # other Cache constructors: nothing of theirs is used
            pass
        self.n_layers, self.batch, self.capacity = n_layers, batch, capacity
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.cache_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.policy = policy or PolicyConfig(method="exact")
        self.selector = make_selector(self.policy)
        self.selector.reset(batch, n_layers)
        self.phase = "prefill"
        self.step = 0
        self.steps_hint: Optional[int] = None
        self.recall_meter = None
        self._advance: Optional[Tensor] = None
        self._max_len = 0  # upper bound of cache_lens kept on the host
        self.track_reads = True
        self._block_kv: list = [None] * n_layers
        # KV entries read (selected or whole cache) vs. the whole cache, over denoise/commit.
        self._read = torch.zeros((), dtype=torch.float64, device=device)
        self._full = torch.zeros((), dtype=torch.float64, device=device)

    @classmethod
    def for_model(cls, model, batch: int, capacity: int, policy: Optional[PolicyConfig] = None,
                  **kw) -> "MageCache":
        """A cache shaped for ``model`` (a transformers causal LM), on its device and dtype."""
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, head_dim, capacity,
                   dtype=p.dtype, device=p.device, policy=policy, **kw)

    # -- what transformers calls ------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        """Remembers the block's k/v and returns them unchanged (no concatenation)."""
        self._block_kv[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # The host-side copy of max(cache_lens): reading the device tensor would synchronise
        # (and break CUDA-graph capture of a step).
        return self._max_len

    def get_mask_sizes(self, *args, **kwargs):
        return self.capacity, 0

    def __len__(self):
        return self.n_layers

    def forward_kwargs(self, model) -> dict:
        """Keyword arguments that hand this cache to ``model(...)`` on transformers 4.56 ... 5.x."""
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"
        # A dict mask skips transformers' mask construction: the ops need no O(N^2) mask.
        return {name: self, "mage_cache": self, "use_cache": True,
                "attention_mask": {"full_attention": None, "sliding_attention": None}}

    # -- what the generation loop calls -----------------------------------------------------
    def layer(self, layer: int) -> LayerKV:
        return LayerKV(self.keys[layer], self.values[layer], self.cache_lens)

    def begin_prefill(self, advance: Optional[Tensor] = None) -> None:
        """Next forward writes a prompt chunk; only rows with ``advance`` True keep it.

        Rows with ``advance`` False are scratch: written past cache_lens (never read) and
        rewritten by that sequence's next real write.
        """
        self.phase, self._advance = "prefill", advance

    def begin_block(self) -> None:
        self.selector.begin_block()
        self.step = 0

    def begin_step(self, commit: bool = False) -> None:
        """Next forward is denoising step ``self.step`` of the block, or its commit forward."""
        self.phase, self._advance = ("commit" if commit else "denoise"), None
        self.selector.begin_step(self.step)

    def end_forward(self) -> None:
        """After the forward: cross-layer selector work, then advance the lengths of writes."""
        if self.phase != "prefill":
            self.selector.end_step(self.step)
            self.step += 1
        if self.phase != "denoise":
            block = self._block_len()
            add = torch.full_like(self.cache_lens, block)
            if self._advance is not None:
                add = add * self._advance.to(add.device, torch.int32)
            self.cache_lens += add
            self._max_len += block
        self._block_kv = [None] * self.n_layers

    def write(self, layer: int, k_block: Tensor, v_block: Tensor) -> None:
        """Writes the block's k/v at [cache_lens, cache_lens + B) and tells the selector."""
        if self._max_len + k_block.shape[2] > self.capacity:  # host-side bound: no device sync
            raise RuntimeError(f"MageCache: writing {k_block.shape[2]} entries past the capacity "
                               f"{self.capacity} (longest sequence holds {self._max_len})")
        kv = self.layer(layer)
        ops.append_kv(kv.k, kv.v, kv.lens, k_block, v_block)
        self.selector.on_append(layer, kv, kv.lens.clone(), k_block.shape[2])

    def copy_filled(self) -> tuple:
        """(keys, values, cache_lens) of the filled part, copied: per layer [batch, Hkv, n, d]
        with n the longest sequence. ``load_filled`` puts them into a fresh cache."""
        n = self._max_len
        return ([k[:, :, :n].clone() for k in self.keys], [v[:, :, :n].clone() for v in self.values],
                self.cache_lens.clone())

    def load_filled(self, keys: list, values: list, cache_lens: Tensor) -> None:
        """Fills a fresh cache from ``copy_filled``'s tensors; selectors fold the entries when
        they first read them (e.g. Quest's page bounds)."""
        n = keys[0].shape[2]
        if n > self.capacity:
            raise ValueError(f"MageCache.load_filled: {n} entries exceed the capacity {self.capacity}")
        for layer in range(self.n_layers):
            self.keys[layer][:, :, :n].copy_(keys[layer])
            self.values[layer][:, :, :n].copy_(values[layer])
        self.cache_lens.copy_(cache_lens)
        self._max_len = n

    def count_read(self, selection: Optional[Selection]) -> None:
        """Accounts one layer's read: the whole cache (``None``) or the selected entries."""
        if not self.track_reads:
            return
        read, full = entries_read(selection, self.cache_lens)
        self._full += full
        self._read += read

    def kv_fraction(self) -> float:
        """Share of the cache read by denoise/commit forwards (1.0 = dense)."""
        full = float(self._full)
        return float(self._read) / full if full > 0 else 1.0

    def _block_len(self) -> int:
        for kv in self._block_kv:
            if kv is not None:
                return kv[0].shape[2]
        raise RuntimeError("MageCache.end_forward: no layer called update() in this forward")

