"""The fused layer ops (mage.rms_norm, mage.qkv_rope, mage.silu_mul) against the transformers
module sequences they replace, per layer, on a GPU.

For each model shape (Fast-dLLM v2 1.5B and 7B; Qwen3-style q/k norms on the same shapes for
qkv_rope), batch 1 and 16, 32 tokens a sequence, bf16:
  rms_norm   fused: rms_norm_out(x, w, eps, residual, out, residual) (in-place residual)
             peer:  residual + x, then Qwen2RMSNorm
  qkv_rope   fused: qkv_rope_out(qkv, positions, inv_freq, ...) -> q, k, v [batch, H, B, d]
             peer:  the q/k/v projections' outputs viewed as heads, [q_norm / k_norm,] transpose,
                    apply_rotary_pos_emb with the forward's cos / sin (computed once per forward
                    by transformers, so not timed), then .contiguous() of q, k, v (the layout
                    the mage attention ops take)
  silu_mul   fused: silu_mul_out(gate_up, out)
             peer:  act_fn(gate) * up (Qwen2MLP, gate and up as the separate projections' outputs)
Both sides are captured in CUDA graphs as 28 calls (one a layer, each on its own tensors) and
the replays timed with CUDA events, cold L2 (common.layers_graph_us: per-layer microseconds).
Floor = bytes the op must move (inputs read once, outputs written once) / the copy bandwidth
measured in the same run.

    python benchmarks/bench_fused_ops.py [--quick]
Writes benchmarks/results/fused_ops_h200.json and prints a table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers.activations import ACT2FN
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (Qwen2RMSNorm, Qwen2RotaryEmbedding,
                                                      apply_rotary_pos_emb)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mage_ext  # noqa: E402,F401
from mage_ext import ops  # noqa: E402
from common import copy_bandwidth_tbps, environment, layers_graph_us, write_results  # noqa: E402

# name: (hidden, Hq, Hkv, head dim, intermediate)
MODELS = {"fdllm-1.5b": (1536, 12, 2, 128, 8960), "fdllm-7b": (3584, 28, 4, 128, 18944)}
DTYPE = torch.bfloat16
EPS = 1e-6
BLOCK = 32


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=DTYPE) * scale


def rms_norm_pair(batch, hidden, **_):
    """(fused layer, peer layer, bytes) makers for the residual add + RMSNorm."""
    def fused():
        x, res, w, out = rnd(batch, BLOCK, hidden), rnd(batch, BLOCK, hidden), rnd(hidden), \
            rnd(batch, BLOCK, hidden)
        return lambda: ops.rms_norm_out(x, w, EPS, res, out, res)

    def peer():
        x, res = rnd(batch, BLOCK, hidden), rnd(batch, BLOCK, hidden)
        norm = Qwen2RMSNorm(hidden, eps=EPS).to("cuda", DTYPE)

        def run():
            h = res + x
            return norm(h), h
        return run

    nbytes = (4 * batch * BLOCK * hidden + hidden) * 2
    return fused, peer, nbytes


def qkv_rope_pair(batch, hq, hkv, d, qk_norm=False, **_):
    config = Qwen2Config(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hkv,
                         head_dim=d, rope_theta=1e6, max_position_embeddings=262144)
    rotary = Qwen2RotaryEmbedding(config).to("cuda")
    positions = (131072 - BLOCK + torch.arange(BLOCK, device="cuda")).expand(batch, BLOCK)
    positions = positions.contiguous()
    width = (hq + 2 * hkv) * d

    def fused():
        qkv = rnd(batch, BLOCK, width)
        norms = (rnd(d), rnd(d)) if qk_norm else (None, None)
        q = torch.empty(batch, hq, BLOCK, d, device="cuda", dtype=DTYPE)
        k, v = (torch.empty(batch, hkv, BLOCK, d, device="cuda", dtype=DTYPE) for _ in range(2))
        return lambda: ops.qkv_rope_out(qkv, positions, rotary.inv_freq, hq, hkv, d, *norms,
                                        EPS, q, k, v)

    def peer():
        q_lin, k_lin, v_lin = rnd(batch, BLOCK, hq * d), rnd(batch, BLOCK, hkv * d), \
            rnd(batch, BLOCK, hkv * d)
        cos, sin = rotary(q_lin, positions)  # once per forward in transformers: not timed
        q_norm = Qwen2RMSNorm(d, eps=EPS).to("cuda", DTYPE)
        k_norm = Qwen2RMSNorm(d, eps=EPS).to("cuda", DTYPE)

        def run():
            q = q_lin.view(batch, BLOCK, hq, d)
            k = k_lin.view(batch, BLOCK, hkv, d)
            if qk_norm:
                q, k = q_norm(q), k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            v = v_lin.view(batch, BLOCK, hkv, d).transpose(1, 2)
            return q.contiguous(), k.contiguous(), v.contiguous()
        return run

    nbytes = 2 * batch * BLOCK * width * 2 + batch * BLOCK * 8 + d * 2 + (4 * d if qk_norm else 0)
    return fused, peer, nbytes


def silu_mul_pair(batch, inter, **_):
    act = ACT2FN["silu"]

    def fused():
        gate_up, out = rnd(batch, BLOCK, 2 * inter, scale=4.0), rnd(batch, BLOCK, inter)
        return lambda: ops.silu_mul_out(gate_up, out)

    def peer():
        gate, up = rnd(batch, BLOCK, inter, scale=4.0), rnd(batch, BLOCK, inter, scale=4.0)
        return lambda: act(gate) * up

    return fused, peer, 3 * batch * BLOCK * inter * 2


CASES = [("rms_norm", rms_norm_pair, {}), ("qkv_rope", qkv_rope_pair, {}),
         ("qkv_rope+qk_norm", qkv_rope_pair, {"qk_norm": True}), ("silu_mul", silu_mul_pair, {})]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1 only")
    p.add_argument("--output", default="fused_ops_h200.json")
    args = p.parse_args()
    if not torch.cuda.is_available() or not mage_ext.cuda_kernels_built():
        sys.exit("needs a GPU and a build with the CUDA kernels")

    env = environment()
    bw = copy_bandwidth_tbps()
    env["copy_bw_tbps"] = round(bw, 3)
    print(f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, copy {bw:.2f} TB/s")
    print(f"{'op':18} {'shape':11} {'batch':>5} {'fused us':>9} {'peer us':>9} {'speedup':>8} "
          f"{'floor us':>9} {'fused/floor':>11}")
    records = []
    for batch in ([1] if args.quick else [1, 16]):
        for model, (hidden, hq, hkv, d, inter) in MODELS.items():
            for name, make, extra in CASES:
                fused, peer, nbytes = make(batch=batch, hidden=hidden, hq=hq, hkv=hkv, d=d,
                                           inter=inter, **extra)
                fused_us = layers_graph_us(fused)
                peer_us = layers_graph_us(peer)
                floor_us = nbytes / (bw * 1e12) * 1e6
                r = dict(op=name, shape=model, batch=batch, tokens=BLOCK, dtype="bf16",
                         fused_us=round(fused_us, 3), transformers_us=round(peer_us, 3),
                         speedup=round(peer_us / fused_us, 2), bytes=nbytes,
                         floor_us=round(floor_us, 3))
                records.append(r)
                print(f"{name:18} {model:11} {batch:>5} {fused_us:>9.2f} {peer_us:>9.2f} "
                      f"{peer_us / fused_us:>7.2f}x {floor_us:>9.2f} "
                      f"{fused_us / floor_us:>10.1f}x", flush=True)
                torch.cuda.empty_cache()
    path = write_results(args.output, dict(env, records=records))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
