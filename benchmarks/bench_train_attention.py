"""The block-diffusion training attention of one layer (mage_ext.train.TrainLayout's ops) on a GPU.

Two-copy layout, T tokens per copy, block 32, batch 1, bf16, head shapes of Fast-dLLM v2 1.5B /
7B and SDAR-4B, T = 8K / 16K / 32K:
  exact   noisy: block_attention(q_n, ctx = clean K/V, own = noisy K/V, start 0)
          clean: block_attention(q_c, ctx = own = clean K/V, start 0)
  sparse  (MAGE-FT's student) noisy: block_sparse_attention(q_n, clean K/V, selection of k
          entries per (block, KV head) in the block's clean prefix, own = noisy); clean: as exact.
          k = 512 / 2048; the selection is random (its cost does not depend on which entries).
Forward ("fwd") and forward + backward ("fwd+bwd", gradients of every q / k / v).
Peers in the same run, over the 2T tokens [noisy; clean]: FlexAttention (torch.compile'd) with
the same block mask (the exact pattern) and SDPA flash causal (twice the attended pairs).

Floors (floor_us = the larger): FLOP floor = 4 d Hq (attended query-key pairs) per forward
(x 3.5 for forward + backward) over the bf16 torch.mm rate measured in this run; bytes floor =
every tensor the pass must read or write, once (fwd: q, k, v, out, lse; bwd also dout, dq, dk,
dv), over the copy bandwidth measured in this run. For sparse, gather_floor_us also counts the
selected rows read once per (block, KV head) -- what a kernel pays without reuse through L2.
Timing: CUDA events around each call after warm-up, cold L2, median (common.time_us); peak
memory: torch.cuda.max_memory_allocated above what was allocated before the call.

    python benchmarks/bench_train_attention.py                  # H200: ~10 min
    python benchmarks/bench_train_attention.py --smoke --out /tmp/t.json   # CPU, seconds
Writes benchmarks/results/train_attention_h200.json (top-level device, torch, cuda, commit,
date, plus rates; records op, shape, seq_len, k, pass, time_us, floor_us, peak_mb, peers).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mage_ext  # noqa: E402
from common import SHAPES, env_set, environment  # noqa: E402

BLOCK = 32
DEFAULT_OUT = "train_attention_h200.json"
SMOKE = {"shapes": {"smoke": (4, 2, 16)}, "lengths": [64], "ks": [8], "block": 8}


# -- inputs ----------------------------------------------------------------------------------------
def random_selection(n_blocks, hkv, block, k, device, gen, chunk=64):
    """indices [1, n_blocks, Hkv, k] (ascending, in block j's clean prefix [0, j*block), -1 past
    counts) and counts [1, n_blocks, Hkv]: min(k, j*block) random entries per (block, KV head)."""
    n_ctx = n_blocks * block
    idx = torch.full((n_blocks, hkv, k), -1, dtype=torch.int32, device=device)
    for j0 in range(0, n_blocks, chunk):
        j1 = min(n_blocks, j0 + chunk)
        prefix = torch.arange(j0, j1, device=device) * block
        r = torch.rand(j1 - j0, hkv, n_ctx, device=device, generator=gen)
        r = r.masked_fill(torch.arange(n_ctx, device=device) >= prefix[:, None, None], -1.0)
        top = r.topk(min(k, n_ctx), -1)
        pos = torch.where(top.values >= 0, top.indices, n_ctx).sort(-1).values
        idx[j0:j1, :, :pos.shape[-1]] = torch.where(pos == n_ctx, -1, pos).int()
    counts = (torch.arange(n_blocks, device=device) * block).clamp(max=k).int()
    return idx.unsqueeze(0), counts.view(1, n_blocks, 1).expand(1, n_blocks, hkv).contiguous()


class Layer:
    """q / k / v of both copies of one layer, the output gradients, and the calls."""

    def __init__(self, shape, tokens, block, dtype, device, gen):
        hq, hkv, d = shape
        self.hq, self.hkv, self.d, self.t, self.block = hq, hkv, d, tokens, block

        def rnd(h):
            return torch.randn(1, h, tokens, d, device=device, dtype=dtype,
                               generator=gen).requires_grad_()

        self.q_n, self.q_c = rnd(hq), rnd(hq)
        self.k_n, self.k_c, self.v_n, self.v_c = rnd(hkv), rnd(hkv), rnd(hkv), rnd(hkv)
        self.leaves = [self.q_n, self.q_c, self.k_n, self.k_c, self.v_n, self.v_c]
        self.g_n = torch.randn(1, hq, tokens, d, device=device, dtype=dtype, generator=gen)
        self.g_c = torch.randn(1, hq, tokens, d, device=device, dtype=dtype, generator=gen)
        self.sel = None

    def clean(self):
        return mage_ext.block_attention(self.q_c, self.k_c, self.v_c, self.k_c, self.v_c,
                                        self.block, [0])[0]

    def exact(self):
        o_n = mage_ext.block_attention(self.q_n, self.k_c, self.v_c, self.k_n, self.v_n,
                                       self.block, [0])[0]
        return o_n, self.clean()

    def sparse(self):
        idx, cnt = self.sel
        o_n = mage_ext.block_sparse_attention(self.q_n, self.k_c, self.v_c, idx, cnt, self.k_n,
                                              self.v_n, self.block)[0]
        return o_n, self.clean()

    def backward_of(self, fwd):
        def run():
            o_n, o_c = fwd()
            return torch.autograd.grad([o_n, o_c], self.leaves, [self.g_n, self.g_c])
        return run

    def peers(self, compiled: bool) -> dict:
        """FlexAttention with the same block mask and SDPA flash causal over [noisy; clean]."""
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        t, block = self.t, self.block
        q2 = torch.cat([self.q_n, self.q_c], 2).detach().requires_grad_()
        k2 = torch.cat([self.k_n, self.k_c], 2).detach().requires_grad_()
        v2 = torch.cat([self.v_n, self.v_c], 2).detach().requires_grad_()
        g2 = torch.cat([self.g_n, self.g_c], 2)

        def mask_mod(b, h, q_idx, kv_idx):
            q_noisy, kv_noisy = q_idx < t, kv_idx < t
            qb, kb = (q_idx % t) // block, (kv_idx % t) // block
            noisy = q_noisy & ((kv_noisy & (kb == qb)) | (~kv_noisy & (kb < qb)))
            return noisy | (~q_noisy & ~kv_noisy & (kb <= qb))

        mask = create_block_mask(mask_mod, 1, 1, 2 * t, 2 * t, device=q2.device,
                                 BLOCK_SIZE=128 if q2.is_cuda else block)
        flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

        def flex_fwd():
            if torch.is_grad_enabled():
                return flex(q2, k2, v2, block_mask=mask, enable_gqa=True)
            # (without grad, inputs that require it are refused on the CPU)
            return flex(q2.detach(), k2.detach(), v2.detach(), block_mask=mask, enable_gqa=True)

        def sdpa_fwd():
            if q2.is_cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q2, k2, v2, is_causal=True,
                                                          enable_gqa=True)
            return F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, enable_gqa=True)

        def fwd_bwd(fwd):
            return lambda: torch.autograd.grad(fwd(), [q2, k2, v2], g2)

        return {"flex_attention": {"fwd": flex_fwd, "fwd+bwd": fwd_bwd(flex_fwd)},
                "sdpa_flash_causal_2T": {"fwd": sdpa_fwd, "fwd+bwd": fwd_bwd(sdpa_fwd)}}


# -- floors ----------------------------------------------------------------------------------------
def pairs(tokens, block, k=None):
    """Attended query-key pairs of both copies (per query head)."""
    nb = tokens // block
    noisy = sum(block * ((j * block if k is None else min(k, j * block)) + block)
                for j in range(nb))
    clean = sum(block * (j + 1) * block for j in range(nb))
    return noisy + clean


def floors(layer, k, phase, tflops, tbps, elem):
    hq, hkv, d, t, block = layer.hq, layer.hkv, layer.d, layer.t, layer.block
    flop_us = 4 * d * hq * pairs(t, block, k) / (tflops * 1e12) * 1e6
    q_bytes, kv_bytes = 2 * hq * t * d * elem, 2 * 2 * hkv * t * d * elem   # both copies
    lse = 2 * hq * t * 4
    fwd = q_bytes + kv_bytes + q_bytes + lse                 # read q, k, v; write out, lse
    bwd = (q_bytes + kv_bytes + 2 * q_bytes + lse) + (q_bytes + kv_bytes)   # + dout; dq, dk, dv
    nbytes = fwd if phase == "fwd" else fwd + bwd
    bytes_us = nbytes / (tbps * 1e12) * 1e6
    out = {"flop_floor_us": flop_us * (1 if phase == "fwd" else 3.5), "bytes_floor_us": bytes_us}
    out["floor_us"] = max(out.values())
    if k is not None:   # the selected rows read once per (block, KV head), both K and V
        gathered = sum(min(k, j * block) for j in range(t // block)) * hkv * 2 * d * elem
        out["gather_floor_us"] = (nbytes + gathered * (1 if phase == "fwd" else 2)) / (
            tbps * 1e12) * 1e6
    return out


# -- timing ----------------------------------------------------------------------------------------
def measure(fn, device, reps) -> dict:
    """Median time (us) and peak memory (MB above what was in use before the call)."""
    try:
        if device == "cuda":
            from common import time_us
            torch.cuda.synchronize()
            us = time_us(fn, reps=reps, warmup=2)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return {"time_us": us,
                    "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return {"time_us": statistics.median(times), "peak_mb": None}
    except Exception as e:  # a peer that does not apply or fails: recorded, not fatal
        if device == "cuda":
            torch.cuda.synchronize()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def measure_with_atomics(fn, device, reps) -> dict:
    """measure() with MAGE_BACKWARD_ATOMICS=1: the sparse backward accumulates the context
    gradients with scatter_add_ (atomics, run-to-run bits may differ) instead of the sorting,
    deterministic index_put_ (the default on CUDA; on the CPU both are deterministic)."""
    with env_set("MAGE_BACKWARD_ATOMICS", "1"):
        return measure(fn, device, reps)


def measure_with_generic_backward(fn, device, reps) -> dict:
    """measure() with MAGE_SPARSE_BACKWARD=generic: the sparse backward through the chunked
    ATen recompute instead of FlashAttention's variable-length kernel (the default on CUDA)."""
    with env_set("MAGE_SPARSE_BACKWARD", "generic"):
        return measure(fn, device, reps)


