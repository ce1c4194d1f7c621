"""Per-kernel device times of one MAGE step (torch.profiler): where a call's time goes.

    python benchmarks/profile_ops.py [--shape fdllm-1.5b] [--cache-len 32768] [--k 512]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import mage_ext

SHAPES = {"fdllm-1.5b": (12, 2, 128), "fdllm-7b": (28, 4, 128), "sdar-4b": (32, 8, 128)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="fdllm-1.5b", choices=SHAPES)
    p.add_argument("--cache-len", type=int, default=32768)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args()
    hq, hkv, d = SHAPES[a.shape]
    b, n, blk = a.batch, a.cache_len, 32
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, kb, vb, kc, vc = (rnd(b, hq, blk, d), rnd(b, hkv, blk, d), rnd(b, hkv, blk, d),
                         rnd(b, hkv, n, d), rnd(b, hkv, n, d))
    lens = torch.full((b,), n, dtype=torch.int32, device="cuda")
    steps = {
        "dense": lambda: mage_ext.dense_attention(q, kc, vc, lens, kb, vb),
        "first": lambda: mage_ext.attention_with_scores(q, kc, vc, lens, kb, vb),
    }
    _, _, scores = steps["first"]()
    idx, cnt = mage_ext.topk_select(scores, lens, a.k)
    steps["topk"] = lambda: mage_ext.topk_select(scores, lens, a.k)
    steps["sparse"] = lambda: mage_ext.sparse_attention(q, kc, vc, idx, cnt, kb, vb)
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
