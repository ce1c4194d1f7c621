"""Optional initialisation of previous-token heads in a stock Qwen2 model (no architecture change).

A Qwen2 attention head with a large constant query bias q and key bias k = R(theta) q on its highest
RoPE frequencies scores position n against query position m as sum_j a^2 cos(theta_j (n - m + 1)):
largest at n = m - 1. Training starts with a head that reads the previous token -- the first half of
the induction circuit that retrieval needs, which the earlier byte/word-level runs only got from a
non-Qwen2 "lag" embedding. The weights stay trainable; the shipped model is plain Qwen2.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def init_prev_token_heads(model, layers=(0,), q_heads=(0,), bias: float = 6.0, n_freq: int = 6) -> None:
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    theta = _rope_theta(cfg)
    if n_freq > d // 2:
        raise ValueError(f"n_freq must be <= head_dim/2 = {d // 2}, got {n_freq}")
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)     # HF default RoPE frequencies
    for li in layers:
        attn = model.model.layers[li].self_attn
        for h in q_heads:
            kv = h // group
            q = torch.zeros(d, dtype=torch.float64)
            k = torch.zeros(d, dtype=torch.float64)
            j = torch.arange(n_freq)
            q[j] = bias                                   # pair (j, j + d/2) = (a, 0)
            k[j] = bias * torch.cos(inv[j])               # rotated by +theta_j: peak at offset -1
            k[j + d // 2] = bias * torch.sin(inv[j])
            attn.q_proj.bias[h * d:(h + 1) * d] = q.to(attn.q_proj.bias.dtype)
            attn.k_proj.bias[kv * d:(kv + 1) * d] = k.to(attn.k_proj.bias.dtype)
            # let the constant terms dominate the start: the query/key weights of this head begin small
            attn.q_proj.weight[h * d:(h + 1) * d] *= 0.1
            attn.k_proj.weight[kv * d:(kv + 1) * d] *= 0.1


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
