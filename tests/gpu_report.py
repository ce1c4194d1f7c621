"""Writes the GPU test record (tests/run_gpu.sh): one JSON with the commit, date, device, torch
and CUDA versions, pass / fail / skip counts per pytest suite (from JUnit XML) and a verdict per
compute-sanitizer tool. A record already at the path for the same commit is merged into (so the
suites and the sanitizers may run in separate calls on the GPU machine); another commit's is
replaced.

    python3 tests/gpu_report.py --json tests/results/gpu_h200.json \
        --suite cuda=/tmp/cuda.xml --sanitizer memcheck=pass:"ERROR SUMMARY: 0 errors"
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import environment  # noqa: E402  (commit: MAGE_COMMIT or git; device; versions)


def junit_counts(path: str) -> dict:
    """{passed, failed, skipped, seconds} of a pytest --junitxml file (errors count as failed);
    a missing file (pytest did not get as far as writing it) is one failure."""
    if not Path(path).is_file():
        return {"passed": 0, "failed": 1, "skipped": 0, "seconds": 0.0, "note": "no report"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    for s in suites:
        for key in total:
            total[key] += float(s.get(key, 0) or 0)
    failed = int(total["failures"] + total["errors"])
    skipped = int(total["skipped"])
    return {"passed": int(total["tests"]) - failed - skipped, "failed": failed,
            "skipped": skipped, "seconds": round(total["time"], 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="the record to write (merged when same commit)")
    ap.add_argument("--suite", action="append", default=[], help="NAME=junit.xml")
    ap.add_argument("--sanitizer", action="append", default=[],
                    help="TOOL=VERDICT[:summary line]; VERDICT pass, fail, timeout or unavailable")
    args = ap.parse_args(argv)

    env = environment("cuda")
    if env["device"] != "cpu":
        import torch
        env["device"] = f"{env['device']} x{torch.cuda.device_count()}"
    path = Path(args.json)
    record = {}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("commit") == env["commit"]:
            record = old
    record.update({k: env[k] for k in ("commit", "date", "device", "torch", "cuda")})
    record.setdefault("counts", {})
    record.setdefault("sanitizer", {})
    record.setdefault("sanitizer_summary", {})
    for item in args.suite:
        name, xml = item.split("=", 1)
        record["counts"][name] = junit_counts(xml)
    for item in args.sanitizer:
        tool, rest = item.split("=", 1)
        verdict, _, summary = rest.partition(":")
        record["sanitizer"][tool] = verdict
        record["sanitizer_summary"][tool] = summary.strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(json.dumps(record, indent=2, sort_keys=True))
    bad = [n for n, c in record["counts"].items() if c["failed"]]
    bad += [t for t, v in record["sanitizer"].items() if v not in ("pass", "unavailable")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
