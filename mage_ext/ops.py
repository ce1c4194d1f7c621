"""Python wrappers over torch.ops.mage.* and their fake (meta) kernels for torch.compile.

Shapes (see csrc/include/mage/ops.h for the full contract):
  q           [batch, Hq, B, d]          fp16 / bf16 / fp32
  k_cache     [batch, Hkv, capacity, d]  head-major cache; rows contiguous
  v_cache     [batch, Hkv, capacity, d]
  cache_lens  [batch] int32              valid cache entries per sequence
  k_block     [batch, Hkv, B, d]         the block's own keys / values (always attended)
  v_block     [batch, Hkv, B, d]
  out         [batch, Hq, B, d]          dtype of q
  lse         [batch, Hq, B] fp32 (fp64 for fp64 inputs: the CPU kernels take fp64, for gradcheck)
  scores      [batch, Hkv, capacity] fp32
  indices     [batch, Hkv, k] int32      strictly ascending, -1 past counts
  counts      [batch, Hkv] int32

Fused layer ops (rms_norm, qkv_rope, silu_mul): the values of the transformers Qwen2 / Qwen3
modules they replace, bit for bit on the same device (csrc/include/mage/ops.h). linear: the
decoding forward's GEMMs (cuBLAS; an experimental few-row split-K kernel behind an opt-in).

Autograd: attention_with_scores, dense_attention, sparse_attention and block_sparse_attention are
differentiable (registered in C++, csrc/autograd: the same path serves LibTorch callers). out and
lse carry gradients to q, the caches (through a selection: the selected rows only) and the block;
scores, cache_lens, indices and counts carry none. The *_out forms and the *_backward ops refuse
inputs that require grad (no double backward).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "attention_with_scores",
    "dense_attention",
    "sparse_attention",
    "block_sparse_attention",
    "topk_select",
    "append_kv",
    "attention_with_scores_out",
    "dense_attention_out",
    "sparse_attention_out",
    "topk_select_out",
    "check_selection",
    "rms_norm",
    "qkv_rope",
    "silu_mul",
    "linear",
    "rms_norm_out",
    "qkv_rope_out",
    "silu_mul_out",
    "block_attention",
    "block_attention_backward",
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


def block_sparse_attention(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, indices: Tensor,
                           counts: Tensor, k_own: Tensor, v_own: Tensor, block_size: int,
                           scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """The sparse training attention of MAGE-FT. Returns (out, lse).

    q [batch, Hq, T, d] with T = n_blocks * block_size; k_ctx, v_ctx [batch, Hkv, N, d] (the
    context, e.g. the clean copy; rows contiguous); indices [batch, n_blocks, Hkv, k] int32
    (ascending, in [0, N), -1 past counts); counts [batch, n_blocks, Hkv] int32; k_own, v_own
    [batch, Hkv, T, d]. Query block j attends to ctx rows indices[b, j, h, :counts[b, j, h]] of
    its KV head plus the keys of its own block j (bidirectionally). Differentiable in q, the
    context and the own keys/values; many blocks selecting one context row sum their gradients
    there in a fixed order. On CUDA (fp16 / bf16) the backward runs on FlashAttention-2's
    variable-length kernel, whose dq sums use atomics (bits may vary run to run); under
    ``torch.use_deterministic_algorithms(True)``, or ``MAGE_SPARSE_BACKWARD=generic``, the
    chunked recompute runs instead, deterministic throughout.
    """
    return _ops.block_sparse_attention.default(q, k_ctx, v_ctx, indices, counts, k_own, v_own,
                                               block_size, scale)


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


def rms_norm(x: Tensor, weight: Tensor, eps: float,
             residual: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Residual add + RMSNorm of a decoder layer. Returns (out, new_residual).

    h = residual + x (x alone without a residual), rounded to x's dtype as torch's add;
    out = weight * (h.float() * rsqrt(h.float().pow(2).mean(-1) + eps)).to(x.dtype), exactly
    Qwen2RMSNorm(h); new_residual = h (a copy of x without a residual).
    x [..., hidden]; weight [hidden] and residual [..., hidden] of x's dtype.
    """
    return _ops.rms_norm.default(x, weight, eps, residual)


