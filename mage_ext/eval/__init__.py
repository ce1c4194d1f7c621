"""Evaluation: synthetic long-context tasks, the tiny model's vocabulary, LongBench loading and metrics.

Modules are imported explicitly (``from mage_ext.eval import tasks``); this package imports nothing
so that each tool pays only for what it uses.
"""
