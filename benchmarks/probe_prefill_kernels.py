"""Which fused attention kernel should the chunked prefill's prefix part use on this GPU?

The prefill's attention (mage.block_attention, ops/block_attention.h) is one non-causal part per
chunk (the chunk's queries over the cache before it) plus one causal square. This times, at the
1.5B / 7B head shapes and the shapes of a 128K prefill in 16K chunks: FlashAttention-2 (torch's,
GQA native), cuDNN with K/V expanded per query head, cuDNN given the GQA heads as they are (where
the torch build takes them), each cold (first call of a shape: cuDNN builds a graph) and warm
(median of 5, CUDA events), plus the TFLOP/s of each.

    python benchmarks/probe_prefill_kernels.py   # -> results/prefill_kernels_h200.json
"""
from __future__ import annotations

import os
import sys
import time
from statistics import median

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_results  # noqa: E402

aten = torch.ops.aten
HEADS = {"1.5b": (12, 2), "7b": (28, 4)}


def flash(q, k, v, causal, scale):
    return aten._flash_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         None, None, q.size(2), k.size(2), 0.0, causal, False,
                                         scale=scale)[0].transpose(1, 2)


def cudnn(q, k, v, causal, scale, expand=True):
    g = q.size(1) // k.size(1)
    if expand and g > 1:
        k, v = (t.repeat_interleave(g, dim=1) for t in (k, v))
    return aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                    scale=scale)[0]


KERNELS = {"flash": flash, "cudnn_expanded": cudnn,
           "cudnn_gqa": lambda *a: cudnn(*a, expand=False)}


def time_call(fn, reps=5):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    cold = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return cold, median(times)


def main():
    rows = []
    for shape, (hq, hkv) in HEADS.items():
        for sq, sk, causal in [(16384, 16384, True), (16384, 16384, False),
                               (16384, 65536, False), (16384, 114688, False),
                               (4096, 126976, False)]:
            q = torch.randn(1, hq, sq, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hkv, sk, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            flops = 4 * sq * sk * 128 * hq / (2 if causal else 1)
            ref = None
            for name, fn in KERNELS.items():
                rec = dict(shape=shape, sq=sq, sk=sk, causal=causal, kernel=name)
                try:
                    out = fn(q, k, v, causal, 128 ** -0.5)
                    if ref is None:
                        ref = out
                    rec["max_err_vs_flash"] = (out.float() - ref.float()).abs().max().item()
                    rec["cold_ms"], rec["warm_ms"] = time_call(lambda: fn(q, k, v, causal, 128 ** -0.5))
                    rec["tflops"] = flops / rec["warm_ms"] / 1e9
                except RuntimeError as e:
                    rec["error"] = str(e).splitlines()[0][:200]
                rows.append(rec)
                print(rec, flush=True)
            del q, k, v, ref
            torch.cuda.empty_cache()
    write_results("prefill_kernels_h200.json", {"environment": environment(), "results": rows})


if __name__ == "__main__":
    main()
