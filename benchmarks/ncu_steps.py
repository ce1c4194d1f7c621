"""One call of each MAGE step, for Nsight Compute (the kernels' stall reasons and throughputs).

    ncu --set full --kernel-name regex:"attention_tile|attention_wgmma|scores_kernel|scores_wgmma|topk|merge" \\
        python benchmarks/ncu_steps.py --shape fdllm-1.5b          (or: gpu_session.sh ncu)
Each step runs twice (the second launch is the warm one).
"""
from __future__ import annotations

import argparse

import torch

from common import SHAPES, step_calls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="fdllm-1.5b", choices=SHAPES)
    p.add_argument("--cache-len", type=int, default=32768)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", default="dense,first,topk,sparse")
    a = p.parse_args()
    steps = step_calls(a.shape, a.cache_len, a.k, a.batch, a.block)
    for name in a.steps.split(","):
        for _ in range(2):
            steps[name]()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
