"""python -m mage_ext.eval --model DIR [options]: the evaluation harness on the command line.

Writes the records (benchmarks/results/eval_tiny.json by default: top-level model, commit, date,
records with method, k, adaptive, task, context_len, accuracy, recall, mass_recall,
kv_fraction), prints a markdown table and, with --heatmaps DIR, one needle heatmap per method.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

import torch

from .harness import METHOD_NAMES, EvalConfig, evaluate, records_table, summary_table


def _ints(s):
    return tuple(int(x) for x in s.split(",") if x)


def _commit() -> str:
    if os.environ.get("MAGE_COMMIT"):  # machines whose checkout has no (current) git history
        return os.environ["MAGE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # not a git checkout (an installed package)
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mage_ext.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, "
                   "model.safetensors, tokenizer.json)")
    p.add_argument("--tasks", default="passkey,niah_single")
    p.add_argument("--lengths", type=_ints, default=(4096, 8192, 16384))
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--samples", type=int, default=2, help="samples per (depth, length)")
    p.add_argument("--methods", default=",".join(METHOD_NAMES))
    p.add_argument("--ks", type=_ints, default=(64, 128, 256, 512, 1024, 2048))
    p.add_argument("--dense-layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-recall", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/eval_tiny.json")
    p.add_argument("--heatmaps", default=None, help="folder for needle heatmap PNGs")
    a = p.parse_args(argv)
    cfg = EvalConfig(tasks=tuple(a.tasks.split(",")), lengths=a.lengths,
                     depths=tuple(float(x) for x in a.depths.split(",")),
                     samples_per_depth=a.samples, methods=tuple(a.methods.split(",")), ks=a.ks,
                     dense_layers=a.dense_layers, batch_size=a.batch_size,
                     recall=not a.no_recall, seed=a.seed)
    dtype = getattr(torch, a.dtype) if a.dtype else None
    device = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"
    payload = dict(model=str(a.model), commit=_commit(), device=device, dtype=a.dtype or "float32",
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   config={k: list(v) if isinstance(v, tuple) else v
                           for k, v in vars(cfg).items()}, records=[])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write_partial(rec):  # a long run that is cut short keeps what it finished
        payload["records"].append(rec)
        out.write_text(json.dumps(payload, indent=1) + "\n")

    report = evaluate(a.model, cfg, device=a.device, dtype=dtype, on_record=write_partial)
    payload.update(report)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(records_table(report["records"]))
    print()
    print(summary_table(report["records"]))
    for nm in report["needle_mass"]:
        layers = ", ".join(f"L{k}={v:.3f}" for k, v in nm["per_layer"].items() if v is not None)
        print(f"needle mass at decode (exact), {nm['task']} {nm['context_len']}: {layers}")
    if a.heatmaps:
        from .plots import heatmaps
        heatmaps(report["heatmap"], a.heatmaps)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
