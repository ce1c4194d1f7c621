"""python -m mage_ext.eval --model DIR [options]: the evaluation harness on the command line.

Runs every method at every budget (and dense-layer setting) on the synthetic tasks, once per
seed, and writes the records to runs/eval/eval-<UTC time>.json (git-ignored) unless --out names
a file: top-level model, commit, device, torch, dtype, date, stage, steps, lambda, note, config,
records (stage, method, k, adaptive, dense_layers, task, context_len, seed, accuracy, recall,
mass_recall, oracle_mass: the mass the step's own top-k holds, mass recall's ceiling,
kv_fraction, n), heatmap, needle_mass, complete (false while records are still
being added: the file is rewritten after each one). --stage before / after marks a run before or
after MAGE-FT (with the fine-tuning's --steps and --lambda; python -m mage_ext.eval.stages joins a
before and an after file). Prints markdown tables and, with --heatmaps DIR, one needle heatmap
per method. A committed file (git ls-files) is never overwritten without --force.
docs/evaluation.md describes the tasks, the metrics and the committed results.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
from pathlib import Path

from ..cli_common import (DTYPES, CliError, Parser, name_list, nonnegative_float,
                          nonnegative_int, nonnegative_int_list, positive_int, positive_int_list,
                          refuse_committed, resolve_device, resolve_dtype, run_cli,
                          unit_interval_list)
from .harness import METHOD_NAMES
from .tasks import TASKS

PROG = "python -m mage_ext.eval"


def _commit() -> str:
    if os.environ.get("MAGE_COMMIT"):  # machines whose checkout has no (current) git history
        return os.environ["MAGE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # not a git checkout (an installed package)
        return "unknown"


def build_parser() -> Parser:
    p = Parser(PROG, __doc__)
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory "
                   "(config.json, safetensors, tokenizer.json), e.g. mage_ext/assets/tiny_bd")
    p.add_argument("--tasks", type=name_list(TASKS), default="passkey,niah_single",
                   help=f"comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--lengths", type=positive_int_list, default="4096,8192,16384",
                   help="prompt lengths in tokens (multiples of the block size, >= 4 blocks)")
    p.add_argument("--depths", type=unit_interval_list, default="0.1,0.3,0.5,0.7,0.9",
                   help="needle depths in [0, 1]")
    p.add_argument("--samples", type=positive_int, default=2, metavar="N",
                   help="samples per (depth, length)")
    p.add_argument("--methods", type=name_list(METHOD_NAMES), default=",".join(METHOD_NAMES),
                   help="comma-separated (mage_l1: only layer 0 dense; random / recent: "
                        "MAGE's matched controls; control: the last prompt block only)")
    p.add_argument("--ks", type=positive_int_list, default="64,128,256,512,1024,2048",
                   help="KV budgets per layer and KV head")
    p.add_argument("--dense-layers", type=nonnegative_int_list, default="2", metavar="N[,N]",
                   help="layers that always read the whole cache (mage, the controls, "
                        "baselines); several values run each method once per value")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="prompts decoded together")
    p.add_argument("--no-recall", action="store_true",
                   help="skip the set / mass recall measurement (default: measured)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="cpu, cuda or cuda:N (auto: cuda when a GPU and the CUDA kernels are "
                        "there)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--seeds", "--seed", type=nonnegative_int_list, default="0", metavar="S[,S]",
                   help="seeds of the task samples (and of the random control's draws); the "
                        "grid runs once per seed")
    p.add_argument("--stage", choices=("before", "after"), default=None,
                   help="MAGE-FT evidence: the checkpoint is the model before or after "
                        "fine-tuning (recorded in every record; default: no stage)")
    p.add_argument("--steps", type=nonnegative_int, default=None, metavar="N",
                   help="with --stage after: the MAGE-FT steps the checkpoint had (before: 0)")
    p.add_argument("--lambda", dest="lam", type=nonnegative_float, default=None, metavar="X",
                   help="with --stage after: the KL weight of the fine-tuning")
    p.add_argument("--note", default=None, metavar="TEXT",
                   help="free text stored in the file (e.g. 'CPU smoke run, reduced grid')")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="results JSON (default: runs/eval/eval-<UTC time>.json)")
    p.add_argument("--force", action="store_true",
                   help="allow --out / --heatmaps to replace committed files (default: refuse)")
    p.add_argument("--heatmaps", default=None, metavar="DIR",
                   help="folder for needle heatmap PNGs (default: none)")
    return p


def main(argv=None):
    run_cli(_main, PROG, argv)


def _main(argv):
    a = build_parser().parse_args(argv)
    if a.stage is None and (a.steps is not None or a.lam is not None):
        raise CliError("--steps / --lambda: describe a fine-tuned checkpoint; give --stage too")
    if a.stage == "after" and (a.steps is None or a.lam is None):
        raise CliError("--stage after: name the fine-tuning's --steps and --lambda")
    if a.stage == "before":
        a.steps = 0 if a.steps is None else a.steps
    now = datetime.datetime.now(datetime.timezone.utc)
    out = Path(a.out or f"runs/eval/eval-{now:%Y%m%d-%H%M%S}.json")
    if out.is_dir():
        raise CliError(f"--out {out}: is a folder; name a file")
    refuse_committed(out, a.force, "--out")
    if a.heatmaps:
        refuse_committed(a.heatmaps, a.force, "--heatmaps")

    import torch

    from ..hf.checkpoint import load_model
    from .harness import EvalConfig, evaluate, records_table, summary_table
    from .tasks import make_sample

    cfg = EvalConfig(tasks=a.tasks, lengths=a.lengths, depths=a.depths, samples_per_depth=a.samples,
                     methods=a.methods, ks=a.ks, dense_layers=a.dense_layers,
                     batch_size=a.batch_size, recall=not a.no_recall, seed=a.seeds[0])
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    lm = load_model(a.model, device=device, dtype=dtype)
    for task in cfg.tasks:  # a bad length fails now, not after hours of the grid
        for n in cfg.lengths:
            try:
                make_sample(task, n, seed=0, depth=0.5, block_size=lm.block_size)
            except ValueError as e:
                raise CliError(f"--lengths: {task} at {n} tokens: {e}") from None
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}
    del config["seed"]
    config.update(seeds=list(a.seeds), samples_per_cell=len(cfg.depths) * cfg.samples_per_depth)
    payload = dict(model=str(a.model), commit=_commit(),
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, dtype=str(dtype).removeprefix("torch."),
                   date=now.isoformat(timespec="seconds"), stage=a.stage, steps=a.steps,
                   **{"lambda": a.lam}, note=a.note, config=config, complete=False, records=[])
    out.parent.mkdir(parents=True, exist_ok=True)

    def write_partial(rec):  # a long run that is cut short keeps what it finished
        payload["records"].append(dict(stage=a.stage, **rec))
        out.write_text(json.dumps(payload, indent=1) + "\n")

    report = dict(records=[], heatmap=[], needle_mass=[])
    for seed in a.seeds:
        part = evaluate(lm, dataclasses.replace(cfg, seed=seed), on_record=write_partial)
        for key, rows in part.items():
            report[key] += [dict(stage=a.stage, **r) for r in rows] if key == "records" else rows
    payload.update(report, complete=True)
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
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
