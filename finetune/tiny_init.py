"""Optional initialisation of an induction-circuit skeleton in a stock Qwen2 model.

Nothing here changes the architecture: the shipped model is plain Qwen2, these are starting weights.
Why: retrieval needs two composed heads (bind key and value, then match the asked key), and from a
random start a small stock model sat at chance for >1000 steps in our runs (the earlier H200 model only
learned it with a non-Qwen2 "lag" embedding).

* position heads: Qwen2 has q/k biases. A constant query bias q and key bias k = (a, 0) on the highest
  RoPE frequencies score query position m against key position n as sum_j a^2 cos((n - m - o) theta_j)
  when q is k rotated by o*theta_j: the head attends to the token at offset o (-1 previous, +1 next;
  +1 works in the clean copy, where a block is bidirectional, so a key reads its value).
* match heads: query and key weights share one random projection on the lowest RoPE frequencies
  (rotation < 0.3 rad over 16K positions), so a token attends to earlier copies of itself; biases
  q = -k on the highest frequencies score -a^2 sum_j cos((n - m) theta_j), lowest at the token itself.
"""
from __future__ import annotations

import math

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


@torch.no_grad()
def init_match_heads(model, heads, scale: float = 2.0, n_freq: int = 8, seed: int = 0,
                     local_bias: float = 3.0, n_local: int = 4) -> None:
    """heads: [{"layer": l, "q_head": h}]; the query and key share a projection on low frequencies,
    and biases q = -k on the n_local highest frequencies push attention away from the token itself
    and its neighbours (a token matches itself best otherwise)."""
    cfg = model.config
    d, group = _dims(cfg)
    if not 0 < n_freq <= d // 2:
        raise ValueError(f"n_freq must be in (0, {d // 2}], got {n_freq}")
    g = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.arange(d // 2 - n_freq, d // 2), torch.arange(d - n_freq, d)])
    for spec in heads:
        _check_head(cfg, spec)
        attn = model.model.layers[spec["layer"]].self_attn
        h, kv = spec["q_head"], spec["q_head"] // group
        proj = torch.randn(len(rows), cfg.hidden_size, generator=g) * scale / math.sqrt(cfg.hidden_size)
        attn.q_proj.weight[h * d + rows] = proj.to(attn.q_proj.weight.dtype)
        attn.k_proj.weight[kv * d + rows] = proj.to(attn.k_proj.weight.dtype)
        attn.q_proj.bias[h * d + rows] = 0
        attn.k_proj.bias[kv * d + rows] = 0
        local = torch.arange(n_local)
        attn.q_proj.bias[h * d + local] = -local_bias
        attn.k_proj.bias[kv * d + local] = local_bias


def apply(model, spec: dict) -> None:
    """Apply a recipe's "init" section: {"position_heads": {...}, "match_heads": {...}}."""
    unknown = set(spec) - {"position_heads", "match_heads"}
    if unknown:
        raise ValueError(f"recipe init has unknown keys {sorted(unknown)}")
    if "position_heads" in spec:
        init_position_heads(model, **spec["position_heads"])
    if "match_heads" in spec:
        init_match_heads(model, **spec["match_heads"])
