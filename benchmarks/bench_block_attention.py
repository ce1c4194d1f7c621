"""mage.block_attention on a GPU: chunked prefill and the block-diffusion training layout,
against torch's SDPA (flash and cuDNN backends) and FlexAttention with the same block mask.

Head shape of Fast-dLLM v2 1.5B (Hq 12, Hkv 2, d 128), bf16, block 32, batch 1.

(1) prefill: a chunk of C = 2048 / 4096 / 8192 query tokens over a cache that holds `start`
    tokens before it (start = 0 .. 128K; the chunk's own k/v already appended, as in the
    prefill loop). block_attention (each fused kernel: MAGE_BLOCK_ATTENTION_KERNEL=flash /
    cudnn) against SDPA over the same tokens, token-causal (lower-right: query i of the chunk
    sees the cache and the chunk up to itself) with the flash backend, and with the cuDNN
    backend where start = 0 (SDPA's is_causal is top-left, which is lower-right only for a
    square problem). Forward only (inference).
(2) training, two-copy layout at T = 8K / 16K / 32K tokens per copy: forward and forward +
    backward of block_attention(noisy: ctx = clean, own = noisy) + block_attention(clean:
    ctx = own = clean), against FlexAttention (compiled) over the 2T tokens [noisy; clean] with
    the same block mask (75% empty) and SDPA flash causal over 2T tokens (twice the work).

Timing: CUDA events around each call after warm-up, cold L2, median (common.time_us); peak
memory: torch.cuda.max_memory_allocated above what was allocated before the call.
FLOP floor: 4 * d * (query-key pairs attended) per forward (x 3.5 for forward + backward: the
backward recomputes scores and does four more matmuls) / the bf16 torch.mm throughput measured
in this run.

    python benchmarks/bench_block_attention.py [--quick] [--output block_attention_h200.json]
Writes benchmarks/results/<output> and prints a table.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mage_ext  # noqa: E402
from common import SHAPES, environment, matmul_tflops, time_us, write_results  # noqa: E402

HQ, HKV, D = SHAPES["fdllm-1.5b"]
BLOCK = 32
DTYPE = torch.bfloat16
KERNELS = ["flash", "cudnn"]


def rnd(*shape, grad=False):
    return torch.randn(*shape, device="cuda", dtype=DTYPE).requires_grad_(grad)


def with_kernel(kernel, fn):
    def run():
        os.environ["MAGE_BLOCK_ATTENTION_KERNEL"] = kernel
        try:
            return fn()
        finally:
            os.environ.pop("MAGE_BLOCK_ATTENTION_KERNEL", None)
    return run


def measure(fn) -> dict:
    """Median time (us) and peak memory (MB above the memory in use before the call)."""
    try:
        torch.cuda.synchronize()
        us = time_us(fn, reps=10, warmup=2)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return {"time_us": us, "peak_mb": peak}
    except Exception as e:  # a peer that does not apply or fails: recorded, not fatal
        torch.cuda.synchronize()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def prefill_records(chunks, starts, tflops):
    for c in chunks:
        for start in starts:
            n = start + c
            q = rnd(1, HQ, c, D)
            k_cache, v_cache = rnd(1, HKV, n, D), rnd(1, HKV, n, D)
            k_own, v_own = k_cache[:, :, start:], v_cache[:, :, start:]  # appended already
            pairs = c * start + c * (c + 1) / 2  # token-causal; the block's extra keys are ~bs/2
            floor_us = 4 * D * HQ * pairs / (tflops * 1e12) * 1e6

            def ours():
                return mage_ext.block_attention(q, k_cache, v_cache, k_own, v_own, BLOCK, [start])

            mask = torch.nn.attention.bias.causal_lower_right(c, n)

            def sdpa_flash():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                                          enable_gqa=True)

            def sdpa_cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k_cache, v_cache, is_causal=True,
                                                          enable_gqa=True)

            rec = {"op": "prefill", "chunk": c, "start": start, "pass": "fwd",
                   "floor_us": floor_us, "kernels": {}, "peers": {}}
            with torch.no_grad():
                for kernel in KERNELS:
                    rec["kernels"][kernel] = measure(with_kernel(kernel, ours))
                rec["peers"]["sdpa_flash_causal"] = measure(sdpa_flash)
                rec["peers"]["sdpa_cudnn_causal"] = (
                    measure(sdpa_cudnn) if start == 0 else {"error": "top-left causal only"})
            del q, k_cache, v_cache
            torch.cuda.empty_cache()
            yield rec


def two_copy_mask(tokens):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        q_noisy, kv_noisy = q_idx < tokens, kv_idx < tokens
        qb, kb = (q_idx % tokens) // BLOCK, (kv_idx % tokens) // BLOCK
        noisy = q_noisy & ((kv_noisy & (kb == qb)) | (~kv_noisy & (kb < qb)))
        clean = ~q_noisy & ~kv_noisy & (kb <= qb)
        return noisy | clean

    return create_block_mask(mask_mod, 1, 1, 2 * tokens, 2 * tokens, device="cuda")


def training_records(lengths, tflops):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    for t in lengths:
        q_n, q_c = rnd(1, HQ, t, D, grad=True), rnd(1, HQ, t, D, grad=True)
        k_n, k_c, v_n, v_c = (rnd(1, HKV, t, D, grad=True) for _ in range(4))
        g_n, g_c = rnd(1, HQ, t, D), rnd(1, HQ, t, D)
        leaves = [q_n, q_c, k_n, k_c, v_n, v_c]

        def ours():
            o_n, _ = mage_ext.block_attention(q_n, k_c, v_c, k_n, v_n, BLOCK, [0])
            o_c, _ = mage_ext.block_attention(q_c, k_c, v_c, k_c, v_c, BLOCK, [0])
            return o_n, o_c

        def ours_fwd_bwd():
            o_n, o_c = ours()
            return torch.autograd.grad([o_n, o_c], leaves, [g_n, g_c])

        # Peers see the 2T tokens [noisy; clean] (the concatenation is not timed).
        q2 = torch.cat([q_n, q_c], 2).detach().requires_grad_()
        k2 = torch.cat([k_n, k_c], 2).detach().requires_grad_()
        v2 = torch.cat([v_n, v_c], 2).detach().requires_grad_()
        g2 = torch.cat([g_n, g_c], 2)
        block_mask = two_copy_mask(t)

        def flex_fwd():
            return flex(q2, k2, v2, block_mask=block_mask, enable_gqa=True)

        def sdpa_fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, enable_gqa=True)

        def fwd_bwd(fwd):
            return lambda: torch.autograd.grad(fwd(), [q2, k2, v2], g2)

        # Attended pairs: noisy block j sees j*bs clean + bs noisy keys, clean block j (j+1)*bs.
        nb = t // BLOCK
        pairs = BLOCK * sum(j * BLOCK + BLOCK for j in range(nb)) * 2
        fwd_floor = 4 * D * HQ * pairs / (tflops * 1e12) * 1e6
        for phase, floor_us in (("fwd", fwd_floor), ("fwd+bwd", 3.5 * fwd_floor)):
            rec = {"op": "train_two_copy", "seq_len": t, "pass": phase, "floor_us": floor_us,
                   "kernels": {}, "peers": {}}
            for kernel in KERNELS:
                fn = ours if phase == "fwd" else ours_fwd_bwd
                rec["kernels"][kernel] = measure(with_kernel(kernel, fn))
            for name, fwd in (("flex_attention", flex_fwd), ("sdpa_flash_causal_2T", sdpa_fwd)):
                rec["peers"][name] = measure(fwd if phase == "fwd" else fwd_bwd(fwd))
            yield rec
        del q_n, q_c, k_n, k_c, v_n, v_c, q2, k2, v2, block_mask
        torch.cuda.empty_cache()


def fmt(m):
    return f"{m['time_us'] / 1e3:9.2f}" if "time_us" in m else f"{'n/a':>9}"


def print_table(records):
    print(f"\n{'op':15} {'size':>7} {'start':>7} {'pass':8} {'floor ms':>9} "
          + " ".join(f"{k + ' ms':>9}" for k in KERNELS) + "  peers ms (peak MB)")
    for r in records:
        size = r.get("chunk", r.get("seq_len"))
        peers = ", ".join(
            f"{n}={m['time_us'] / 1e3:.2f} ({m['peak_mb']:.0f})" if "time_us" in m else f"{n}=n/a"
            for n, m in r["peers"].items())
        ours = " ".join(fmt(r["kernels"][k]) for k in KERNELS)
        print(f"{r['op']:15} {size:>7} {r.get('start', ''):>7} {r['pass']:8} "
              f"{r['floor_us'] / 1e3:9.2f} {ours}  {peers}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="C = 4096, start 0 / 32K, T = 8K only")
    p.add_argument("--output", default="block_attention_h200.json")
    args = p.parse_args()
    tflops = matmul_tflops()
    env = dict(environment(), matmul_tflops=tflops, shape="fdllm-1.5b", hq=HQ, hkv=HKV, d=D,
               block=BLOCK, dtype="bfloat16")
    print(f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, bf16 mm {tflops:.0f} TFLOP/s")
    chunks = [4096] if args.quick else [2048, 4096, 8192]
    starts = [0, 32768] if args.quick else [0, 8192, 32768, 131072]
    lengths = [8192] if args.quick else [8192, 16384, 32768]
    records = []
    for rec in itertools.chain(prefill_records(chunks, starts, tflops),
                               training_records(lengths, tflops)):
        records.append(rec)
        write_results(args.output, dict(env, records=records))  # partial runs keep their data
        print_table([rec])
    print_table(records)
    print(f"wrote {write_results(args.output, dict(env, records=records))}")


if __name__ == "__main__":
    main()
