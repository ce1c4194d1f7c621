"""The forward adapter of a transformers causal LM for the block loop (mage_ext/core/loop.py).

``HFForward(model, cache)(ids, keep)`` runs the stock transformers forward with the "mage"
attention (enable_mage) and the ``MageCache``; positions follow the cache lengths, computed on
the device so the call can be captured in a CUDA graph. ``keep`` None returns the logits of every
position [batch, n, V]; a LongTensor [batch] those of one position per sequence [batch, 1, V].
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class HFForward:
    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.kw = cache.forward_kwargs(model)

    def __call__(self, ids: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        pos = self.cache.cache_lens.long().unsqueeze(1) + torch.arange(ids.shape[1],
                                                                       device=ids.device)
        if keep is None:
            return self.model(input_ids=ids, position_ids=pos, **self.kw).logits
        hidden = self.model.model(input_ids=ids, position_ids=pos, **self.kw).last_hidden_state
        rows = torch.arange(ids.shape[0], device=ids.device)
        return self.model.lm_head(hidden[rows, keep].unsqueeze(1))
