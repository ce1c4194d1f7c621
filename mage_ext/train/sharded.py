"""MAGE-FT over several processes: FSDP2 (torch.distributed.fsdp.fully_shard) data parallelism.

Active whenever torch.distributed is initialised (the CLI does it under torchrun; any world size,
1 included). ``batch_size`` stays the *global* micro-batch: every rank draws the same batch and
noise from the same data position and generator, trains on its rows
``[rank * batch_size / world, (rank + 1) * batch_size / world)`` and normalises by the whole
batch's weight, so the per-rank losses sum to the one-process loss and the gradients are summed
(not averaged) over the ranks. A config therefore means the same run on any number of ranks, and
a checkpoint resumes on another world size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError

# Per-step log fields: summed over ranks (each rank's share of the batch) or averaged.
SUMMED = ("loss", "ce", "kl", "tokens")
AVERAGED = ("set_recall", "mass_recall", "t_select")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    sharded: bool = False    # torch.distributed is initialised: FSDP2

    @classmethod
    def current(cls) -> "Ranks":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), True)
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's sequences of a global micro-batch; ConfigError if they do not split."""
        if batch_size % self.world:
            raise ConfigError(f"config key 'batch_size': {batch_size} sequences per micro-batch "
                              f"(the global batch) do not split over {self.world} ranks; use a "
                              f"multiple of {self.world}")
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def barrier(self) -> None:
        if self.sharded:
            import torch.distributed as dist
            dist.barrier()

    def any(self, flag: bool, device) -> bool:
        """True on every rank if ``flag`` is true on one (a stop request must stop them all)."""
        if not self.sharded:
            return flag
        t = torch.tensor([int(flag)], device=device)
        _all_reduce(t)
        return bool(t.item())

    def reduce_stats(self, rec: dict, device) -> dict:
        """Sums SUMMED and averages AVERAGED fields of a log record over the ranks (None stays
        None: recall is undefined on every rank alike, it depends on the geometry only)."""
        if not self.sharded:
            return rec
        keys = SUMMED + AVERAGED
        t = torch.tensor([math.nan if rec[k] is None else float(rec[k]) for k in keys],
                         dtype=torch.float64, device=device)
        _all_reduce(t)
        out = dict(rec)
        for k, v in zip(keys, t.tolist()):
            if rec[k] is not None:
                out[k] = v if k in SUMMED else v / self.world
        out["tokens"] = int(round(out["tokens"]))
        return out


def _all_reduce(t: torch.Tensor) -> None:
    import torch.distributed as dist
    dist.all_reduce(t)


class LossModule(torch.nn.Module):
    """The FSDP root: ``root(fn)`` runs fn(model) -- the whole MAGE-FT loss (selection, teacher,
    student, the chunked CE / KL through lm_head) -- inside one root forward, so the root's
    parameters (embeddings, final norm, lm_head, tied or not) are gathered for all of it. The
    layout calls the inner transformer directly and lm_head outside any module forward, which
    would bypass the hooks of a causal-LM root. The batch travels in the closure: FSDP would
    move tensor arguments to the device, and the noise is drawn on the CPU."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


def shard(root: LossModule, layers, device, world: int) -> None:
    """fully_shard each decoder layer, then the root, over a 1-D mesh of ``device``'s type.
    Gradients are summed over the ranks: each rank's loss is already its share of the global
    mean. Gloo has no PREMUL_SUM, so the sum is forced to a plain SUM reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def clip_grad_norm(params, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for plain and sharded (DTensor) gradients: the norm of
    sharded gradients is a DTensor of partial sums, made whole before the clip."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    norm = float(norm)
    coef = max_norm / (norm + 1e-6)   # as clip_grad_norm_
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return norm
