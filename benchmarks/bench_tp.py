"""Tensor-parallel speed (issue 18, item 3): a 7B-shape model's forwards at 128K on N GPUs
against one GPU.

The decoding path of ``generate`` on a GPU (fused forward, block loop, first / later / commit
forwards replayed as CUDA graphs with their NCCL all-reduces inside) over a KV cache filled with
random K/V (bench_e2e.py's harness: the decode cost does not depend on the values), a fixed 8
denoising forwards + 1 commit per block, exact attention and MAGE k=512, batch 1 and 16. Under
torchrun the random-weight model (the same seed on every rank) is sharded with
mage_ext/hf/tensor_parallel.py: each GPU holds Hkv/N KV heads of the cache and 1/N of the
layers' weights (embedding and lm_head replicated).

    python benchmarks/bench_tp.py                                  # one GPU: the baseline
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py             # TP=2
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --smoke     # tiny shape, CPU, gloo

Each run merges its rows (key ``tp<N>``) into benchmarks/results/multi_gpu_h200.json and, when
the one-GPU rows are there, the speed-ups (one-GPU median / TP median, per forward). Per row:
median first / later / commit forward (CUDA events on rank 0, steady-state blocks), block time,
tokens/s, the peak memory of the busiest GPU, and the KV bytes per GPU. A point that runs out of
memory is recorded as such (one GPU at batch 16 holds a 112 GiB cache beside 15 GB of weights).
The target (issue 18): the later forward at batch 16, 128K, >= 1.7x faster on 2 GPUs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_e2e import BLOCK, SHAPES, build_model, decode_run, random_cache, summarize  # noqa: E402
from common import RESULTS, environment, write_result  # noqa: E402

from mage_ext import PolicyConfig  # noqa: E402
from mage_ext.hf.enable import disable_mage, enable_mage  # noqa: E402
from mage_ext.hf.tensor_parallel import shard_model  # noqa: E402

OUT = RESULTS / "multi_gpu_h200.json"


def setup(smoke: bool):
    """(device, dtype, rank, world); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if smoke:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_tp: needs CUDA GPUs (or --smoke for a CPU run)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dtype = torch.bfloat16
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo" if smoke else "nccl")
    return device, dtype, rank, world


def peak_gb(device, world: int) -> float:
    """The largest peak allocation over the ranks since the last reset, in GB."""
    if device.type != "cuda":
        return 0.0
    t = torch.tensor([torch.cuda.max_memory_allocated(device) / 1e9], device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def run_point(model, batch, context, label, policy, a, device, world) -> dict:
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    kv_gb = (2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads // world
             * (context + (a.blocks + 1) * BLOCK) * d * 2 / 1e9)
    row = {"tp": world, "batch": batch, "context": context, "policy": label,
           "kv_gb_per_gpu": kv_gb}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    enable_mage(model, policy)
    try:
        cache = random_cache(model, batch, context, context + (a.blocks + 1) * BLOCK, policy)
        torch.manual_seed(1)  # every rank feeds the same first token (the decoding is replicated)
        loop, ends = decode_run(model, cache, batch, context, policy, a.blocks, a.fixed_steps,
                                0.9, None)
        row.update(summarize(loop, ends, warm_blocks=2))
        del loop, cache
    except torch.OutOfMemoryError as e:  # one GPU may not hold batch 16 at 128K
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        disable_mage(model)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["peak_gb_per_gpu"] = peak_gb(device, world)
    return row


def merge(rows: list, world: int, env: dict, path) -> dict:
    """Adds this run's rows under ``tp<world>`` and recomputes the speed-ups against tp1."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    runs = data.setdefault("tp_inference", {})
    runs[f"tp{world}"] = {"environment": env, "rows": rows}
    base = {(r["batch"], r["context"], r["policy"]): r for r in runs.get("tp1", {}).get("rows", [])}
    speedups = []
    for key, run in sorted(runs.items()):
        if key == "tp1":
            continue
        for r in run["rows"]:
            b = base.get((r["batch"], r["context"], r["policy"]))
            if b is None or "error" in b or "error" in r:
                continue
            speedups.append({"tp": r["tp"], "batch": r["batch"], "context": r["context"],
                             "policy": r["policy"],
                             **{f"{f}_speedup": b[f"{f}_ms"] / r[f"{f}_ms"]
                                for f in ("first", "later", "commit", "block")
                                if b.get(f"{f}_ms") and r.get(f"{f}_ms")}})
    data["tp_speedups"] = speedups
    data.setdefault("fsdp_mageft", None)  # item 2's rows (the MAGE-FT step under FSDP2)
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--contexts", type=int, nargs="+", default=[131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=5, help="blocks per point (2 warm up)")
    ap.add_argument("--fixed-steps", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (gloo)")
    ap.add_argument("--out", default=None, help=f"result JSON (default {OUT})")
    a = ap.parse_args(argv)
    device, dtype, rank, world = setup(a.smoke)
    if a.smoke:
        a.shape, a.contexts, a.batches, a.k, a.blocks = "smoke", [256], [1, 2], 64, 4
    model = build_model(SHAPES[a.shape], max(a.contexts) + (a.blocks + 2) * BLOCK, dtype, device)
    if world > 1:
        shard_model(model)
    policies = [("exact", PolicyConfig(method="exact")),
                (f"mage k={a.k}", PolicyConfig(method="mage", k=a.k))]
    rows = []
    for context in a.contexts:
        for batch in a.batches:
            for label, policy in policies:
                row = run_point(model, batch, context, label, policy, a, device, world)
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
    if rank == 0:
        out = a.out or ("/tmp/multi_gpu_smoke.json" if a.smoke else str(OUT))
        env = environment(device.type)
        env.update(shape=a.shape, gpus=world, fixed_steps=a.fixed_steps, blocks=a.blocks)
        write_result(out, merge(rows, world, env, out))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
