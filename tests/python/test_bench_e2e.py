"""The end-to-end benchmark script runs (tiny CPU shape) and writes its result file."""
import json
import os
import sys

from tiny_models import one_thread  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))


def test_bench_e2e_smoke(tmp_path, capsys):
    import bench_e2e

    out = tmp_path / "e2e.json"
    bench_e2e.main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"device", "torch", "cuda", "commit", "date", "copy_bw_tbps", "records"} <= set(data)
    keys = {"shape", "context", "batch", "policy", "k", "graphs", "prefill_s", "first_ms",
            "later_ms", "commit_ms", "block_ms", "tokens_per_s", "floor_first_ms",
            "floor_later_ms", "floor_commit_ms", "peers"}
    recs = data["records"]
    assert recs and all(keys <= set(r) for r in recs)
    fixed = [r for r in recs if r["mode"] == "fixed"]
    assert {r["policy"] for r in fixed} == {"exact", "mage"}
    assert all(r["steps_per_block"] == 8 for r in fixed)
    assert all(r["floor_later_ms"] <= r["floor_first_ms"] for r in recs)
    one = [r for r in recs if r["batch"] == 1]
    assert one[0]["prefill_s"] > 0 and "stock_denoise_forward_ms" in one[0]["peers"]
    assert "block" in capsys.readouterr().out