def qkv_rope(qkv: Tensor, positions: Tensor, inv_freq: Tensor, n_q_heads: int, n_kv_heads: int,
             head_dim: int, q_norm_weight: Optional[Tensor] = None,
             k_norm_weight: Optional[Tensor] = None,
             eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    """The QKV GEMM's output [batch, B, (Hq + 2 * Hkv) * d] to (q, k, v) in the attention ops'
    layout: q [batch, Hq, B, d], k and v [batch, Hkv, B, d], contiguous, qkv's dtype.

    q and k are rotated by RoPE as transformers' Qwen2 (apply_rotary_pos_emb with the cos / sin
    of Qwen2RotaryEmbedding for positions [batch, B] int64 and inv_freq [d / 2] fp32); with
    q_norm_weight and k_norm_weight (Qwen3) each head is RMSNorm'ed over d first.
    """
    return _ops.qkv_rope.default(qkv, positions, inv_freq, n_q_heads, n_kv_heads, head_dim,
                                 q_norm_weight, k_norm_weight, eps)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate_up [..., 2 * I] (gate first): Qwen2MLP's act_fn(gate) * up."""
    return _ops.silu_mul.default(gate_up)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x @ weight.T + bias, torch.nn.functional.linear's contract (and its autograd when a
    gradient is wanted): cuBLAS on CUDA. Experimental, MAGE_SKINNY_GEMM=on: fp16 / bf16 inputs
    of at most 32 rows (one decoding block) take a split-K kernel meant to read the weight at
    memory bandwidth where cuBLAS leaves SMs idle for the small matrices; it sums in fp32 in a
    fixed order (deterministic), not cuBLAS's, and is still slower than cuBLAS on the H200
    (benchmarks/results/skinny_gemm_probe_h200.json), hence off by default."""
    return _ops.linear.default(x, weight, bias)


def rms_norm_out(x, weight, eps, residual, out, residual_out) -> None:
    """rms_norm into preallocated out / residual_out (CUDA-graph safe). residual_out may be
    residual itself (in-place update) and out may be x; out and residual_out must differ."""
    _ops.rms_norm_out.default(x, weight, eps, residual, out, residual_out)


def qkv_rope_out(qkv, positions, inv_freq, n_q_heads, n_kv_heads, head_dim, q_norm_weight,
                 k_norm_weight, eps, q, k, v) -> None:
    """qkv_rope into preallocated q / k / v (CUDA-graph safe)."""
    _ops.qkv_rope_out.default(qkv, positions, inv_freq, n_q_heads, n_kv_heads, head_dim,
                              q_norm_weight, k_norm_weight, eps, q, k, v)


def silu_mul_out(gate_up, out) -> None:
    """silu_mul into a preallocated out (CUDA-graph safe)."""
    _ops.silu_mul_out.default(gate_up, out)
def _host_ints(start) -> list:
    """start as a list of Python ints (a tensor is read once on the host: a sync on CUDA)."""
    if isinstance(start, torch.Tensor):
        return [int(x) for x in start.tolist()]
    return [int(x) for x in start]


def block_attention(q: Tensor, k_ctx: Tensor, v_ctx: Tensor, k_own: Tensor, v_own: Tensor,
                    block_size: int, start, scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Block-causal attention over a context plus the own block; returns (out, lse).

    Query token t of sequence b, in block j = t // block_size, attends to
    k_ctx[b, :, :start[b] + j*block_size] and bidirectionally to its own block
    k_own[b, :, j*block_size:(j+1)*block_size].
      q [batch, Hq, T, d] (T a multiple of block_size); k_own, v_own [batch, Hkv, T, d];
      k_ctx, v_ctx [batch, Hkv, N, d] (last dim contiguous) with start[b] + T - block_size <= N;
      start: one int per sequence (host ints).
    out [batch, Hq, T, d] has q's dtype; lse [batch, Hq, T] is float32 (float64 for float64
    inputs). Chunked prefill: ctx = the cache with the chunk already appended at
    [start, start + T), own = the chunk's k/v. Training: ctx = clean k/v, start = 0, own = clean
    (block-causal) or noisy (noisy block sees the clean prefix before it and itself).
    Differentiable in q, k_ctx, v_ctx, k_own, v_own (lse carries no gradient).
    """
    return _ops.block_attention.default(q, k_ctx, v_ctx, k_own, v_own, block_size,
                                        _host_ints(start), scale)


def block_attention_backward(dout, q, k_ctx, v_ctx, k_own, v_own, out, lse, block_size, start,
                             scale=None):
    """Gradients (dq, dk_ctx, dv_ctx, dk_own, dv_own) of block_attention given dout."""
    return _ops.block_attention_backward.default(dout, q, k_ctx, v_ctx, k_own, v_own, out, lse,
                                                 block_size, _host_ints(start), scale)


# ---------------------------------------------------------------------------------------------
# Fake kernels: output shapes for torch.compile / export. Shape rules mirror ops/checks.cpp.


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


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
            q.new_empty((batch, hq, block), dtype=_lse_dtype(q)),
            q.new_empty((batch, hkv, capacity), dtype=torch.float32))


@torch.library.register_fake("mage::dense_attention")
def _dense_attention_fake(q, k_cache, v_cache, cache_lens, k_block, v_block, scale=None):
    batch, hq, _, block, _, _ = _attention_dims(q, k_cache, k_block)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, hq, block), dtype=_lse_dtype(q)))


@torch.library.register_fake("mage::sparse_attention")
def _sparse_attention_fake(q, k_cache, v_cache, indices, counts, k_block, v_block, scale=None):
    batch, hq, _, block, _, _ = _attention_dims(q, k_cache, k_block)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, hq, block), dtype=_lse_dtype(q)))


