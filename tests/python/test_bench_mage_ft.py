"""benchmarks/bench_mage_ft.py --smoke: the MAGE-FT memory / speed script runs on the CPU with a
tiny shape and writes the record layout of the GPU run (which is the lead's)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_mage_ft as B  # noqa: E402
from tiny_models import one_thread  # noqa: E402,F401


def test_smoke_writes_the_records(tmp_path):
    out = tmp_path / "mage_ft.json"
    B.main(["--smoke", "--out", str(out)])
    doc = json.loads(out.read_text())
    for key in ("device", "torch", "cuda", "commit", "date", "records"):
        assert key in doc
    assert [(r["shape"], r["mode"]) for r in doc["records"]] == [("smoke", "lora"),
                                                               ("smoke", "full")]
    for r in doc["records"]:
        for key in ("seq_len", "optimizer", "peak_gb", "step_s", "plain_step_s", "passes"):
            assert key in r, key
        assert r["step_s"] > 0 and r["plain_step_s"] > 0
        assert set(r["passes"]) == {"select_teacher", "student_fwd_bwd", "optimizer"}
    lora, full = doc["records"]
    assert lora["trainable_params"] < full["trainable_params"]
