"""MageCache: the generation's ``GenerationCache`` (mage_ext/core/cache.py) seen by transformers.

The model's attention layers see it twice:

* as the transformers cache (``past_key_values=`` / ``cache=``): ``update()`` returns the
  block's own k/v unchanged (the mage attention function reads the cache itself);
* as the ``mage_cache=`` forward kwarg, which transformers (4.56 ... 5.x) forwards untouched to the
  attention function. That is how the attention function finds it.

Usage (``mage_ext.generate`` does all of this)::

    cache = MageCache.for_model(model, batch=1, capacity=4096, policy=PolicyConfig())
    cache.begin_prefill()                         # dense, block-causal chunks
    model(ids, position_ids=pos, **cache.forward_kwargs(model)); cache.end_forward(ids.shape[1])
    cache.begin_block(); cache.begin_step()       # step 0 of a block (denoise)
    ...
"""
from __future__ import annotations

import inspect
from typing import Optional

from torch import Tensor

from ..core.cache import GenerationCache
from ..core.policy import PolicyConfig
from .tensor_parallel import group_of

try:  # subclassing keeps isinstance(cache, Cache) checks of any transformers version happy
    from transformers.cache_utils import Cache as _HFCache
except Exception:  # pragma: no cover - transformers is optional for the ops themselves
    _HFCache = object


class MageCache(GenerationCache, _HFCache):
    is_compileable = False

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 **kw):
        try:
            _HFCache.__init__(self, layers=[])
        except TypeError:  # other Cache constructors: nothing of theirs is used
            pass
        GenerationCache.__init__(self, n_layers, batch, n_kv_heads, head_dim, capacity, **kw)

    @classmethod
    def for_model(cls, model, batch: int, capacity: int, policy: Optional[PolicyConfig] = None,
                  **kw) -> "MageCache":
        """A cache shaped for ``model`` (a transformers causal LM), on its device and dtype; for
        a tensor-parallel model (mage_ext/hf/tensor_parallel.py) this rank's KV heads."""
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        tp = group_of(model)
        hkv = cfg.num_key_value_heads // (1 if tp is None else tp.size)
        return cls(cfg.num_hidden_layers, batch, hkv, head_dim, capacity,
                   dtype=p.dtype, device=p.device, policy=policy, tp=tp, **kw)

    # -- what transformers calls ------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        """Returns the block's k/v unchanged (no concatenation): the attention reads the cache."""
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # The host-side bound of cache_lens: reading the device tensor would synchronise
        # (and break CUDA-graph capture of a step).
        return self.max_len

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
