"""Evaluation: synthetic long-context tasks and the tiny model's vocabulary, the harness
(``python -m mage_ext.eval``), recall against the exact per-step oracle, cache traffic,
LongBench loading and metrics.

Modules are imported explicitly (``from mage_ext.eval import tasks``); this package imports nothing
so that each tool pays only for what it uses.
"""
