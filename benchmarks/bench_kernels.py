"""Per-layer kernel benchmark of the MAGE ops on a GPU, against the bandwidth floor and peers.

For each model shape, block size, batch and cache length: the dense exact step, the first step
(exact attention + scores + top-k), the sparse later step for several k, and top-k alone. Peers
measured in the same run: torch SDPA (enable_gqa; and on KV expanded to all query heads), the
naive torch sparse step (gather + SDPA), the naive first step (explicit softmax for the scores
+ torch.topk), optionally FlexAttention. Peers get their K/V already concatenated with the block
(the concatenation is not timed: in their favour).

Every function is timed as CUDA-graph replays with a cold L2 (device time without host launch
overhead: time_us), and the MAGE ops also back to back from Python (eager_us: what a plain
Python loop pays, host overhead included, warm L2). At batch 1 the sparse step and the top-k
are also timed as 28 layers in one graph, each layer on its own cache (layers_graph_us, per
layer): a single graph replay costs ~4 us of launch and events (an empty kernel's replay),
which a model's decoding graph pays once per step, not per layer.

Floor = bytes that must move / copy bandwidth measured in this run:
  dense / first step: the cache's K and V once (b * Hkv * N * d * 2 tensors * 2 bytes),
  sparse: the selected K/V rows (b * Hkv * k * d * 2 * 2), top-k: the scores (b * Hkv * N * 4).
(The block's q/k/v and the outputs are a few hundred KB and counted too.)
Compute floor = the attention's matrix FLOPs (4 * rows * keys * d: Q K^T and P V, rows = b * Hq
* B) / the bf16 torch.mm throughput measured in this run. With G * B query rows per KV head the
step does G * B * 4 * d FLOPs per 4 * d bytes of K/V (192 FLOP/B for the 1.5B shape): near the
H200's ridge point, so the dense and first steps are bounded by compute as much as by bandwidth.

    python benchmarks/bench_kernels.py [--quick] [--flex]
Writes benchmarks/results/kernels_h200.json and prints a table.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mage_ext  # noqa: E402
import peers_flashinfer  # noqa: E402
from common import (SHAPES, copy_bandwidth_tbps, eager_us, environment,  # noqa: E402
                    graph_time_us, layers_graph_us, matmul_tflops, time_us, write_results)
CACHE_LENS = [8192, 32768, 65536, 131072]
BATCHES = [1, 8, 32]
KS = [256, 512, 2048]
FIRST_STEP_K = 512
DTYPE = torch.bfloat16


def configs(quick: bool, batches=None, lens=None, shapes=None):
    # batch outermost: a run cut short still has every shape at the small batches
    for batch in (batches or ([1] if quick else BATCHES)):
        for name, (hq, hkv, d) in SHAPES.items():
            if shapes and name not in shapes:
                continue
            for block in ([32] if quick or not name.startswith("sdar") else [32, 4]):
                for n in (lens or ([32768, 131072] if quick else CACHE_LENS)):
                    yield name, hq, hkv, d, block, batch, n


def timed(fn) -> float:
    try:
        return graph_time_us(fn)
    except RuntimeError:  # not capturable: eager
        torch.cuda.synchronize()
        return time_us(fn)


def run_config(name, hq, hkv, d, block, batch, n, bw, tflops, flex, flashinfer):
    esize = 2
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=DTYPE)  # noqa: E731
    q, kb, vb = rnd(batch, hq, block, d), rnd(batch, hkv, block, d), rnd(batch, hkv, block, d)
    kc, vc = rnd(batch, hkv, n, d), rnd(batch, hkv, n, d)
    lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
    out, lse = torch.empty_like(q), torch.empty(batch, hq, block, device="cuda")
    scores = torch.empty(batch, hkv, n, device="cuda")
    io_bytes = 3 * q.numel() * esize + q.numel() * esize  # q, k_block, v_block (upper), out
    kv_bytes = 2 * kc.numel() * esize
    floor = lambda nbytes: nbytes / (bw * 1e12) * 1e6  # noqa: E731
    rows = batch * hq * block
    compute_floor = lambda keys: 4 * rows * keys * d / (tflops * 1e12) * 1e6  # noqa: E731
    shape = f"{name} Hq{hq}/Hkv{hkv}/d{d}"
    base = dict(shape=shape, batch=batch, cache_len=n, block=block, dtype="bf16")
    records = []

    # Peers' inputs (not timed): K/V with the block appended; and expanded to all heads.
    k_full, v_full = torch.cat([kc, kb], 2), torch.cat([vc, vb], 2)
    expanded_bytes = 2 * batch * hq * (n + block) * d * esize
    expand = expanded_bytes < 24e9
    if expand:
        k_exp = k_full.repeat_interleave(hq // hkv, dim=1)
        v_exp = v_full.repeat_interleave(hq // hkv, dim=1)

    def dense():
        mage_ext.ops.dense_attention_out(q, kc, vc, lens, kb, vb, None, out, lse)

    peers = {"sdpa_gqa": timed(lambda: F.scaled_dot_product_attention(q, k_full, v_full,
                                                                         enable_gqa=True))}
    if expand:
        peers["sdpa_expanded_kv"] = timed(
            lambda: F.scaled_dot_product_attention(q, k_exp, v_exp))
    if flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex_c = torch.compile(flex_attention, dynamic=False)
        peers["flex_attention"] = timed(lambda: flex_c(q, k_full, v_full, enable_gqa=True))
    if flashinfer:
        try:
            peers["flashinfer_prefill"] = timed(peers_flashinfer.make_dense(q, k_full, v_full))
        except Exception as e:  # report, keep benchmarking the rest
            print(f"flashinfer peer failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    records.append(dict(base, op="dense_step", k=None, time_us=timed(dense),
                        eager_us=eager_us(dense),
                        floor_us=floor(kv_bytes + io_bytes),
                        compute_floor_us=compute_floor(n + block), peers=peers))

    idx = torch.empty(batch, hkv, FIRST_STEP_K, dtype=torch.int32, device="cuda")
    cnt = torch.empty(batch, hkv, dtype=torch.int32, device="cuda")

    def first():
        mage_ext.ops.attention_with_scores_out(q, kc, vc, lens, kb, vb, None, out, lse, scores)
        mage_ext.ops.topk_select_out(scores, lens, FIRST_STEP_K, 0, 0, idx, cnt)

    def naive_first():  # explicit probabilities (the scores need them), then torch.topk
        logits = torch.matmul(q.view(batch, hkv, -1, d).float(),
                              k_full.transpose(2, 3).float()) / math.sqrt(d)
        p = logits.softmax(-1)
        o = torch.matmul(p.to(DTYPE), v_full)
        return o, p[..., :n].mean(2).topk(FIRST_STEP_K, -1).indices

    first_peers = {"sdpa_gqa_no_scores": peers["sdpa_gqa"]}
    if batch * hq * block * (n + block) * 4 < 8e9:
        first_peers["naive_torch"] = timed(naive_first)
    records.append(dict(base, op="first_step", k=FIRST_STEP_K, time_us=timed(first),
                        eager_us=eager_us(first),
                        floor_us=floor(kv_bytes + io_bytes),
                        compute_floor_us=compute_floor(n + block), peers=first_peers))
    topk = dict(base, op="topk", k=FIRST_STEP_K,
                time_us=timed(lambda: mage_ext.ops.topk_select_out(
                    scores, lens, FIRST_STEP_K, 0, 0, idx, cnt)),
                floor_us=floor(scores.numel() * 4),
                peers={"torch_topk": timed(lambda: scores.topk(FIRST_STEP_K, -1))})
    if batch == 1:
        def topk_layer():
            s = scores.clone()  # each layer its own scores (same distribution)
            return lambda: mage_ext.ops.topk_select_out(s, lens, FIRST_STEP_K, 0, 0, idx, cnt)
        topk["layers_graph_us"] = layers_graph_us(topk_layer)
    records.append(topk)

    for k in KS:
        sel_scores = torch.rand(batch, hkv, n, device="cuda")
        sidx, scnt = mage_ext.topk_select(sel_scores, lens, k)
        gather_idx = sidx.long().unsqueeze(-1).expand(batch, hkv, k, d)

        def sparse():
            mage_ext.ops.sparse_attention_out(q, kc, vc, sidx, scnt, kb, vb, None, out, lse)

        def naive_sparse():
            ks = torch.cat([kc.gather(2, gather_idx), kb], 2)
            vs = torch.cat([vc.gather(2, gather_idx), vb], 2)
            return F.scaled_dot_product_attention(q, ks, vs, enable_gqa=True)

        rec = dict(base, op="sparse_step", k=k, time_us=timed(sparse),
                   eager_us=eager_us(sparse),
                   floor_us=floor(2 * batch * hkv * k * d * esize + io_bytes),
                   compute_floor_us=compute_floor(k + block),
                   peers={"naive_torch_gather_sdpa": timed(naive_sparse)})
        if batch == 1:
            def sparse_layer():
                kc_l, vc_l = rnd(batch, hkv, n, d), rnd(batch, hkv, n, d)
                idx_l, cnt_l = mage_ext.topk_select(torch.rand_like(sel_scores), lens, k)
                return lambda: mage_ext.ops.sparse_attention_out(q, kc_l, vc_l, idx_l, cnt_l, kb,
                                                                 vb, None, out, lse)
            rec["layers_graph_us"] = layers_graph_us(sparse_layer)
            torch.cuda.empty_cache()
        records.append(rec)
    return records


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1, 32K and 128K only")
    p.add_argument("--flex", action="store_true", help="also time FlexAttention (compiles)")
    p.add_argument("--no-flashinfer", action="store_true", help="skip the FlashInfer peer")
    p.add_argument("--output", default="kernels_h200.json")
    ints = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    p.add_argument("--batches", type=ints, default=None, help="e.g. 1,32 (default: the grid's)")
    p.add_argument("--lens", type=ints, default=None, help="cache lengths, e.g. 32768")
    p.add_argument("--shapes", type=lambda v: v.split(","), default=None,
                   help=f"a subset of {','.join(SHAPES)}")
    args = p.parse_args()
    flashinfer = not args.no_flashinfer and peers_flashinfer.available() is None
    if not args.no_flashinfer and not flashinfer:
        print(f"FlashInfer peer unavailable: {peers_flashinfer.available()}")
    bw = copy_bandwidth_tbps()
    tflops = matmul_tflops()
    env = dict(environment(), copy_bw_tbps=bw, matmul_tflops=tflops)
    print(f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, copy {bw:.2f} TB/s, "
          f"bf16 mm {tflops:.0f} TFLOP/s")
    records = []
    header = f"{'op':12} {'shape':26} {'B':>3} {'bat':>4} {'N':>7} {'k':>5} {'us':>9} " \
             f"{'eager':>8} {'floor':>8} {'x':>6} {'cfloor':>7}  peers (us)"
    print(header)
    for cfg in configs(args.quick, args.batches, args.lens, args.shapes):
        for r in run_config(*cfg, bw=bw, tflops=tflops, flex=args.flex, flashinfer=flashinfer):
            records.append(r)
            write_results(args.output, dict(env, records=records))  # partial runs keep their data
            peers = ", ".join(f"{k}={v:.1f}" for k, v in r["peers"].items())
            if "layers_graph_us" in r:
                peers += f"  [28-layer graph: {r['layers_graph_us']:.1f} us/layer]"
            print(f"{r['op']:12} {r['shape']:26} {r['block']:>3} {r['batch']:>4} "
                  f"{r['cache_len']:>7} {str(r['k'] or ''):>5} {r['time_us']:>9.1f} "
                  f"{r.get('eager_us', float('nan')):>8.1f} {r['floor_us']:>8.1f} {r['time_us'] / r['floor_us']:>6.2f} "
                  f"{r.get('compute_floor_us', 0.0):>7.1f}  {peers}",
                  flush=True)
        torch.cuda.empty_cache()
    path = write_results(args.output, dict(env, records=records))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
