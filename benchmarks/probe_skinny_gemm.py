"""Probe: the GEMMs of one decoding forward (32 or 512 rows) against the weights' byte floor.

A later MAGE forward at batch 1 spends over half its time in cuBLAS GEMMs with 32 rows, which
read every weight once and so are bound by memory bandwidth, not FLOPs. This probe times the
GEMMs of one whole forward (each layer's QKV, O, gate|up and down on its own weights, then the
LM head), captured in one CUDA graph, with cuBLAS (F.linear) and with mage.linear's few-row
split-K kernel (its own split plan and each fixed split count), and prints the effective
bandwidth next to the copy bandwidth measured in the same run.

    python benchmarks/probe_skinny_gemm.py [--rows 32 512] [--shapes 1.5b 7b]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth_tbps, environment, graph_time_us, write_results  # noqa: E402

# (hidden, q heads, kv heads, head dim, intermediate, layers, vocabulary)
MODELS = {"1.5b": (1536, 12, 2, 128, 8960, 28, 151936), "7b": (3584, 28, 4, 128, 18944, 28, 152064)}


def layer_shapes(model: str) -> list:
    """(name, N, K) of a layer's GEMMs, y[rows, N] = x[rows, K] @ W[N, K]^T."""
    h, hq, hkv, d, inter, _, _ = MODELS[model]
    return [("qkv", (hq + 2 * hkv) * d, h), ("o", h, hq * d), ("gate_up", 2 * inter, h),
            ("down", h, inter)]


def backends() -> dict:
    """name -> (linear, environment): cuBLAS (F.linear), and mage.linear with its own split
    plan and with each fixed split count (MAGE_SKINNY_SPLITS)."""
    import mage_ext  # noqa: F401
    cublas = lambda x, w: F.linear(x, w)  # noqa: E731
    mage = lambda x, w: torch.ops.mage.linear(x, w, None)  # noqa: E731
    on = {"MAGE_SKINNY_GEMM": "on"}
    out = {"cublas": (cublas, {}), "mage": (mage, on)}
    for s in (1, 2, 4, 8):
        out[f"mage/{s}"] = (mage, dict(on, MAGE_SKINNY_SPLITS=str(s)))
    return out


def time_forward(model: str, rows: int, linear, only: str = "") -> float:
    h, _, _, _, _, layers, vocab = MODELS[model]
    shapes = [s for s in layer_shapes(model) if not only or s[0] == only]
    ws = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _, n, k in shapes]
          for _ in range(layers)]
    xs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _, _, k in shapes}
    head = torch.randn(vocab, h, device="cuda", dtype=torch.bfloat16) * 0.02 if not only else None

    def run():
        for lw in ws:
            for (_, _, k), w in zip(shapes, lw):
                linear(xs[k], w)
        if head is not None:
            linear(xs[h], head)
    us = graph_time_us(run, reps=20)
    nbytes = sum(w.numel() * 2 for lw in ws for w in lw) + (head.numel() * 2 if head is not None else 0)
    del ws, head
    torch.cuda.empty_cache()
    return us, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--shapes", nargs="+", default=["1.5b", "7b"])
    args = ap.parse_args()
    bw = copy_bandwidth_tbps()
    print(f"copy bandwidth {bw:.2f} TB/s")
    records = []
    for model in args.shapes:
        for rows in args.rows:
            for label, (fn, env) in backends().items():
                if rows > 32 and label != "cublas":  # mage.linear takes <= 32 rows
                    continue
                os.environ.update(env)
                for only in [""] + [s[0] for s in layer_shapes(model)]:
                    us, nbytes = time_forward(model, rows, fn, only)
                    floor = nbytes / (bw * 1e12) * 1e6  # bench_e2e's floor: bytes / copy bandwidth
                    rec = dict(model=model, rows=rows, backend=label, gemms=only or "forward",
                               us=us, floor_us=floor, ratio=us / floor,
                               tbps=nbytes / (us * 1e-6) / 1e12)
                    records.append(rec)
                    print(f"{model:5s} rows {rows:4d} {label:9s} {rec['gemms']:8s} "
                          f"{us:9.1f} us  floor {floor:8.1f}  x{rec['ratio']:.2f}  "
                          f"{rec['tbps']:.2f} TB/s")
                for name in env:
                    os.environ.pop(name)
    write_results("skinny_gemm_probe_h200.json",
                  dict(environment(), copy_bw_tbps=bw, records=records))


if __name__ == "__main__":
    main()
