"""FlashInfer's dense prefill kernel as a peer for the dense step (optional; JIT-compiles on first use).

The block's B queries attend to cache + block with no mask (bidirectional block): FlashInfer's
prefill kernels are the applicable ones (its decode kernels take one query per sequence). Its
layout is NHD ([tokens, heads, d]), so K/V are re-laid out once, untimed (in its favour).
"""
from __future__ import annotations

import torch


def available() -> str | None:
    """None when FlashInfer imports, else the reason it does not."""
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # ImportError, or a missing optional dependency inside it
        return f"{type(e).__name__}: {e}"
    return None


def make_dense(q, k_full, v_full):
    """A zero-argument callable running FlashInfer on q [b,Hq,B,d], k/v_full [b,Hkv,N+B,d]."""
    import flashinfer

    b, hq, blk, d = q.shape
    n = k_full.shape[2]
    q_nhd = q.transpose(1, 2).reshape(b * blk, hq, d).contiguous()
    k_nhd = k_full.transpose(1, 2).reshape(b * n, -1, d).contiguous()
    v_nhd = v_full.transpose(1, 2).reshape(b * n, -1, d).contiguous()
    if b == 1:
        return lambda: flashinfer.single_prefill_with_kv_cache(q_nhd, k_nhd, v_nhd, causal=False)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
    qo_indptr = torch.arange(0, b + 1, device=q.device, dtype=torch.int32) * blk
    kv_indptr = torch.arange(0, b + 1, device=q.device, dtype=torch.int32) * n
    wrapper.plan(qo_indptr, kv_indptr, hq, k_full.shape[1], d, causal=False,
                 q_data_type=q.dtype, kv_data_type=k_full.dtype)
    return lambda: wrapper.run(q_nhd, k_nhd, v_nhd)
