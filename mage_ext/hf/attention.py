"""The "mage" attention function for transformers' ``AttentionInterface``.

transformers calls it from every attention layer with q [b, Hq, s, d] and the k/v the cache's
``update()`` returned (the block's own keys/values, RoPE applied). It finds the generation's
``MageCache`` in the ``mage_cache`` forward kwarg (transformers 4.56 ... 5.x pass extra forward
kwargs down to the attention function unchanged); ``cache.attend`` does the rest (prefill:
dense and block-causal; denoise / commit: what the policy's selector decides; prefill and commit
write the chunk's k/v into the cache).

Returns ([b, s, Hq, d], None), the layout transformers expects.
"""
from __future__ import annotations


def mage_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                   **kwargs):
    cache = kwargs.get("mage_cache")
    if cache is None:
        raise RuntimeError(
            "mage attention: no MageCache in the forward kwargs. Run the model through "
            "mage_ext.generate(...), or pass mage_cache=cache (cache = MageCache.for_model(...)) "
            "with cache.forward_kwargs(model); disable_mage(model) restores stock attention.")
    if getattr(module, "sliding_window", None) is not None:
        raise NotImplementedError("mage attention: sliding-window layers are not supported "
                                  f"(layer {module.layer_idx}); use a config without them")
    if dropout:
        raise NotImplementedError("mage attention: dropout is not supported (inference only)")
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
    out = cache.attend(module.layer_idx, q, k, v, scale)
    return out.transpose(1, 2), None


def no_mask(*args, **kwargs):
    """Mask function for ``AttentionMaskInterface``: the ops need no materialised mask."""
    return None
