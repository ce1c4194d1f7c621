"""Measurement hooks the attention calls at later denoising steps (same interface as RecallMeter).

NeedleMassMeter: per layer, the share of the step's exact block/group-averaged attention mass that
falls on given cache positions (the needle): where in the network the lookup reads the cache.
MeterGroup: several meters behind the one hook the cache offers.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import ops


class NeedleMassMeter:
    def __init__(self, positions: Sequence[Sequence[int]]):
        """positions[b]: the cache positions of sequence b's needle (e.g. its value tokens)."""
        self.positions = [list(p) for p in positions]
        self._acc: dict[int, list[float]] = {}  # layer -> [sum, n]

    def record(self, ctx, q, k_block, v_block, kv, selection) -> None:
        _, _, scores = ops.attention_with_scores(q, kv.k, kv.v, kv.lens, k_block, v_block, ctx.scale)
        scores = scores.float()
        acc = self._acc.setdefault(ctx.layer, [0.0, 0])
        for b, pos in enumerate(self.positions):
            if not pos:
                continue
            idx = torch.tensor(pos, device=scores.device, dtype=torch.long)
            # mass on the needle per KV head, averaged over heads; the per-head maximum would
            # credit one head, the mean says how much of the layer's reading goes there
            acc[0] += float(scores[b][:, idx].sum(-1).mean())
            acc[1] += 1

    def per_layer(self) -> dict:
        return {layer: (s / n if n else None) for layer, (s, n) in sorted(self._acc.items())}


class MeterGroup:
    def __init__(self, *meters):
        self.meters = [m for m in meters if m is not None]

    def record(self, *args) -> None:
        for m in self.meters:
            m.record(*args)


def needle_positions(context: Sequence[int], needle_tokens: Sequence[int]) -> list[int]:
    """Positions in ``context`` holding any of ``needle_tokens`` (the answer's value tokens) and the
    position before each: needles are "K V", and a model that bound V into K's state (through a
    next-token head) reads the key position, not the value's."""
    wanted = set(needle_tokens)
    hits = [i for i, t in enumerate(context) if t in wanted]
    return sorted({p for i in hits for p in (i - 1, i) if p >= 0})

