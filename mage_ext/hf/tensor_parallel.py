"""Tensor-parallel inference of Qwen2 / Qwen3 causal LMs over torch.distributed (NCCL / gloo).

    torchrun --nproc-per-node 2 -m mage_ext.generate --model DIR --prompt "..."
    # or, on every rank after torch.distributed.init_process_group(...):
    res = generate(lm, None, prompts)     # tp=None: sharded over the world when it has > 1 rank

``shard_model(model, tp)`` splits each decoder layer the Megatron way with PyTorch's own
tensor-parallel API (``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel``; the
plan is transformers' ``base_model_tp_plan`` for Qwen2 / Qwen3):

* q/k/v_proj column-wise: rank r of n keeps KV heads [r Hkv/n, (r+1) Hkv/n) and the query heads
  of their groups (contiguous row blocks line up with GQA groups), so its KV cache, selector
  and attention ops see only its heads and attention needs no communication;
* o_proj row-wise: each rank's partial sum, then one all-reduce;
* gate/up_proj column-wise, down_proj row-wise: one all-reduce;
* embedding, norms and lm_head replicated.

The vocabulary is replicated rather than sharded, the simpler of the two correct layouts: every
rank computes the same logits from the same residual stream, so the decoding of core/loop.py
(sampling, top-p, confidences: it needs whole rows of logits) runs unchanged and replicated
with no further collective. A vocabulary-sharded head would need an all-gather of the logits
every step ([batch, block, V]: 156 MB at batch 16 for a 152K vocabulary in bf16) or a
distributed sampler, to save half of the head's GEMM, about 7% of a 7B forward's FLOPs; the
all-gather would take back much of that. The cost: the embedding and head are held on every rank
(2.2 GB for a 7B model with an untied head).

Why DTensor on the transformers modules rather than a private copy of sliced weights: the stock
forward (``HFForward``) runs sharded as it is (the row-wise hooks all-reduce), the lean forward
(``FastForward``) reads the local shards (``local``) and all-reduces itself, both on the same
storage, and a training step runs on the sharded modules as they are: DTensor's autograd
all-reduces the input gradients of the column-wise projections, and ``shard_model`` sums the
gradients of the per-head norms over the ranks, so a sharded backward gives the gradients of
one process (tests/python/test_tensor_parallel.py). FSDP2 composes with it on a 2-D mesh
(``shard_model(model, mesh["tp"])``, then ``fully_shard`` over ``mesh["dp"]``).

Every rank must hold the same weights (load the same checkpoint): each keeps its slice of its
own copy, nothing is sent (``src_data_rank=None``); ``shard_model`` checks a sample of them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.distributed import TPGroup

SUPPORTED = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Per decoder layer (the same as transformers' base_model_tp_plan of Qwen2 / Qwen3).
PLAN = {
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}
_ATTR = "_mage_tp"


def group_of(model) -> Optional[TPGroup]:
    """The TPGroup ``model`` is sharded over, or None."""
    return getattr(model, _ATTR, None)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's shard of a DTensor parameter (same storage); other tensors as they are."""
    if t is not None and _is_dtensor(t):
        return t.to_local()
    return t


