"""Recall of a step's selection against the exact per-step oracle (spec section 4).

O = top-k of the exact block/group-averaged scores at this step (``ops.attention_with_scores`` +
``ops.topk_select``), T = the selection the step read. Per (sequence, KV head):
  set recall  = |T & O| / k     (the spec's definition, section 4; k = the oracle budget)
  mass recall = sum of the exact scores inside T / sum over the whole cache
                (the share of this step's cache attention mass that the selection read).
  oracle mass = the same for O: the most mass any selection of k entries can read at this
                step (mass recall's ceiling; below 1 where attention is spread thin).
Where the cache holds fewer than k entries, O is the whole cache and a selection that reads all
of it scores length / k, not 1: set recall is the spec's |T & O| / k at every length (the paper's
numbers are computed that way; dividing by |O| = min(k, length) would report 1.0 there). Mass
recall is the measure that stays meaningful at short contexts. With k = None each row's oracle
has the selection's own size (counts), so both readings agree.
Undefined values (an empty cache, k = 0) are NaN and left out of every mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .. import ops
from ..core.selectors.base import LayerKV, Selection, StepContext


@dataclass
class StepRecall:
    set_recall: Tensor   # float64 [batch, Hkv]
    mass_recall: Tensor  # float64 [batch, Hkv]
    oracle_mass: Tensor  # float64 [batch, Hkv]: mass recall of O itself (the ceiling)


def membership(indices: Tensor, counts: Tensor, capacity: int) -> Tensor:
    """bool [batch, Hkv, capacity]: True at indices[b, h, :counts[b, h]]."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    slot = torch.where(valid, indices.long(), torch.full_like(indices, capacity, dtype=torch.long))
    mask = torch.zeros(*indices.shape[:2], capacity + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(2, slot, True)[..., :capacity]


def _check_selection(selection: Selection, batch: int, hkv: int) -> None:
    if not isinstance(selection, Selection):
        raise TypeError(f"selection: expected a Selection or None, got {type(selection).__name__}")
    ind, cnt = selection.indices, selection.counts
    if ind.dim() != 3 or tuple(ind.shape[:2]) != (batch, hkv):
        raise ValueError(f"selection.indices: expected [batch={batch}, Hkv={hkv}, k], got "
                         f"{tuple(ind.shape)}")
    if tuple(cnt.shape) != (batch, hkv):
        raise ValueError(f"selection.counts: expected [batch={batch}, Hkv={hkv}], got "
                         f"{tuple(cnt.shape)}")


def oracle_recall(q: Tensor, k_block: Tensor, v_block: Tensor, kv: LayerKV,
                  selection: Optional[Selection], k: Union[int, Tensor, None] = None,
                  scale: Optional[float] = None) -> Optional[StepRecall]:
    """Set and mass recall of ``selection`` at this step; None for a dense step (selection None).

    k: the oracle's budget: an int, an int tensor [batch, Hkv], or None for the selection's own
    counts (each row is compared with an oracle of its own size).
    """
    if selection is None:
        return None
    batch, hkv, capacity, _ = kv.k.shape
    _check_selection(selection, batch, hkv)
    if k is None:
        ks = selection.counts.long()
    elif isinstance(k, Tensor):
        if tuple(k.shape) != (batch, hkv):
            raise ValueError(f"k: expected an int or a tensor [batch={batch}, Hkv={hkv}], got "
                             f"{tuple(k.shape)}")
        ks = k.long()
    else:
        if int(k) <= 0:
            raise ValueError(f"k: the oracle budget must be > 0, got {k}")
        ks = torch.full((batch, hkv), int(k), dtype=torch.long)
    budget = ks.to(kv.k.device).double()  # the divisor of set recall (the spec's k)
    ks = ks.to(kv.k.device).clamp(0, capacity)  # topk_select wants k <= capacity
    _, _, scores = ops.attention_with_scores(q, kv.k, kv.v, kv.lens, k_block, v_block, scale)

    oracle = torch.zeros(batch, hkv, capacity, dtype=torch.bool, device=scores.device)
    for kk in ks.unique().tolist():  # topk_select takes one k: one call per distinct budget
        if kk > 0:
            rows = ks == kk
            oracle[rows] = membership(*ops.topk_select(scores, kv.lens, kk), capacity)[rows]
    chosen = membership(selection.indices.to(scores.device), selection.counts.to(scores.device),
                        capacity)

    n_oracle = oracle.sum(-1).double()
    hits = (oracle & chosen).sum(-1).double()
    nan = torch.full_like(n_oracle, float("nan"))
    set_recall = torch.where(n_oracle > 0, hits / budget.clamp(min=1), nan)
    s = scores.double()
    total = s.sum(-1)
    share = lambda members: torch.where(  # noqa: E731
        total > 0, (s * members).sum(-1) / torch.where(total > 0, total, 1.0), nan)
    return StepRecall(set_recall.cpu(), share(chosen).cpu(), share(oracle).cpu())


METRICS = ("set_recall", "mass_recall", "oracle_mass")  # StepRecall's fields, as averaged


class RecallMeter:
    """Accumulates recall per (layer, KV head, step) over a generation; see ``summary()``.

    The loop calls ``record`` for every attention call of denoise steps >= 1; dense calls
    (selection None), commit forwards and steps below ``min_step`` are skipped. k: the oracle
    budget (None = each selection's own counts).
    """

    def __init__(self, k: Optional[int] = None, min_step: int = 1):
        if k is not None and int(k) <= 0:
            raise ValueError(f"k: the oracle budget must be > 0 or None, got {k}")
        self.k, self.min_step = k, int(min_step)
        # per (layer, head, step): [sum, n] for each of METRICS, flattened
        self._acc: dict[tuple[int, int, int], list[float]] = {}

    def record(self, ctx: StepContext, q: Tensor, k_block: Tensor, v_block: Tensor,
               kv: LayerKV, selection: Optional[Selection]) -> Optional[StepRecall]:
        if selection is None or ctx.phase != "denoise" or ctx.step < self.min_step:
            return None
        r = oracle_recall(q, k_block, v_block, kv, selection, self.k, ctx.scale)
        for h in range(r.set_recall.shape[1]):
            acc = self._acc.setdefault((ctx.layer, h, ctx.step), [0.0, 0] * len(METRICS))
            for j, name in enumerate(METRICS):
                vals = getattr(r, name)[:, h]
                ok = ~vals.isnan()
                acc[2 * j] += float(vals[ok].sum())
                acc[2 * j + 1] += int(ok.sum())
        return r

    def summary(self) -> dict:
        """{'set_recall', 'mass_recall', 'oracle_mass', 'n', 'per_layer': {layer: {...}},
        'records': [...]}.

        Overall and per-layer values are means over every recorded (sequence, KV head, step)
        (layer too, for the overall ones); None where nothing was recorded. Only layers that
        made a selection are recorded, so dense layers never enter the means.
        """
        def means(acc) -> dict:
            out = {name: acc[2 * i] / acc[2 * i + 1] if acc[2 * i + 1] else None
                   for i, name in enumerate(METRICS)}
            return dict(out, n=acc[1])

        records, layers, total = [], {}, [0.0, 0] * len(METRICS)
        for (layer, head, step), acc in sorted(self._acc.items()):
            records.append({"layer": layer, "head": head, "step": step, **means(acc)})
            for dst in (layers.setdefault(layer, [0.0, 0] * len(METRICS)), total):
                for i, v in enumerate(acc):
                    dst[i] += v
        per_layer = {layer: means(a) for layer, a in layers.items()}
        return dict(means(total), per_layer=per_layer, records=records)
