"""The generation command line: ``python -m mage_ext.generate --model DIR --prompt "..."``.

``mage_ext/generate.py`` only calls ``generate_main``; keeping the code here means importing it
(tests do) never rebinds ``mage_ext.generate``, the function, to a module.
"""
from __future__ import annotations

import argparse
import sys

import torch

from mage_ext.core.policy import PolicyConfig
from mage_ext.generation import REMASKING, STYLES, generate
from mage_ext.hf.checkpoint import load_model


def generate_main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mage_ext.generate",
                                 description="Block-diffusion generation with MAGE or another "
                                             "attention policy.")
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    ap.add_argument("--policy", default="mage", help="exact|mage|quest|tidal|sparsed")
    ap.add_argument("--k", type=int, default=512, help="KV budget per layer and KV head")
    ap.add_argument("--adaptive", action="store_true", help="adaptive per-layer budgets")
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--commit-attention", default="sparse", choices=["sparse", "exact"])
    ap.add_argument("--style", choices=STYLES, default=None, help="default: from the checkpoint")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--sub-block", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=4, help="SDAR steps per block")
    ap.add_argument("--remasking", choices=REMASKING, default="low_confidence_static")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                    help="run eager forwards on a GPU (default: the forwards of a block replay "
                         "as CUDA graphs where possible)")
    a = ap.parse_args(argv)
    lm = load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    policy = PolicyConfig(method=a.policy, k=a.k, adaptive=a.adaptive,
                          dense_layers=a.dense_layers, commit_attention=a.commit_attention)
    res = generate(lm, None, a.prompt, policy=policy, style=a.style, block_size=a.block_size,
                   sub_block=a.sub_block, threshold=a.threshold, steps=a.steps,
                   remasking=a.remasking, max_new_tokens=a.max_new_tokens,
                   temperature=a.temperature, top_p=a.top_p, progress=True,
                   cuda_graphs=a.cuda_graphs)
    for text in res.texts or [str(ids) for ids in res.token_ids]:
        print(text)
        print("-" * 40)
    first, later = res.median_step_time(True), res.median_step_time(False)
    fmt = lambda t: "n/a" if t is None else f"{t * 1e3:.2f} ms"  # noqa: E731
    print(f"steps: first {fmt(first)}, later {fmt(later)} (median); KV read {res.kv_fraction:.3f}",
          file=sys.stderr)
