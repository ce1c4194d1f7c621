"""The end-to-end benchmark script runs (tiny CPU shape) and writes its result file."""
import json
import os
import sys

from tiny_models import one_thread  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))


def test_bench_e2e_smoke(tmp_path, capsys):
    import bench_e2e

    out = tmp_path / "e2e.json"
    bench_e2e.main(["--smoke", "--context", "70", "--blocks", "2", "--k", "8", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"device", "torch", "commit", "date", "records"} <= set(data)
    exact, mage = data["records"]
    assert exact["policy"] == "exact" and exact["kv_fraction"] == 1.0
    assert mage["kv_fraction"] < 1.0 and mage["n_later"] > 0
    assert "later ms" in capsys.readouterr().out
