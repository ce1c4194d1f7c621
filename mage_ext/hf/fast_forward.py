"""A lean forward of transformers' Qwen2 / Qwen3 causal LMs for the block loop.

The stock module tree issues ~40 small kernels per layer (casts, norms, rotary halves, splits,
transposes); at 32 tokens a forward most of a graphed step's time went there, not into the GEMMs
or the attention. This forward reads the same parameters and runs a layer as

    add + RMSNorm -> one QKV GEMM -> [q/k RMSNorm] + RoPE into the attention layout
    -> cache.attend (the policy's attention op) -> O GEMM -> add + RMSNorm
    -> one gate|up GEMM -> SiLU * up -> down GEMM

with the fused ops of mage_ext.ops (rms_norm, qkv_rope, silu_mul: CPU and CUDA kernels that
reproduce the transformers modules' rounding) and its GEMMs through ops.linear (cuBLAS; the
experimental few-row kernel with MAGE_SKINNY_GEMM=on). The q/k/v and gate/up weights are
concatenated once per model and the modules' own parameters re-pointed at views of the
concatenation, so no weight is held twice and the stock forward keeps working on the same storage.

Tensor parallelism (a model sharded by mage_ext/hf/tensor_parallel.py): the same forward on this
rank's shards (its query / KV heads and MLP columns, read as local tensors of the DTensor
parameters), with an all-reduce after the O GEMM and after the down GEMM.

``FastForward.unsupported(model)`` says why a model cannot take this path (then ``HFForward``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .tensor_parallel import group_of, local

_SUPPORTED = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class _Layer:
    in_norm: Tensor
    qkv_w: Tensor
    qkv_b: Optional[Tensor]
    q_norm: Optional[Tensor]
    k_norm: Optional[Tensor]
    o_w: Tensor
    post_norm: Tensor
    gate_up_w: Tensor
    down_w: Tensor


def unsupported(model) -> Optional[str]:
    """Why ``model`` cannot run the lean forward, or None."""
    name = type(model).__name__
    if name not in _SUPPORTED:
        return f"{name} is not one of {_SUPPORTED}"
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act '{cfg.hidden_act}' (the fused MLP is SiLU)"
    rotary = model.model.rotary_emb
    if getattr(rotary, "rope_type", "default") != "default" or \
            float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        return "a scaled rotary embedding (only the default RoPE is fused)"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                   mlp.up_proj, mlp.down_proj)
        if any(type(m) is not torch.nn.Linear for m in linears):
            return "a projection that is not a plain nn.Linear (e.g. a LoRA adapter)"
        if attn.o_proj.bias is not None or mlp.gate_proj.bias is not None:
            return "biases on o_proj or the MLP"
    return None


def _fuse_rows(linears) -> tuple:
    """One weight (and bias) stacking the linears' output rows; the linears' parameters become
    views of it. Done once per model: a later call finds the views still in place and reuses
    them (if the model moved or was reloaded since, it fuses again). Sharded linears
    (column-wise DTensors) fuse their local rows and stay DTensors over views of them."""
    kept = getattr(linears[0], "_mage_fused_rows", None)
    if kept is not None and _still_views(linears, *kept):
        return kept
    fused = []
    for attr in ("weight", "bias"):
        params = [getattr(m, attr) for m in linears]
        if all(p is None for p in params):
            fused.append(None)
            continue
        rows = [local(m.weight).shape[0] for m in linears]
        parts = [(local(p) if p is not None else local(linears[0].weight).new_zeros(n)).detach()
                 for p, n in zip(params, rows)]
        whole = torch.cat(parts, 0)
        start = 0
        for m, n in zip(linears, rows):
            _repoint(m, attr, whole[start:start + n])
            start += n
        fused.append(whole)
    linears[0]._mage_fused_rows = tuple(fused)
    return tuple(fused)


def _repoint(m, attr: str, view: Tensor) -> None:
    """Makes ``m.<attr>`` (its local shard when sharded) the storage of ``view``."""
    p, weight = getattr(m, attr), m.weight
    if local(weight) is weight:  # a plain module
        if p is None:
            setattr(m, attr, torch.nn.Parameter(view, requires_grad=False))
        else:
            p.data = view
        return
    from torch.distributed.tensor import DTensor

    like = weight if p is None else p  # column-wise: weight and bias both Shard(0)
    shard = DTensor.from_local(view, like.device_mesh, like.placements, run_check=False)
    grad = False if p is None else p.requires_grad
    setattr(m, attr, torch.nn.Parameter(shard, requires_grad=grad))


def _still_views(linears, weight: Tensor, bias: Optional[Tensor]) -> bool:
    for whole, attr in ((weight, "weight"), (bias, "bias")):
        if whole is None:
            continue
        offset = 0
        for m in linears:
            p = local(getattr(m, attr))
            if p is None or p.data_ptr() != whole.data_ptr() + offset * whole.element_size():
                return False
            offset += p.numel()
    return True


class FastForward:
    def __init__(self, model, cache):
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"FastForward: {why}")
        self.model, self.cache = model, cache
        cfg = model.config
        self.tp = group_of(model)  # None: one process holds every head
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        size = 1 if self.tp is None else self.tp.size
        self.hq, self.hkv = cfg.num_attention_heads // size, cfg.num_key_value_heads // size
        self.eps = float(cfg.rms_norm_eps)
        self.scale = self.d ** -0.5
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.inv_freq = inner.rotary_emb.inv_freq.float()
        self.layers = []
        with torch.no_grad():
            for layer in inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv_w, qkv_b = _fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj])
                gate_up_w, _ = _fuse_rows([mlp.gate_proj, mlp.up_proj])
                q_norm = getattr(attn, "q_norm", None)
                k_norm = getattr(attn, "k_norm", None)
                self.layers.append(_Layer(
                    layer.input_layernorm.weight, qkv_w, qkv_b,
                    None if q_norm is None else q_norm.weight,
                    None if k_norm is None else k_norm.weight,
                    local(attn.o_proj.weight), layer.post_attention_layernorm.weight, gate_up_w,
                    local(mlp.down_proj.weight)))

    def __call__(self, ids: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        """Logits of every position [batch, n, V] (keep None) or of position keep[b] of each
        sequence [batch, 1, V]."""
        batch, n = ids.shape
        pos = self.cache.cache_lens.long().unsqueeze(1) + torch.arange(n, device=ids.device)
        x = F.embedding(ids, self.embed)
        residual = None
        for i, w in enumerate(self.layers):
            h, residual = ops.rms_norm(x, w.in_norm, self.eps, residual)
            qkv = ops.linear(h, w.qkv_w, w.qkv_b)
            q, k, v = ops.qkv_rope(qkv, pos, self.inv_freq, self.hq, self.hkv, self.d,
                                   w.q_norm, w.k_norm, self.eps)
            a = self.cache.attend(i, q, k, v, self.scale)          # [batch, Hq, n, d]
            x = self._reduce(ops.linear(a.transpose(1, 2).reshape(batch, n, self.hq * self.d),
                                        w.o_w))
            h, residual = ops.rms_norm(x, w.post_norm, self.eps, residual)
            x = self._reduce(ops.linear(ops.silu_mul(ops.linear(h, w.gate_up_w)), w.down_w))
        if keep is not None:  # the final norm is per position: keep only what is needed
            rows = torch.arange(batch, device=ids.device)
            x, residual = x[rows, keep].unsqueeze(1), residual[rows, keep].unsqueeze(1)
        h, _ = ops.rms_norm(x, self.final_norm, self.eps, residual)
        return ops.linear(h, self.lm_head)

    def _reduce(self, partial: Tensor) -> Tensor:
        """The sum over ranks of a row-parallel GEMM's partial outputs (identity on one rank)."""
        return partial if self.tp is None else self.tp.all_reduce(partial)
