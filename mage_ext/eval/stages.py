"""python -m mage_ext.eval.stages BEFORE AFTER --out FILE: one MAGE-FT evidence file from two runs.

BEFORE and AFTER are files of ``python -m mage_ext.eval --stage before`` / ``--stage after``
over the same grid (tasks, lengths, depths, samples, methods, budgets, dense layers, seeds;
checked). Either may list several comma-separated files of one stage that differ only in their
seeds (a grid split over several runs): they are joined first (``join_seeds``). The output keeps
every record of both (each carries its ``stage``), the after run's ``steps`` and ``lambda``,
the top-level ``device``, ``torch``, ``commit`` and ``date`` of the after run, and each run's
own header under ``runs``. A committed file is never overwritten without --force. It then
prints a before / after table (accuracy per task, mass recall and its ceiling; means over
seeds).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..cli_common import CliError, Parser, refuse_committed, run_cli

PROG = "python -m mage_ext.eval.stages"
# config entries that must agree (the rest, e.g. batch size or progress, may differ)
GRID = ("tasks", "lengths", "depths", "samples_per_depth", "methods", "ks", "dense_layers",
        "seeds", "recall")
HEADER = ("model", "commit", "commits", "device", "torch", "dtype", "date", "stage", "steps",
          "lambda", "note")


def combine(before: dict, after: dict) -> dict:
    """The evidence file of a before and an after run of the same grid (dicts as written)."""
    for name, run, stage in (("before", before, "before"), ("after", after, "after")):
        if run.get("stage") != stage:
            raise ValueError(f"{name}: expected a run with stage '{stage}', got "
                             f"{run.get('stage')!r} (python -m mage_ext.eval --stage {stage})")
        if run.get("complete") is False:   # (files of older versions carry no flag)
            raise ValueError(f"{name}: an unfinished run ({len(run.get('records', []))} records "
                             f"written so far): wait for it to end, or run it again")
    differ = [k for k in GRID if before["config"].get(k) != after["config"].get(k)]
    if differ:
        raise ValueError(f"the runs used different grids: {', '.join(differ)} differ")
    if before.get("device") != after.get("device") or before.get("dtype") != after.get("dtype"):
        raise ValueError(f"the runs ran on different devices / dtypes: {before.get('device')} "
                         f"{before.get('dtype')} and {after.get('device')} {after.get('dtype')}")
    return dict(device=after["device"], torch=after.get("torch"), commit=after["commit"],
                date=after["date"], steps=after["steps"], **{"lambda": after["lambda"]},
                config=after["config"],
                runs={r["stage"]: {k: r.get(k) for k in HEADER} for r in (before, after)},
                records=before["records"] + after["records"])


def _seeds(run: dict) -> list:
    config = run["config"]   # files written before the seeds list carry one "seed"
    return list(config["seeds"]) if "seeds" in config else [config.get("seed", 0)]


def join_seeds(runs: list) -> dict:
    """One run from runs of the same stage, model, device and grid over disjoint seeds (a grid
    split over calls); records in the order given, ``commit`` / ``date`` of the last, the
    commits of all under ``commits``."""
    if len(runs) == 1:
        return runs[0]
    first, seen = runs[0], set()
    for i, run in enumerate(runs):
        differ = [k for k in GRID
                  if k != "seeds" and run["config"].get(k) != first["config"].get(k)]
        differ += [k for k in ("model", "stage", "steps", "lambda", "device", "dtype")
                   if run.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"file {i + 1} of one stage differs from the first in: "
                             f"{', '.join(differ)} (only the seeds may differ)")
        if run.get("complete") is False:
            raise ValueError(f"file {i + 1} of one stage is an unfinished run")
        seeds = set(_seeds(run))
        if seeds & seen:
            raise ValueError(f"file {i + 1} of one stage repeats seeds {sorted(seeds & seen)}")
        seen |= seeds
    last = runs[-1]
    return dict(last, config=dict(last["config"], seeds=[s for r in runs for s in _seeds(r)]),
                commits=[r.get("commit") for r in runs],
                note="; ".join(dict.fromkeys(r.get("note") or "" for r in runs)) or None,
                records=[rec for r in runs for rec in r["records"]])


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def table(evidence: dict) -> str:
    """Markdown: one row per (method, dense layers, k), each task's accuracy, the mass recall and
    its ceiling (``oracle_mass``) before -> after, each a mean over the seeds (records weighted
    alike: equal prompts a cell)."""
    tasks = evidence["config"]["tasks"]
    cells: dict = {}
    for r in evidence["records"]:
        key = (r["method"], r.get("dense_layers"), r.get("k"))
        cells.setdefault(key, {}).setdefault(r["stage"], []).append(r)
    head = ["method", "dense layers", "k"] + tasks + ["mass recall", "mass ceiling"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pair(rows_by_stage, pick) -> str:
        b, a = (_mean(pick(rows_by_stage.get(st, []))) for st in ("before", "after"))
        return "—" if b != b and a != a else f"{b:.3f} -> {a:.3f}"

    order = {m: i for i, m in enumerate(evidence["config"]["methods"])}
    for key in sorted(cells, key=lambda c: (order.get(c[0], 99), -(c[1] or 0), c[2] or 0)):
        method, dense, k = key
        by_stage = cells[key]
        row = [method, "all" if dense is None else str(dense), "—" if k is None else str(k)]
        for t in tasks:
            row.append(pair(by_stage, lambda rs: [r["accuracy"] for r in rs if r["task"] == t]))
        row.append(pair(by_stage, lambda rs: [r.get("mass_recall") for r in rs]))
        row.append(pair(by_stage, lambda rs: [r.get("oracle_mass") for r in rs]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def build_parser() -> Parser:
    p = Parser(PROG, __doc__)
    p.add_argument("before", metavar="BEFORE", help="results of the --stage before run "
                   "(several files of disjoint seeds: comma-separated)")
    p.add_argument("after", metavar="AFTER", help="results of the --stage after run (likewise)")
    p.add_argument("--out", required=True, metavar="FILE", help="the combined file")
    p.add_argument("--force", action="store_true", help="allow --out to replace a committed file")
    return p


def _load(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CliError(f"{path}: cannot read an evaluation file ({e})") from None


def _main(argv) -> None:
    a = build_parser().parse_args(argv)
    refuse_committed(a.out, a.force, "--out")
    try:
        data = combine(*(join_seeds([_load(f) for f in arg.split(",")])
                         for arg in (a.before, a.after)))
    except (KeyError, ValueError) as e:
        raise CliError(f"{a.before} + {a.after}: {e}") from None
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {a.out} ({len(data['records'])} records)")
    print(table(data))


def main(argv=None):
    run_cli(_main, PROG, argv)


if __name__ == "__main__":
    main()
