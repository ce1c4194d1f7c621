"""End-to-end step time of block-diffusion generation: exact attention vs. MAGE.

A random-weight model with the Fast-dLLM v2 1.5B shape (28 layers, hidden 1536, 12/2 heads,
d 128, intermediate 8960), bf16, a prompt of ``--context`` random tokens, ``--blocks`` generation
blocks through ``mage_ext.generate`` with each policy. Per denoising step it reports the first
(all-[MASK]) step and the later steps: device time (CUDA events, median), host wall time, and the
Python overhead per step (wall time minus device time; and the host time to issue the forward).
On a GPU each policy also runs with ``cuda_graphs=True`` (rows "+graph"). The prompt is prefilled
once and reused by every policy.

    python benchmarks/bench_e2e.py                       # H200: writes results/e2e_h200.json
    python benchmarks/bench_e2e.py --context 65536 --k 512 1024
    python benchmarks/bench_e2e.py --smoke               # tiny CPU run of the same code path
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from statistics import median

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import RESULTS, environment  # noqa: E402

from mage_ext import PolicyConfig, generate  # noqa: E402

SHAPE_1P5B = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, layers=28)
SHAPE_SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, layers=4)


def build_model(shape: dict, layers: int, context: int, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                      num_attention_heads=shape["num_attention_heads"],
                      num_key_value_heads=shape["num_key_value_heads"],
                      vocab_size=shape["vocab_size"], num_hidden_layers=layers,
                      max_position_embeddings=max(32768, 2 * context), rope_theta=1e6,
                      tie_word_embeddings=True, mask_token_id=shape["vocab_size"] - 1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(cfg).to(dtype).eval()


def summarize(res, label: str) -> dict:
    def med(rows, attr):
        vals = [getattr(r, attr) for r in rows]
        return median(vals) if vals else None

    first = [r for r in res.steps if r.phase == "denoise" and r.first]
    later = [r for r in res.steps if r.phase == "denoise" and not r.first]
    commit = [r for r in res.steps if r.phase == "commit"]
    overhead = [r.wall_s - r.device_s for r in later]
    return {
        "policy": label,
        "first_step_ms": 1e3 * med(first, "device_s"),
        "later_step_ms": 1e3 * med(later, "device_s") if later else None,
        "commit_ms": 1e3 * med(commit, "device_s") if commit else None,
        "later_wall_ms": 1e3 * med(later, "wall_s") if later else None,
        "python_overhead_ms": 1e3 * median(overhead) if overhead else None,
        "issue_ms": 1e3 * med(later, "issue_s") if later else None,
        "n_first": len(first), "n_later": len(later),
        "kv_fraction": res.kv_fraction,
        "prefill_s": sum(r.wall_s for r in res.steps if r.phase == "prefill"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=32768, help="prompt tokens")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the 1.5B shape")
    ap.add_argument("--blocks", type=int, default=2, help="generation blocks per policy")
    ap.add_argument("--k", type=int, nargs="+", default=[512], help="MAGE budgets")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (tests the script)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph rows")
    ap.add_argument("--out", default=None, help="result JSON (default results/e2e_h200.json)")
    a = ap.parse_args(argv)
    if a.smoke:
        shape, device, dtype = SHAPE_SMOKE, "cpu", torch.float32
        context = a.context if a.context != 32768 else 100
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_e2e: needs a CUDA GPU (or --smoke for a CPU run)")
        shape, device, dtype, context = SHAPE_1P5B, "cuda", getattr(torch, a.dtype), a.context
    layers = a.layers or shape["layers"]
    model = build_model(shape, layers, context, dtype, device)
    mask_id = shape["vocab_size"] - 1
    prompt = torch.randint(0, mask_id, (1, context), generator=torch.Generator().manual_seed(1))
    policies = [("exact", PolicyConfig(method="exact"), False)] + [
        (f"mage k={k}", PolicyConfig(method="mage", k=k), False) for k in a.k]
    if device == "cuda" and not a.no_graphs:  # the same policies with the steps as CUDA graphs
        policies += [(f"{label} +graph", p, True) for label, p, _ in policies]
    records, prefix = [], None
    for label, policy, graphs in policies:
        # One prefill for all policies (it is the same dense prefill): prefill_s is the first's.
        res = generate(model, input_ids=prompt, policy=policy, style="fast_dllm", block_size=32,
                       sub_block=8, threshold=a.threshold, max_new_tokens=32 * a.blocks,
                       mask_id=mask_id, stop_ids=[], progress=not a.smoke and prefix is None,
                       prefix=prefix, keep_prefix=prefix is None, cuda_graphs=graphs)
        prefix = prefix or res.prefix
        rec = summarize(res, label)
        rec.update(context=context, layers=layers, dtype=str(dtype).replace("torch.", ""))
        records.append(rec)
    exact_later = records[0]["later_step_ms"]
    print(f"\ncontext {context}, {layers} layers, {records[0]['dtype']}, device "
          f"{'cuda' if device == 'cuda' else 'cpu'}")
    head = (f"{'policy':<20}{'first ms':>10}{'later ms':>10}{'speedup':>9}{'commit ms':>11}"
            f"{'py ovh ms':>11}{'issue ms':>10}{'KV read':>9}")
    print(head)
    for r in records:
        speed = exact_later / r["later_step_ms"] if exact_later and r["later_step_ms"] else None
        r["later_speedup_vs_exact"] = speed
        fmt = lambda v, w: f"{v:>{w}.3f}" if v is not None else f"{'n/a':>{w}}"  # noqa: E731
        print(f"{r['policy']:<20}{fmt(r['first_step_ms'], 10)}{fmt(r['later_step_ms'], 10)}"
              f"{fmt(speed, 9)}{fmt(r['commit_ms'], 11)}{fmt(r['python_overhead_ms'], 11)}"
              f"{fmt(r['issue_ms'], 10)}{fmt(r['kv_fraction'], 9)}")
    out = a.out or (os.path.join("/tmp", "e2e_smoke.json") if a.smoke
                    else str(RESULTS / "e2e_h200.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    env = environment(device)
    with open(out, "w") as f:
        json.dump({"device": env["device"], "torch": env["torch"], "commit": env["commit"],
                   "date": env["date"], "records": records}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
