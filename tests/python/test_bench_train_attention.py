"""benchmarks/bench_train_attention.py --smoke: the script runs on the CPU (tiny shapes,
FlexAttention eager) and writes the JSON the GPU run writes (the GPU run itself is the lead's)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_train_attention as B  # noqa: E402


def test_smoke_writes_the_records(tmp_path, capsys):
    out = tmp_path / "train_attention.json"
    B.main(["--smoke", "--out", str(out)])
    doc = json.loads(out.read_text())
    for key in ("device", "torch", "cuda", "commit", "date", "records"):
        assert key in doc
    recs = doc["records"]
    # one shape x one length x (exact + one k) x (fwd, fwd+bwd)
    assert sorted((r["op"], r["k"], r["pass"]) for r in recs) == [
        ("exact", None, "fwd"), ("exact", None, "fwd+bwd"), ("sparse", 8, "fwd"),
        ("sparse", 8, "fwd+bwd")]
    for r in recs:
        for key in ("op", "shape", "seq_len", "k", "pass", "time_us", "floor_us", "peak_mb",
                    "peers"):
            assert key in r, key
        assert r["time_us"] > 0 and r["floor_us"] > 0
        assert set(r["peers"]) == {"flex_attention", "sdpa_flash_causal_2T"}
        assert "time_us" in r["peers"]["sdpa_flash_causal_2T"]
        if r["pass"] == "fwd":   # FlexAttention has no CPU backward: recorded as an error
            assert "time_us" in r["peers"]["flex_attention"], r["peers"]
        # the sparse backward also timed with atomic gradient accumulation
        assert ("atomics" in r) == (r["op"] == "sparse" and r["pass"] == "fwd+bwd")
        assert r.get("atomics", {"time_us": 1})["time_us"] > 0
    exact_fwd = next(r for r in recs if r["op"] == "exact" and r["pass"] == "fwd")
    assert exact_fwd["max_abs_diff_vs_flex"] < 1e-4       # the same pattern as the block mask
    assert "wrote" in capsys.readouterr().out


def test_pairs_and_selection():
    import torch
    # 3 blocks of 4: noisy block j sees min(k, 4j) + 4 keys, clean block j sees 4(j + 1)
    assert B.pairs(12, 4) == 4 * (4 + 8 + 12) + 4 * (4 + 8 + 12)
    assert B.pairs(12, 4, k=5) == 4 * (4 + 8 + 9) + 4 * (4 + 8 + 12)
    idx, cnt = B.random_selection(4, 2, 4, 6, "cpu", torch.Generator().manual_seed(0), chunk=3)
    assert cnt[0, :, 0].tolist() == [0, 4, 6, 6]
    from mage_ext.ops import check_selection
    for j in range(4):
        check_selection(idx[:, j], cnt[:, j], capacity=max(1, 4 * j))
