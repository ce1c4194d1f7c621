"""Where the training attention's forward + backward spends its GPU time (torch.profiler).

One layer of bench_train_attention.py's two-copy layout (1.5B head shape by default): the exact
and the sparse (k) passes, forward + backward, after warm-up; prints the kernels by total CUDA
time, and the whole-pass time with each block_attention part kernel (auto, cudnn) so the
choice of the default rests on a measurement.

    python benchmarks/profile_train_attention.py --seq-len 32768 --k 512
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_attention import BLOCK, Layer, random_selection  # noqa: E402
from common import SHAPES, env_set, time_us  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="fdllm-1.5b", choices=list(SHAPES))
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--rows", type=int, default=18, help="kernels listed per pass")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = SHAPES[a.shape]
    layer = Layer(shape, a.seq_len, BLOCK, torch.bfloat16, "cuda", gen)
    layer.sel = random_selection(a.seq_len // BLOCK, shape[1], BLOCK, a.k, "cuda", gen)

    def clean_only():
        return torch.autograd.grad(layer.clean(), [layer.q_c, layer.k_c, layer.v_c], layer.g_c)

    passes = {"exact": layer.backward_of(layer.exact), "sparse": layer.backward_of(layer.sparse),
              "clean only": clean_only}
    for kernel in ("auto", "cudnn"):
        with env_set("MAGE_BLOCK_ATTENTION_KERNEL", kernel):
            for name, fn in passes.items():
                try:
                    print(f"{kernel:6} {name:11} fwd+bwd {time_us(fn, reps=5, warmup=2) / 1e3:8.2f} ms")
                except Exception as e:  # a kernel that does not apply: said, not fatal
                    print(f"{kernel:6} {name:11} failed: {type(e).__name__}: {str(e)[:160]}")
    for name, fn in passes.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(f"\n--- {name} fwd+bwd, {a.shape} T={a.seq_len} k={a.k} ---")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows,
                                        max_name_column_width=70))


if __name__ == "__main__":
    main()
