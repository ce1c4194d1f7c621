"""CUDA-graph replay of the denoising forwards whose work is the same at every step.

At long context a Python forward of a 28-layer model takes ~20 ms to issue on the host, far more
than the GPU needs for it, so the step is host-bound. The later denoising steps of a block (all
denoising steps under exact attention) run the same kernels on the same tensors: the ids change,
the cache lengths change in place, and MAGE's selection is copied into fixed tensors each block.
``StepGraph`` runs the first such forward eagerly (warm-up), captures the second and replays it
from then on, across blocks.

Eligible (``check``): a CUDA model, ``exact`` or non-adaptive ``mage`` policies, no recall meter
(it reads results on the host). The ops allocate nothing outside torch's caching allocator and
never synchronise, which is what capture needs.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch
from torch import Tensor


def check(policy, device: torch.device, recall_meter) -> None:
    """Raises a ValueError naming what stands in the way of ``cuda_graphs=True``."""
    if policy.method not in ("exact", "mage") or policy.adaptive:
        raise ValueError("generate: cuda_graphs=True supports the exact and mage (fixed-budget) "
                         f"policies, got method '{policy.method}', adaptive={policy.adaptive}")
    if recall_meter is not None:
        raise ValueError("generate: cuda_graphs=True cannot run a recall meter (it reads results "
                         "on the host every layer); pass recall_meter=None")
    if device.type != "cuda":
        raise ValueError(f"generate: cuda_graphs=True needs a model on a CUDA device, got {device}")


def graphed_step(policy, step: int) -> bool:
    """True for the forwards the graph replays: every denoising step under exact attention,
    the later ones (not the block's selecting first step) under MAGE."""
    return policy.method == "exact" or step >= 1


class StepGraph:
    """Warm-up, capture, replay of ``forward(ids) -> logits`` with ids of one fixed shape."""

    def __init__(self, forward: Callable[[Tensor], Tensor]):
        self.forward = forward
        self.stream = None
        self.graph = None
        self.ids = None
        self.logits = None

    def __call__(self, ids: Tensor) -> Tensor:
        """The step's logits (a fresh tensor: the graph's own output is overwritten by replays)."""
        main = torch.cuda.current_stream(ids.device)
        if self.stream is None:
            # Warm-up on the stream the capture will use (torch's recipe: lazy initialisation
            # such as cuBLAS workspaces happens outside the capture); its logits are the step's.
            self.stream = torch.cuda.Stream(ids.device)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                logits = self.forward(ids)
            main.wait_stream(self.stream)
            torch.cuda.synchronize(ids.device)
            return logits
        if self.graph is None:
            self.ids = ids.clone()
            self.graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(ids.device)
            # torch.cuda.graph collects garbage before capturing; keep the collector off during
            # the capture too: a collection there can run destructors of earlier CUDA objects
            # (events, graphs), calls a capture forbids, which invalidate the capture.
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(self.graph, stream=self.stream):
                    self.logits = self.forward(self.ids)
            finally:
                if gc_was_enabled:
                    gc.enable()
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits.clone()
