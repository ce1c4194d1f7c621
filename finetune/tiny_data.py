"""Training batches for the tiny model: MQAR recall, the synthetic tasks, plain filler.

Each generator returns a `TrainExample` of exactly `length` tokens (a multiple of the block size).
"""
from __future__ import annotations

import random

import torch

from mage_ext.eval import tasks as T
from mage_ext.eval import vocab as V
from mage_ext.train.data import synthetic_example, to_batch


def mqar_example(length: int, rng: random.Random, block_size: int = 32,
                 query_blocks: int = 2, max_pairs: int = 256) -> T.TrainExample:
    """Associative recall: context "k1 v1 k2 v2 ..." (after filler when it holds more than max_pairs
    pairs) then query blocks "k v k v ..." where every v is masked and is the only thing with loss
    (the pairs themselves are random, hence unpredictable)."""
    n_ctx = length - query_blocks * block_size
    if n_ctx < block_size:
        raise ValueError(f"length {length} leaves no context for {query_blocks} query blocks")
    n_pairs = min(n_ctx // 2, max_pairs)
    keys = rng.sample(V.KEYS, n_pairs)
    vals = rng.choices(V.VALUES, k=n_pairs)
    ctx = V.words_of(T.filler(n_ctx - 2 * n_pairs, rng)) + [w for kv in zip(keys, vals) for w in kv]
    n_q = query_blocks * block_size // 2
    asked = [rng.randrange(n_pairs) for _ in range(n_q)]
    qry = [w for i in asked for w in (keys[i], vals[i])]
    tokens = V.ids(ctx + qry)
    n = len(tokens)
    weight = [0.0] * len(ctx) + [float(i % 2) for i in range(len(qry))]
    force = [False] * len(ctx) + [bool(i % 2) for i in range(len(qry))]
    keep = [False] * len(ctx) + [not (i % 2) for i in range(len(qry))]
    assert n == length
    return T.TrainExample(tokens, weight, force, keep)


def example(kind: str, length: int, rng: random.Random, block_size: int = 32,
            answer_weight: float = 1.0) -> T.TrainExample:
    if kind == "mqar":   # one query block for the shortest sequences, two otherwise
        return mqar_example(length, rng, block_size, query_blocks=1 if length <= 3 * block_size else 2)
    if kind == "filler" or kind in T.TASKS:
        return synthetic_example(kind, length, rng, block_size, answer_weight)
    raise ValueError(f"data kind must be 'mqar', 'filler' or one of {T.TASKS}, got {kind!r}")


def batch(mix: dict[str, float], length: int, n: int, rng: random.Random, block_size: int = 32,
          answer_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """n examples of one length, kinds drawn from `mix` (name -> relative weight)."""
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=n)
    return to_batch([example(k, length, rng, block_size, answer_weight) for k in kinds])


class PhaseBatches(torch.utils.data.IterableDataset):
    """Endless batches of one phase, for a DataLoader: workers build batches while the GPU trains.
    Each worker has its own seed; a batch is (length, tensors) with n sized to batch_tokens."""

    def __init__(self, phase: dict, block_size: int, seed: str, per_seq):
        self.phase, self.bs, self.seed, self.per_seq = phase, block_size, seed, per_seq

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}/{info.id if info else 0}")
        ph = self.phase
        while True:
            length = rng.choice(ph["lengths"])
            n = max(1, ph["batch_tokens"] // self.per_seq(ph, length))
            yield length, batch(ph["mix"], length, n, rng, self.bs, ph.get("answer_weight", 1.0))
