"""The transformers Qwen2 / Qwen3 elementwise steps in plain torch, with their exact rounding.

The fast forward (fast_forward.py) calls these three steps; they are the semantics the fused
ops reproduce and the fallback where the fused ops are not built.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float,
             residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual): Qwen2RMSNorm after the residual add."""
    if residual is not None:
        x = residual + x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qkv_rope(qkv: Tensor, positions: Tensor, inv_freq: Tensor, n_q_heads: int, n_kv_heads: int,
             head_dim: int, q_norm: Optional[Tensor] = None, k_norm: Optional[Tensor] = None,
             eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """qkv [batch, n, (Hq + 2 Hkv) d] -> q [batch, Hq, n, d], k, v [batch, Hkv, n, d]:
    Qwen3's per-head q/k RMSNorm where given, then the default RoPE at ``positions``."""
    batch, n, _ = qkv.shape
    q, k, v = qkv.split([n_q_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], -1)
    q = q.view(batch, n, n_q_heads, head_dim)
    k = k.view(batch, n, n_kv_heads, head_dim)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)[0]
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)[0]
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.view(batch, n, n_kv_heads, head_dim).transpose(1, 2)
    freqs = positions.float().unsqueeze(-1) * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(qkv.dtype).unsqueeze(1), emb.sin().to(qkv.dtype).unsqueeze(1)
    q = (q * cos) + (_rotate_half(q) * sin)
    k = (k * cos) + (_rotate_half(k) * sin)
    return q.contiguous(), k.contiguous(), v.contiguous()


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim (Qwen2MLP's act)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
