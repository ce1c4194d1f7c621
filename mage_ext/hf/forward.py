"""The forward adapter of a transformers causal LM for the block loop (mage_ext/core/loop.py).

``HFForward(model, cache)(ids, last_only)`` runs the stock transformers forward with the "mage"
attention (enable_mage) and the ``MageCache``; positions follow the cache lengths, computed on
the device so the call can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor


class HFForward:
    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.kw = cache.forward_kwargs(model)

    def __call__(self, ids: Tensor, last_only: bool) -> Tensor:
        pos = self.cache.cache_lens.long().unsqueeze(1) + torch.arange(ids.shape[1],
                                                                       device=ids.device)
        return self.model(input_ids=ids, position_ids=pos, logits_to_keep=1 if last_only else 0,
                          **self.kw).logits
