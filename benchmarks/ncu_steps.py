"""One call of each MAGE step, for Nsight Compute (the kernels' stall reasons and throughputs).

    ncu --set full --kernel-name regex:mage python benchmarks/ncu_steps.py --shape fdllm-1.5b
Each step runs twice; profile the second launch of each kernel (``--launch-skip`` per name).
"""
from __future__ import annotations

import argparse

import torch

import mage_ext

SHAPES = {"fdllm-1.5b": (12, 2, 128), "fdllm-7b": (28, 4, 128), "sdar-4b": (32, 8, 128)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="fdllm-1.5b", choices=SHAPES)
    p.add_argument("--cache-len", type=int, default=32768)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", default="dense,first,topk,sparse")
    a = p.parse_args()
    hq, hkv, d = SHAPES[a.shape]
    b, n, blk = a.batch, a.cache_len, a.block
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, kb, vb, kc, vc = (rnd(b, hq, blk, d), rnd(b, hkv, blk, d), rnd(b, hkv, blk, d),
                         rnd(b, hkv, n, d), rnd(b, hkv, n, d))
    lens = torch.full((b,), n, dtype=torch.int32, device="cuda")
    _, _, scores = mage_ext.attention_with_scores(q, kc, vc, lens, kb, vb)
    idx, cnt = mage_ext.topk_select(scores, lens, a.k)
    steps = {
        "dense": lambda: mage_ext.dense_attention(q, kc, vc, lens, kb, vb),
        "first": lambda: mage_ext.attention_with_scores(q, kc, vc, lens, kb, vb),
        "topk": lambda: mage_ext.topk_select(scores, lens, a.k),
        "sparse": lambda: mage_ext.sparse_attention(q, kc, vc, idx, cnt, kb, vb),
    }
    for name in a.steps.split(","):
        for _ in range(2):
            steps[name]()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
