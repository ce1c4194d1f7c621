"""benchmarks/bench_cpp.py runs (tiny CPU shape, the CPU binary) and merges its rows."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
BINARY = Path(__file__).resolve().parents[2] / "build" / "cpp-tests" / "mage_generate"


@pytest.mark.skipif(not BINARY.is_file(), reason=f"{BINARY} is not built")
def test_bench_cpp_smoke_merges_rows(tmp_path):
    import bench_cpp

    out = tmp_path / "e2e.json"
    out.write_text(json.dumps({"device": "x", "records": [
        {"shape": "smoke", "context": 100, "batch": 1, "policy": "exact", "k": None,
         "graphs": False, "runtime": "cpp", "stale": True},
        {"policy": "exact", "later_step_ms": 1.0}]}))  # another benchmark's row: kept
    bench_cpp.main(["--smoke", "--context", "100", "--blocks", "3", "--k", "16",
                    "--binary", str(BINARY), "--out", str(out)])
    data = json.loads(out.read_text())
    rows = data["records"]
    assert data["device"] == "x" and {"later_step_ms": 1.0, "policy": "exact"} in rows
    ours = [r for r in rows if r.get("shape") == "smoke"]
    assert {(r["policy"], r["runtime"]) for r in ours} == {
        (p, rt) for p in ("exact", "mage") for rt in ("cpp", "python")}
    assert not any(r.get("stale") for r in ours)  # replaced, not duplicated
    for r in ours:
        assert r["prefill_s"] > 0 and r["later_ms"] > 0 and r["block_ms"] > 0, r
        assert r["host_peak_mb"] > 0 and r["load_s"] > 0
