"""Where a whole forward's device time goes: torch.profiler over the forwards of a block.

Random-weight model of the Fast-dLLM v2 1.5B shape, a random cache of ``--context`` entries, the
fused forward (or ``--stock``), eager so every kernel shows: one first (selecting) forward, then
``--later`` later forwards and a commit forward of MAGE (or exact). Prints the kernels grouped by
name, sorted by total device time, with their count per forward, and the sum.

    python benchmarks/profile_forward.py --context 32768 --policy mage --k 512
    python benchmarks/profile_forward.py --prefill --context 131072   # one prefill instead

With --prefill: one batch-1 prefill of --context tokens (chunks of --chunk), after a warm-up
prefill; also prints its wall time against the device time, so host-side gaps show.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_e2e import SHAPES, build_model, prefill_loop, random_cache  # noqa: E402

from mage_ext import PolicyConfig  # noqa: E402
from mage_ext.core.loop import DEFAULT_PREFILL_CHUNK  # noqa: E402
from mage_ext.generation import _forward  # noqa: E402
from mage_ext.hf.enable import enable_mage  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1.5b", choices=[s for s in SHAPES if s != "smoke"])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--policy", default="mage", choices=["mage", "exact"])
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--later", type=int, default=4)
    ap.add_argument("--stock", action="store_true", help="the transformers module forward")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--prefill", action="store_true", help="profile a prefill of --context tokens")
    ap.add_argument("--chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                    help="prefill tokens per forward")
    a = ap.parse_args(argv)
    model = build_model(SHAPES[a.shape], a.context + 256, torch.bfloat16, "cuda")
    if a.prefill:
        return profile_prefill(model, a)
    policy = PolicyConfig(method=a.policy, k=a.k)
    enable_mage(model, policy)
    cache = random_cache(model, a.batch, a.context, a.context + 128, policy)
    fwd = _forward(model, cache, False if a.stock else None, torch.device("cuda"))
    ids = torch.randint(0, 1000, (a.batch, 32), device="cuda")
    last = torch.full((a.batch,), 31, device="cuda")

    def block():
        cache.begin_block()
        for step in range(1 + a.later):
            cache.begin_step()
            fwd(ids, None)
            cache.end_forward(32)
        cache.begin_step(commit=True)
        fwd(ids, last)
        cache.advance_host(32)  # no device advance: the cache stays at --context
        cache.phase = "denoise"

    with torch.no_grad():
        block()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            block()
            torch.cuda.synchronize()
    forwards = 2 + a.later
    rows = sorted(((e.key, e.device_time_total, e.count) for e in prof.key_averages()
                   if e.device_time_total > 0), key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows)
    print(f"{a.shape} context {a.context} batch {a.batch} {a.policy} k={a.k} "
          f"{'stock' if a.stock else 'fused'}: {forwards} forwards, device time "
          f"{total / 1e3:.2f} ms ({total / 1e3 / forwards:.3f} ms a forward), "
          f"{sum(c for _, _, c in rows) / forwards:.0f} kernels a forward")
    for name, t, c in rows[:a.rows]:
        print(f"{t / 1e3:9.3f} ms {t / total:6.1%} {c / forwards:7.1f}/fwd  {name[:90]}")


def profile_prefill(model, a):
    import time
    policy = PolicyConfig(method=a.policy, k=a.k)
    enable_mage(model, policy)
    fused = False if a.stock else None
    with torch.no_grad():
        prefill_loop(model, a.context, policy, fused, a.chunk).prefill()  # warm-up
        loop = prefill_loop(model, a.context, policy, fused, a.chunk)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            loop.prefill()
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    rows = sorted(((e.key, e.device_time_total, e.count) for e in prof.key_averages()
                   if e.device_time_total > 0), key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows)
    print(f"{a.shape} prefill of {a.context} tokens, chunks of {a.chunk}, {a.policy}: wall "
          f"{wall:.3f} s (profiled), device time {total / 1e6:.3f} s, "
          f"{sum(c for _, _, c in rows)} kernels")
    for name, t, c in rows[:a.rows]:
        print(f"{t / 1e3:10.2f} ms {t / total:6.1%} {c:7d}  {name[:90]}")


if __name__ == "__main__":
    main()
