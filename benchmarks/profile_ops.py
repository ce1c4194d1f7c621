"""Per-kernel device times of one MAGE step (torch.profiler): where a call's time goes.

    python benchmarks/profile_ops.py [--shape fdllm-1.5b] [--cache-len 32768] [--k 512]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from common import SHAPES, step_calls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="fdllm-1.5b", choices=SHAPES)
    p.add_argument("--cache-len", type=int, default=32768)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args()
    n, b = a.cache_len, a.batch
    steps = step_calls(a.shape, n, a.k, b)
    for name, fn in steps.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        print(f"--- {name} ({a.shape}, N={n}, k={a.k}, batch={b}); 10 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