@torch.library.register_fake("mage::block_sparse_attention")
def _block_sparse_attention_fake(q, k_ctx, v_ctx, indices, counts, k_own, v_own, block_size,
                                 scale=None):
    batch, hq, _, seq, _, _ = _attention_dims(q, k_ctx, k_own)
    torch._check(seq % block_size == 0, lambda: "T must be a multiple of block_size")
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, hq, seq), dtype=_lse_dtype(q)))


def _attention_grads_fake(q, k_cache, k_block):
    """(dq, dk_cache, dv_cache, dk_block, dv_block): contiguous, in the inputs' dtype."""
    return tuple(torch.empty(t.shape, dtype=q.dtype, device=q.device)
                 for t in (q, k_cache, k_cache, k_block, k_block))


@torch.library.register_fake("mage::dense_attention_backward")
def _dense_attention_backward_fake(dout, dlse, q, k_cache, v_cache, cache_lens, k_block, v_block,
                                   out, lse, scale):
    _attention_dims(q, k_cache, k_block)
    return _attention_grads_fake(q, k_cache, k_block)


@torch.library.register_fake("mage::sparse_attention_backward")
def _sparse_attention_backward_fake(dout, dlse, q, k_cache, v_cache, indices, counts, k_block,
                                    v_block, out, lse, scale):
    _attention_dims(q, k_cache, k_block)
    return _attention_grads_fake(q, k_cache, k_block)


@torch.library.register_fake("mage::block_sparse_attention_backward")
def _block_sparse_attention_backward_fake(dout, dlse, q, k_ctx, v_ctx, indices, counts, k_own,
                                          v_own, out, lse, block_size, scale):
    _attention_dims(q, k_ctx, k_own)
    return _attention_grads_fake(q, k_ctx, k_own)


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


@torch.library.register_fake("mage::rms_norm")
def _rms_norm_fake(x, weight, eps, residual=None):
    torch._check(weight.shape == (x.shape[-1],), lambda: "weight must be [hidden]")
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("mage::qkv_rope")
def _qkv_rope_fake(qkv, positions, inv_freq, n_q_heads, n_kv_heads, head_dim,
                   q_norm_weight=None, k_norm_weight=None, eps=1e-6):
    torch._check(qkv.dim() == 3, lambda: "qkv must be [batch, B, (Hq + 2 * Hkv) * d]")
    batch, block, width = qkv.shape
    torch._check(width == (n_q_heads + 2 * n_kv_heads) * head_dim,
                 lambda: "qkv.size(2) must be (Hq + 2 * Hkv) * d")
    return (qkv.new_empty((batch, n_q_heads, block, head_dim)),
            qkv.new_empty((batch, n_kv_heads, block, head_dim)),
            qkv.new_empty((batch, n_kv_heads, block, head_dim)))


@torch.library.register_fake("mage::silu_mul")
def _silu_mul_fake(gate_up):
    torch._check(gate_up.shape[-1] % 2 == 0, lambda: "gate_up must be [..., 2 * I]")
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.register_fake("mage::linear")
def _linear_fake(x, weight, bias=None):
    torch._check(weight.dim() == 2 and x.shape[-1] == weight.shape[1],
                 lambda: "x must be [..., K] and weight [N, K]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("mage::rms_norm_out")
def _rms_norm_out_fake(x, weight, eps, residual, out, residual_out):
    return None


@torch.library.register_fake("mage::qkv_rope_out")
def _qkv_rope_out_fake(qkv, positions, inv_freq, n_q_heads, n_kv_heads, head_dim,
                       q_norm_weight, k_norm_weight, eps, q, k, v):
    return None


@torch.library.register_fake("mage::silu_mul_out")
def _silu_mul_out_fake(gate_up, out):
    return None
def _block_attention_dims(q, k_ctx, k_own, block_size, start):
    torch._check(q.dim() == 4, lambda: "q must be [batch, Hq, T, d]")
    torch._check(k_ctx.dim() == 4, lambda: "k_ctx must be [batch, Hkv, N, d]")
    batch, hq, tokens, dim = q.shape
    hkv = k_ctx.shape[1]
    torch._check(hq % hkv == 0, lambda: "Hq must be a multiple of Hkv")
    torch._check(k_own.shape == (batch, hkv, tokens, dim), lambda: "k_own must be [batch, Hkv, T, d]")
    torch._check(tokens % block_size == 0, lambda: "T must be a multiple of block_size")
    torch._check(len(start) == batch, lambda: "start needs one entry per sequence")


@torch.library.register_fake("mage::block_attention")
def _block_attention_fake(q, k_ctx, v_ctx, k_own, v_own, block_size, start, scale=None):
    _block_attention_dims(q, k_ctx, k_own, block_size, start)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype))


@torch.library.register_fake("mage::block_attention_backward")
def _block_attention_backward_fake(dout, q, k_ctx, v_ctx, k_own, v_own, out, lse, block_size,
                                   start, scale=None):
    _block_attention_dims(q, k_ctx, k_own, block_size, start)
    return (q.new_empty(q.shape), k_ctx.new_empty(k_ctx.shape), v_ctx.new_empty(v_ctx.shape),
            k_own.new_empty(k_own.shape), v_own.new_empty(v_own.shape))
