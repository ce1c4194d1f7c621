"""Optional initialisation of position heads (previous / next token) in a stock Qwen2 model.

Nothing here changes the architecture: the shipped model is plain Qwen2, these are starting weights.
Why: retrieval needs two composed heads (bind key and value, then match the asked key), and from a
random start a small stock model sat at chance for >1000 steps in our runs (the earlier H200 model only
learned it with a non-Qwen2 "lag" embedding).

* position heads: Qwen2 has q/k biases. A constant query bias q and key bias k = (a, 0) on the highest
  RoPE frequencies score query position m against key position n as sum_j a^2 cos((n - m - o) theta_j)
  when q is k rotated by o*theta_j: the head attends to the token at offset o (-1 previous, +1 next;
  +1 works in the clean copy, where a block is bidirectional, so a key reads its value).
The second half (a head matching the asked key) is left to training: a hand-set "same token" head
(shared random q/k projection on low RoPE frequencies) mostly attended to the token itself.
"""
from __future__ import annotations

import torch


def _dims(cfg):
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return d, cfg.num_attention_heads // cfg.num_key_value_heads


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _check_head(cfg, spec):
    if not 0 <= spec["layer"] < cfg.num_hidden_layers:
        raise ValueError(f"init head layer must be in [0, {cfg.num_hidden_layers}), got {spec}")
    if not 0 <= spec["q_head"] < cfg.num_attention_heads:
        raise ValueError(f"init q_head must be in [0, {cfg.num_attention_heads}), got {spec}")


@torch.no_grad()
def init_position_heads(model, heads, bias: float = 6.0, n_freq: int = 6) -> None:
    """heads: [{"layer": l, "q_head": h, "offset": o}]; heads of one KV group share the key bias."""
    cfg = model.config
    d, group = _dims(cfg)
    if not 0 < n_freq <= d // 2:
        raise ValueError(f"n_freq must be in (0, {d // 2}], got {n_freq}")
    inv = _rope_theta(cfg) ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)[:n_freq]
    j = torch.arange(n_freq)
    for spec in heads:
        _check_head(cfg, spec)
        attn = model.model.layers[spec["layer"]].self_attn
        h, kv, o = spec["q_head"], spec["q_head"] // group, spec["offset"]
        q = torch.zeros(d, dtype=torch.float64)
        k = torch.zeros(d, dtype=torch.float64)
        k[j] = bias                                        # RoPE pair (j, j + d/2) = (a, 0)
        q[j] = bias * torch.cos(o * inv)
        q[j + d // 2] = bias * torch.sin(o * inv)
        attn.q_proj.bias[h * d:(h + 1) * d] = q.to(attn.q_proj.bias.dtype)
        attn.k_proj.bias[kv * d:(kv + 1) * d] = k.to(attn.k_proj.bias.dtype)
        attn.q_proj.weight[h * d:(h + 1) * d] *= 0.1       # the constant terms dominate at the start
        attn.k_proj.weight[kv * d:(kv + 1) * d] *= 0.1


def apply(model, spec: dict) -> None:
    """Apply a recipe's "init" section: {"position_heads": {...init_position_heads arguments}}."""
    unknown = set(spec) - {"position_heads"}
    if unknown:
        raise ValueError(f"recipe init has unknown keys {sorted(unknown)}")
    if "position_heads" in spec:
        init_position_heads(model, **spec["position_heads"])
