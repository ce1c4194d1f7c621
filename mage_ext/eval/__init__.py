"""Evaluation: recall of selections against the exact per-step oracle, cache traffic, tasks."""