def _is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_shardable(model, size: int) -> None:
    """Raises a clear error unless ``model`` splits over ``size`` ranks."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ValueError(f"tensor parallelism: {name} is not one of {SUPPORTED}")
    cfg = model.config
    tp = TPGroup(None, 0, size)
    tp.split(cfg.num_key_value_heads, "the number of KV heads (num_key_value_heads)")
    tp.split(cfg.num_attention_heads, "the number of query heads (num_attention_heads)")
    tp.split(cfg.intermediate_size, "the MLP width (intermediate_size)")
    for i, layer in enumerate(model.model.layers):
        for path in PLAN:
            m = layer.get_submodule(path)
            if type(m) is not torch.nn.Linear:
                raise ValueError(f"tensor parallelism: layer {i} {path} is a {type(m).__name__}, "
                                 "not a plain nn.Linear (merge adapters such as LoRA first)")


def shard_model(model, tp=None) -> TPGroup:
    """Shards ``model`` in place over ``tp``: None (the whole world), a ProcessGroup or a 1-D
    DeviceMesh. Call on every rank of the group. Idempotent for the same group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("tensor parallelism needs torch.distributed to be initialised "
                         "(torch.distributed.init_process_group, e.g. under torchrun)")
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(tp, DeviceMesh):
        if tp.ndim != 1:
            raise ValueError(f"tensor parallelism: expected a 1-D DeviceMesh, got {tp.ndim}-D "
                             "(pass the tensor-parallel dimension, mesh['tp'])")
        mesh, group = tp, tp.get_group()
    else:
        group = dist.group.WORLD if tp is None else tp
        mesh = None
    current = group_of(model)
    if current is not None:
        if current.group is group or (dist.get_process_group_ranks(current.group)
                                      == dist.get_process_group_ranks(group)):
            return current
        raise ValueError(f"tensor parallelism: the model is already sharded over "
                         f"{current.size} ranks of another group")
    size = dist.get_world_size(group)
    check_shardable(model, size)
    device = next(model.parameters()).device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        raise ValueError(f"tensor parallelism: the NCCL backend needs the model on a GPU, got "
                         f"{device} (use the gloo backend on the CPU)")
    group_tp = TPGroup.of(group)
    group_tp.check_same(_weight_sample(model), "the model's weights (every rank must load the "
                        "same checkpoint)", device)
    if mesh is None:
        mesh = DeviceMesh.from_group(group, device.type)
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {f"model.layers.*.{path}": styles[kind]() for path, kind in PLAN.items()}
    try:  # every rank holds the full weights: keep a slice of them, send nothing
        parallelize_module(model, mesh, plan, src_data_rank=None)
    except TypeError:  # torch < 2.7: no src_data_rank (rank 0's weights are scattered)
        parallelize_module(model, mesh, plan)
    _sum_grads_over_ranks(model, group_tp)
    setattr(model, _ATTR, group_tp)
    return group_tp


def _sum_grads_over_ranks(model, tp: TPGroup) -> None:
    """Training: Qwen3's q_norm / k_norm weights are replicated, but each rank applies them to
    its own heads only, so their gradient is the sum over the ranks (transformers' plan calls
    this "replicated_with_grad_allreduce"). Every other replicated weight acts on the replicated
    residual stream and gets the same gradient on every rank; the sharded ones are DTensors."""
    for layer in model.model.layers:
        for name in ("q_norm", "k_norm"):
            norm = getattr(layer.self_attn, name, None)
            if norm is not None:
                norm.weight.register_hook(lambda g: tp.all_reduce(g.clone()))


def resolve(model, tp) -> Optional[TPGroup]:
    """``generate``'s ``tp`` argument: None (default) keeps the model's sharding, else shards
    over the world when torch.distributed runs with more than one rank, else none; False: no
    tensor parallelism; True: over the world (torch.distributed must run); a ProcessGroup or
    1-D DeviceMesh: over it."""
    import torch.distributed as dist

    current = group_of(model)
    running = dist.is_available() and dist.is_initialized()
    if tp is False:
        if current is not None:
            raise ValueError(f"generate: tp=False, but the model is sharded over {current.size} "
                             "ranks (its weights are partial on each)")
        return None
    if tp is None:
        if current is not None or not running or dist.get_world_size() == 1:
            return current
        return shard_model(model)
    if tp is True:
        if not running:
            raise ValueError("generate: tp=True needs torch.distributed to be initialised "
                             "(torch.distributed.init_process_group, e.g. under torchrun)")
        return current or shard_model(model)
    return shard_model(model, tp)


def _weight_sample(model) -> list:
    """Exact integer checksums of a strided sample of every parameter (order independent, so
    equal on every rank that loaded the same weights, whatever its thread count)."""
    sums = []
    for p in model.parameters():
        flat = local(p).detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        sums.append(int(flat[::step].view(bits).to(torch.int64).sum()))
    return sums
