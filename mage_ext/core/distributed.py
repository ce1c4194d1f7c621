"""Tensor parallelism as the model-agnostic pieces see it: the ranks a model's KV heads are split over.

``TPGroup`` wraps a torch.distributed process group (NCCL on GPUs, gloo on CPUs). Rank r of n
holds KV heads [r * Hkv / n, (r + 1) * Hkv / n) and their query heads, its slice of the KV
cache, and a selector that picks cache entries for those heads only: MAGE's selection is per KV
head, so attention needs no communication. What does cross ranks:

* the forward's two all-reduces per layer (after the attention output projection and after the
  MLP: the Megatron layout; mage_ext/hf/tensor_parallel.py shards the weights);
* per-layer rules over all heads: MAGE's adaptive budgets take the max over a layer's heads
  (``all_reduce(..., "max")``);
* the KV-read share of a generation (a sum over ranks, once at the end).

Everything after the last all-reduce (final norm, lm_head, decoding) is replicated: every rank
holds the same residual stream, so every rank computes the same logits and takes the same
decisions with no further communication. ``check_same`` verifies that once per generation.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class TPGroup:
    group: Any   # torch.distributed.ProcessGroup
    rank: int    # this process's rank within the group
    size: int    # ranks in the group

    @classmethod
    def of(cls, group) -> "TPGroup":
        import torch.distributed as dist

        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def split(self, n: int, what: str) -> int:
        """The share of ``n`` (heads, MLP columns) this rank holds; an error names ``what``
        when n does not split evenly."""
        if n % self.size:
            raise ValueError(f"tensor parallelism over {self.size} ranks: {what} ({n}) is not "
                             f"divisible by {self.size}; use a number of ranks that divides it")
        return n // self.size

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """In place over the group; ``op`` "sum" or "max". Returns ``t``."""
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        dist.all_reduce(t, op=ops[op], group=self.group)
        return t

    def check_same(self, value, what: str, device) -> None:
        """Raises on every rank unless ``value`` (anything with a stable repr: token lists) is
        the same on all ranks. One small all-reduce."""
        h = zlib.crc32(repr(value).encode())
        t = torch.tensor([h, -h], dtype=torch.int64, device=device)
        self.all_reduce(t, "max")
        if int(t[0]) != h or int(t[1]) != -h:
            raise RuntimeError(f"tensor parallelism: the ranks disagree on {what} (rank "
                               f"{self.rank} of {self.size}); the replicated part of the forward "
                               "was not deterministic across ranks")
