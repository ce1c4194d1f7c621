"""PolicyConfig: every option of the attention policy in one validated object.

One config drives every method (exact, mage, quest, tidal, sparsed and the controls) so baselines
run in the same loop at the same budget. Defaults follow the spec (docs: ../shared/design/mage-spec.md sections 2, 6).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence, Tuple, Union

METHODS = ("exact", "mage", "quest", "tidal", "sparsed", "window", "random", "recent")
COMMIT_MODES = ("sparse", "exact")


@dataclass(frozen=True)
class PolicyConfig:
    method: str = "mage"
    # Budget: cache entries read per (layer, KV head) at sparse steps. An int, or one value per layer.
    k: Union[int, Tuple[int, ...]] = 512
    adaptive: bool = False            # spec 2.7: per-layer budgets from first-step dispersion
    k_min: int = 32                   # adaptive: smallest per-layer budget
    dense_layers: int = 2             # the first dense_layers layers always read the whole cache
    n_sink: int = 0                   # first cache positions always kept (count towards k)
    n_recent: int = 0                 # last cache positions always kept (count towards k)
    commit_attention: str = "sparse"  # attention of the forward that writes a finished block
    # Quest (arXiv 2406.10774)
    quest_page_size: int = 16
    quest_min_pages: int = 3
    # Tidal (arXiv 2410.05076): layers that run full attention and select for the layers after them
    tidal_selection_layers: Tuple[int, ...] = (2,)
    # SparseD (arXiv 2509.24014)
    sparsed_skip: float = 0.2         # share of a block's steps with full attention
    sparsed_kv_block: int = 32        # pooling block of the cache (128 in the paper, 32 for short)
    sparsed_steps: int = 8            # steps per block assumed when the loop cannot know (threshold)
    # window: the last `window` cache entries only (with dense_layers=0: the evaluation's control)
    window: int = 32
    # random (a matched control of MAGE, selectors/controls.py): seed of the per-block draws
    selection_seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"PolicyConfig.method: unknown policy '{self.method}', expected one of {METHODS}")
        if self.commit_attention not in COMMIT_MODES:
            raise ValueError(f"PolicyConfig.commit_attention: expected one of {COMMIT_MODES}, "
                             f"got '{self.commit_attention}'")
        ks = self.k if isinstance(self.k, (tuple, list)) else (self.k,)
        if isinstance(self.k, list):
            object.__setattr__(self, "k", tuple(self.k))
        for v in ks:
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"PolicyConfig.k: budgets must be positive integers, got {self.k!r}")
        for name in ("k_min", "quest_page_size", "quest_min_pages", "sparsed_kv_block", "sparsed_steps",
                     "window"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"PolicyConfig.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("dense_layers", "n_sink", "n_recent", "selection_seed"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"PolicyConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.sparsed_skip <= 1.0:
            raise ValueError(f"PolicyConfig.sparsed_skip: must lie in [0, 1], got {self.sparsed_skip}")
        object.__setattr__(self, "tidal_selection_layers", tuple(int(x) for x in self.tidal_selection_layers))
        if any(x < 0 for x in self.tidal_selection_layers):
            raise ValueError("PolicyConfig.tidal_selection_layers: layer indices must be >= 0, "
                             f"got {self.tidal_selection_layers}")
        if min(ks) < self.n_sink + self.n_recent:
            raise ValueError(f"PolicyConfig: n_sink + n_recent ({self.n_sink + self.n_recent}) must "
                             f"not exceed the budget k ({min(ks)})")

    def budget(self, layer: int, n_layers: int) -> int:
        """The configured budget of ``layer`` (before any adaptive redistribution)."""
        if isinstance(self.k, tuple) and len(self.k) > 1:
            if len(self.k) != n_layers:
                raise ValueError(f"PolicyConfig.k: {len(self.k)} per-layer budgets for a model "
                                 f"with {n_layers} layers")
            return self.k[layer]
        return self.k[0] if isinstance(self.k, tuple) else self.k

    def is_dense_layer(self, layer: int) -> bool:
        return self.method == "exact" or layer < self.dense_layers

    def replace(self, **changes) -> "PolicyConfig":
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PolicyConfig: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Adaptive budget (spec 2.7). Pure functions on plain numbers so the rule is testable by hand.


def dispersion_score(union_sizes: Sequence[float], coverages: Sequence[float]) -> float:
    """Layer score s_l = max_h |U_h| * (1 - log p_h) over the KV heads h of one layer.

    ``union_sizes[h]`` is |U_h| (size of the union of the per-query top-k sets of head h) and
    ``coverages[h]`` is p_h (the attention mass the block's queries put on U_h, in [0, 1]).
    A head with an empty union contributes 0 (its log term is undefined and it needs no budget).
    """
    import math

    if len(union_sizes) != len(coverages) or not union_sizes:
        raise ValueError("dispersion_score: expected one coverage per head and at least one head, "
                         f"got {len(union_sizes)} sizes and {len(coverages)} coverages")
    best = 0.0
    for u, p in zip(union_sizes, coverages):
        if u <= 0:
            continue
        best = max(best, float(u) * (1.0 - math.log(max(float(p), 1e-30))))
    return best


def adaptive_budgets(layer_scores: Sequence[float], mean_budget: int, k_min: int) -> list:
    """Per-layer budgets k_l = max(k_min, floor(s_l / sum(s) * K * L)) for the L scored layers.

    ``layer_scores`` holds s_l of the L sparse (non-dense) layers; K = ``mean_budget``. When every
    score is 0 (nothing in the cache yet) each layer gets K.

        >>> adaptive_budgets([1.0, 3.0], mean_budget=100, k_min=10)
        [50, 150]
    """
    if mean_budget <= 0 or k_min <= 0:
        raise ValueError(f"adaptive_budgets: mean_budget and k_min must be > 0, got "
                         f"{mean_budget} and {k_min}")
    if any(s < 0 for s in layer_scores):
        raise ValueError(f"adaptive_budgets: layer scores must be >= 0, got {list(layer_scores)}")
    total, n = float(sum(layer_scores)), len(layer_scores)
    if total <= 0.0:
        return [int(mean_budget)] * n
    # multiply before dividing: equal scores give exactly K (1/3 * 21 would floor to 6)
    return [max(int(k_min), int(s * mean_budget * n / total)) for s in layer_scores]
