"""Markdown tables for the README from a kernel benchmark JSON (benchmarks/results/kernels_h200.json).

    python benchmarks/report.py [path] [--batch 1] [--block 32]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(records, batch: int, block: int) -> str:
    rows = {}
    for r in records:
        if r["batch"] != batch or r["block"] != block:
            continue
        key = (r["shape"].split()[0], r["cache_len"])
        rows.setdefault(key, {})[(r["op"], r["k"])] = r
    # Batch 1 records also carry the per-layer time inside a 28-layer graph (layers_graph_us).
    layered = any("layers_graph_us" in r for r in records if r["batch"] == batch)
    lg = lambda r: f" [{r['layers_graph_us']:.1f}]" if "layers_graph_us" in r else ""  # noqa: E731
    note = " [in a 28-layer graph]" if layered else ""
    out = ["| shape | cache | dense us (x floor) | compute floor | FlashInfer | SDPA gqa "
           f"| first step us (x dense floor) | top-k us{note} | sparse k=512 us (x floor){note} "
           "| naive sparse |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (shape, n), ops in rows.items():
        d, f, t, s = (ops.get(("dense_step", None)), ops.get(("first_step", 512)),
                      ops.get(("topk", 512)), ops.get(("sparse_step", 512)))
        if not (d and f and t and s):
            continue
        fi = d["peers"].get("flashinfer_prefill")
        cf = d.get("compute_floor_us")
        out.append(f"| {shape} | {n // 1024}K | {d['time_us']:.0f} ({d['time_us'] / d['floor_us']:.1f}x) "
                   f"| {'-' if cf is None else f'{cf:.0f}'} | {'-' if fi is None else f'{fi:.0f}'} "
                   f"| {d['peers']['sdpa_gqa']:.0f} ")
        out[-1] += (f"| {f['time_us']:.0f} ({f['time_us'] / d['floor_us']:.1f}x) "
                    f"| {t['time_us']:.0f}{lg(t)} "
                    f"| {s['time_us']:.1f} ({s['time_us'] / s['floor_us']:.1f}x){lg(s)} "
                    f"| {s['peers']['naive_torch_gather_sdpa']:.0f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("path", nargs="?",
                   default=str(Path(__file__).parent / "results" / "kernels_h200.json"))
    p.add_argument("--batch", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--block", type=int, default=32)
    a = p.parse_args()
    data = json.loads(Path(a.path).read_text())
    mm = f", bf16 mm {data['matmul_tflops']:.0f} TFLOP/s" if "matmul_tflops" in data else ""
    print(f"{data['device']}, torch {data['torch']}, CUDA {data['cuda']}, copy "
          f"{data['copy_bw_tbps']:.2f} TB/s{mm}, commit {data['commit'][:7]}, {data['date']}\n")
    for b in a.batch:
        print(f"batch {b}, block {a.block}, bf16, one layer:\n")
        print(table(data["records"], b, a.block) + "\n")


if __name__ == "__main__":
    main()