def rates(device):
    if device != "cuda":
        return None, None
    from common import copy_bandwidth_tbps, matmul_tflops
    return matmul_tflops(), copy_bandwidth_tbps()


def records(shapes, lengths, ks, block, device, reps, compiled, tflops, tbps):
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shape in shapes.items():
        for t in lengths:
            layer = Layer(shape, t, block, torch.bfloat16 if device == "cuda" else torch.float32,
                          device, gen)
            elem = layer.q_n.element_size()
            peer_fns = layer.peers(compiled)
            with torch.no_grad():   # the exact pattern's output against FlexAttention's
                ref = peer_fns["flex_attention"]["fwd"]()
                o_n, o_c = layer.exact()
                check = float((torch.cat([o_n, o_c], 2).float() - ref.float()).abs().max())
            for phase in ("fwd", "fwd+bwd"):
                peers = {}
                for peer, fns in peer_fns.items():
                    fn = fns[phase]
                    peers[peer] = measure(torch.no_grad()(fn) if phase == "fwd" else fn, device,
                                          reps)
                for k in [None] + list(ks):
                    if k is not None:
                        layer.sel = random_selection(t // block, shape[1], block, k, device, gen)
                    fwd = layer.exact if k is None else layer.sparse
                    fn = torch.no_grad()(fwd) if phase == "fwd" else layer.backward_of(fwd)
                    rec = {"op": "exact" if k is None else "sparse", "shape": name,
                           "heads": {"hq": shape[0], "hkv": shape[1], "d": shape[2]},
                           "seq_len": t, "block": block, "k": k, "pass": phase,
                           **measure(fn, device, reps), **floors(layer, k, phase, tflops or 1e9,
                                                                 tbps or 1e9, elem),
                           "peers": peers}
                    if k is None and phase == "fwd":
                        rec["max_abs_diff_vs_flex"] = check
                    if k is not None and phase == "fwd+bwd":  # the non-deterministic option
                        rec["atomics"] = measure_with_atomics(fn, device, reps)
                        rec["generic_backward"] = measure_with_generic_backward(fn, device,
                                                                               reps)
                    yield rec
            del layer, peer_fns
            if device == "cuda":
                torch.cuda.empty_cache()


def print_table(recs):
    print(f"\n{'shape':11} {'T':>6} {'op':7} {'k':>5} {'pass':8} {'ms':>8} {'floor':>8} "
          f"{'peak MB':>8}  peers ms")
    for r in recs:
        ms = f"{r['time_us'] / 1e3:8.2f}" if "time_us" in r else f"{'err':>8}"
        peak = f"{r['peak_mb']:8.0f}" if r.get("peak_mb") is not None else f"{'-':>8}"
        peers = ", ".join(f"{n}={m['time_us'] / 1e3:.2f}" if "time_us" in m else f"{n}=n/a"
                          for n, m in r["peers"].items())
        atomics = r.get("atomics", {})
        if "time_us" in atomics:
            peers += f" | with atomics {atomics['time_us'] / 1e3:.2f}"
        generic = r.get("generic_backward", {})
        if "time_us" in generic:
            peers += f" | generic backward {generic['time_us'] / 1e3:.2f}"
        print(f"{r['shape']:11} {r['seq_len']:6d} {r['op']:7} {str(r['k'] or '-'):>5} "
              f"{r['pass']:8} {ms} {r['floor_us'] / 1e3:8.3f} {peak}  {peers}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU (FlexAttention eager): checks the script runs")
    p.add_argument("--out", default=None, help=f"output JSON (default results/{DEFAULT_OUT})")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--lengths", nargs="*", type=int, default=[8192, 16384, 32768])
    p.add_argument("--ks", nargs="*", type=int, default=[512, 2048])
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args(argv)
    if a.smoke:
        device, shapes, lengths, ks, block, reps = ("cpu", SMOKE["shapes"], SMOKE["lengths"],
                                                    SMOKE["ks"], SMOKE["block"], 2)
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (or --smoke for the CPU check)")
        device, block, reps = "cuda", BLOCK, a.reps
        shapes = {s: SHAPES[s] for s in a.shapes}
        lengths, ks = a.lengths, a.ks
    tflops, tbps = rates(device)
    recs = list(records(shapes, lengths, ks, block, device, reps, device == "cuda", tflops, tbps))
    payload = {**environment(device), "matmul_tflops": tflops, "copy_tbps": tbps,
               "block": block, "records": recs}
    if a.out:
        out = Path(a.out)
        out.write_text(json.dumps(payload, indent=1) + "\n")
    else:
        from common import write_results
        out = write_results(DEFAULT_OUT, payload)
    print_table(recs)
    print(f"\nwrote {out}")
    return payload


if __name__ == "__main__":
    main()
