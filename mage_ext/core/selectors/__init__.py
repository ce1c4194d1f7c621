"""Attention policies behind one interface (see base.py). ``make_selector(config)`` builds one."""
from __future__ import annotations

import importlib

from .base import LayerKV, Selection, Selector, StepContext

# method name -> (module, class); modules are imported on first use.
_REGISTRY = {
    "exact": ("base", "Selector"),
    "mage": ("mage", "MageSelector"),
    "quest": ("quest", "QuestSelector"),
    "tidal": ("tidal", "TidalSelector"),
    "sparsed": ("sparsed", "SparseDSelector"),
    "window": ("window", "WindowSelector"),
    "random": ("controls", "RandomSelector"),
    "recent": ("controls", "RecentSelector"),
}


def make_selector(config) -> Selector:
    """A fresh selector for one generation, from a validated ``PolicyConfig``."""
    if config.method not in _REGISTRY:
        raise ValueError(f"unknown policy '{config.method}', expected one of {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[config.method]
    selector_cls = getattr(importlib.import_module(f".{module}", __name__), cls)
    sel = selector_cls() if selector_cls is Selector else selector_cls(config)
    sel.config = config
    return sel


__all__ = ["LayerKV", "Selection", "Selector", "StepContext", "make_selector"]
