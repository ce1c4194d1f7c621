"""CUDA-graph replay of the forwards of a block.

At long context a Python forward of a 28-layer model takes ~20 ms to issue on the host, far more
than the GPU needs for it. The forwards of a block come in three kinds whose work is the same
every time (the ids change in place, the cache lengths change in place, MAGE's selection is
copied into fixed tensors each block): the selecting first step, the later steps and the commit.
``StepGraph`` runs a kind's first call eagerly (warm-up), captures the second and replays it from
then on, across blocks; the decoding rule of the step runs inside the graph too, on fixed buffers.

Eligible (``obstacle``): a CUDA model, ``exact`` or non-adaptive ``mage`` policies, no recall
meter (it reads results on the host every layer), greedy decoding or sampling from torch's
default CUDA generator (a user generator is not captured), and under tensor parallelism the
fused forward (its NCCL all-reduces are captured; the stock forward's DTensor hooks are not
meant for capture). The ops allocate nothing outside torch's caching allocator and never
synchronise, which is what capture needs.
"""
from __future__ import annotations

import gc
from typing import Callable, Optional

import torch


def obstacle(policy, device: torch.device, recall_meter, temperature: float = 0.0,
             generator=None, stock_tp: bool = False) -> Optional[str]:
    """Why the forwards cannot be replayed as CUDA graphs, or None when they can."""
    if policy.method not in ("exact", "mage") or policy.adaptive:
        return ("supports the exact and mage (fixed-budget) policies, got method "
                f"'{policy.method}', adaptive={policy.adaptive}")
    if recall_meter is not None:
        return "cannot run a recall meter (it reads results on the host every layer)"
    if device.type != "cuda":
        return f"needs a model on a CUDA device, got {device}"
    if temperature > 0 and generator is not None:
        return "samples from torch's default CUDA generator only; pass generator=None"
    if stock_tp:
        return ("needs the fused forward under tensor parallelism (the stock forward's DTensor "
                "hooks are not captured; fused=False was asked)")
    return None


def graph_kind(policy, kind: str) -> str:
    """The graph a forward kind replays: exact attention does the same work at every denoising
    step, so its first and later steps share one graph."""
    if policy.method == "exact" and kind in ("first", "later"):
        return "denoise"
    return kind


class StepGraph:
    """Warm-up, capture, replay of ``fn()``, a function of fixed buffers (nothing returned)."""

    def __init__(self, fn: Callable[[], None], device: torch.device, pool=None):
        self.fn, self.device, self.pool = fn, device, pool
        self.stream = None
        self.graph = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        main = torch.cuda.current_stream(self.device)
        if self.stream is None:
            # Warm-up on the stream the capture will use (torch's recipe: lazy initialisation
            # such as cuBLAS workspaces happens outside the capture); it is the step itself.
            self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                self.fn()
            main.wait_stream(self.stream)
            return
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            self.stream.wait_stream(main)
            # torch.cuda.graph collects garbage before capturing; keep the collector off during
            # the capture too: a collection there can run destructors of earlier CUDA objects
            # (events, graphs), calls a capture forbids, which invalidate the capture.
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream):
                    self.fn()
            finally:
                if gc_was_enabled:
                    gc.enable()
            main.wait_stream(self.stream)
        self.graph.replay()
