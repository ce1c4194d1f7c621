"""The evaluation harness end to end on a tiny random model with the project's vocabulary (CPU)."""
import json
from pathlib import Path

import pytest
import torch

from tiny_models import one_thread  # noqa: F401  (autouse: one CPU thread)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mage_ext.eval import vocab as V

    d = tmp_path_factory.mktemp("tiny_bd")
    n_vocab = len(V.vocabulary())
    cfg = Qwen2Config(vocab_size=n_vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      mask_token_id=V.ids([V.MASK])[0], eos_token_id=V.ids([V.EOS])[0])
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    V.save_tokenizer(str(d))
    return str(d)


def test_grid_records(tiny_dir):
    from mage_ext.eval.harness import (METHOD_NAMES, EvalConfig, evaluate, records_table,
                                       summary_table)

    cfg = EvalConfig(tasks=("passkey",), lengths=(256,), depths=(0.25, 0.75), samples_per_depth=1,
                     ks=(32,), batch_size=2, progress=False)
    rep = evaluate(tiny_dir, cfg)
    recs = {r["method"]: r for r in rep["records"]}
    assert set(recs) == set(METHOD_NAMES)
    for r in rep["records"]:
        assert set(r) >= {"method", "k", "adaptive", "task", "context_len", "accuracy", "recall",
                          "mass_recall", "oracle_mass", "kv_fraction"}
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 < r["kv_fraction"] <= 1.0
    assert recs["exact"]["kv_fraction"] == 1.0 and recs["exact"]["recall"] is None
    for m in ("mage", "mage_l1", "quest"):
        assert recs[m]["kv_fraction"] < 1.0
        assert 0.0 <= recs[m]["recall"] <= 1.0 and 0.0 <= recs[m]["mass_recall"] <= 1.0
        # a selection of k entries reads at most the mass of the step's own top-k
        assert recs[m]["mass_recall"] <= recs[m]["oracle_mass"] + 1e-9 <= 1.0 + 1e-9
    assert recs["mage_adaptive"]["adaptive"] and recs["control"]["k"] == 32
    assert len(rep["heatmap"]) == len(METHOD_NAMES) * 2
    assert rep["needle_mass"] and all(v is None or 0 <= v <= 1
                                      for v in rep["needle_mass"][0]["per_layer"].values())
    assert "| mage |" in records_table(rep["records"])
    assert "| control | 32 |" in summary_table(rep["records"])


def test_command_line(tiny_dir, tmp_path):
    from mage_ext.eval.__main__ import main

    out = tmp_path / "eval.json"
    main(["--model", tiny_dir, "--tasks", "passkey", "--lengths", "128", "--depths", "0.5",
          "--samples", "1", "--methods", "exact,mage,control", "--ks", "32", "--device", "cpu",
          "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"model", "commit", "date", "records"} <= set(data)
    assert [r["method"] for r in data["records"]] == ["exact", "mage", "control"]
    assert data["stage"] is None and data["records"][0]["stage"] is None


def test_command_line_stage_seeds_and_dense_settings(tiny_dir, tmp_path):
    from mage_ext.cli_common import CliError
    from mage_ext.eval.__main__ import _main

    out = tmp_path / "before.json"
    base = ["--model", tiny_dir, "--tasks", "niah_multivalue_distract", "--lengths", "128",
            "--depths", "0.5", "--samples", "1", "--ks", "32", "--device", "cpu", "--no-recall"]
    _main(base + ["--methods", "exact,mage,random,recent", "--dense-layers", "0,2",
                  "--seeds", "0,1", "--stage", "before", "--note", "smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["stage"] == "before" and data["steps"] == 0 and data["lambda"] is None
    assert data["torch"] == torch.__version__ and data["note"] == "smoke"
    assert data["config"]["seeds"] == [0, 1] and data["config"]["samples_per_cell"] == 1
    recs = data["records"]
    assert len(recs) == 2 * (1 + 3 * 2)                 # seeds x (exact + 3 methods x 2 dense)
    keys = {"stage", "method", "k", "dense_layers", "task", "context_len", "seed", "accuracy",
            "recall", "mass_recall", "kv_fraction"}
    assert all(keys <= set(r) and r["stage"] == "before" for r in recs)
    assert sorted({r["seed"] for r in recs}) == [0, 1]
    after, other = tmp_path / "after.json", tmp_path / "other.json"
    _main(base + ["--methods", "exact,mage,random,recent", "--dense-layers", "0,2",
                  "--seeds", "0,1", "--stage", "after", "--steps", "200", "--lambda", "0.5",
                  "--out", str(after)])
    data = json.loads(after.read_text())
    assert (data["stage"], data["steps"], data["lambda"]) == ("after", 200, 0.5)
    # one evidence file from the two runs
    from mage_ext.eval.stages import _main as stages_main

    both = tmp_path / "both.json"
    stages_main([str(out), str(after), "--out", str(both)])
    data = json.loads(both.read_text())
    assert (data["steps"], data["lambda"], data["torch"]) == (200, 0.5, torch.__version__)
    assert [r["stage"] for r in data["records"]] == ["before"] * len(recs) + ["after"] * len(recs)
    assert set(data["runs"]) == {"before", "after"} and data["runs"]["before"]["note"] == "smoke"
    # a grid split over two runs by seed joins to the same evidence
    whole = json.loads(out.read_text())
    parts = []
    for seed in (0, 1):
        part = tmp_path / f"before_seed{seed}.json"
        part.write_text(json.dumps(dict(
            whole, commit=f"c{seed}", config=dict(whole["config"], seeds=[seed]),
            records=[r for r in whole["records"] if r["seed"] == seed])))
        parts.append(str(part))
    joined = tmp_path / "joined.json"
    stages_main([",".join(parts), str(after), "--out", str(joined)])
    joined_data = json.loads(joined.read_text())
    key = lambda r: (r["seed"], r["method"], r["dense_layers"], r["k"])  # noqa: E731
    assert sorted(map(key, joined_data["records"])) == sorted(map(key, data["records"]))
    assert joined_data["config"]["seeds"] == [0, 1]
    assert joined_data["runs"]["before"]["commits"] == ["c0", "c1"]
    with pytest.raises(CliError, match="repeats seeds \\[0\\]"):
        stages_main([f"{parts[0]},{parts[0]}", str(after), "--out", str(joined)])
    old_style = json.loads(Path(parts[1]).read_text())   # one "seed", as older files have
    old_style["config"]["seed"] = old_style["config"].pop("seeds")[0]
    Path(parts[1]).write_text(json.dumps(old_style))
    stages_main([",".join(parts), str(after), "--out", str(joined)])
    assert json.loads(joined.read_text())["config"]["seeds"] == [0, 1]
    with pytest.raises(CliError, match="differs from the first in: stage"):
        stages_main([f"{parts[0]},{after}", str(after), "--out", str(joined)])
    from mage_ext.eval.stages import table

    rows = table(data).splitlines()  # a header, a rule, one row per (method, dense layers, k)
    assert len(rows) == 2 + len({(r["method"], r["dense_layers"], r["k"]) for r in recs})
    assert rows[2].startswith("| exact | all | — |") and " -> " in rows[2]
    _main(base + ["--methods", "mage", "--stage", "after", "--steps", "1", "--lambda", "1",
                  "--out", str(other)])
    with pytest.raises(CliError, match="different grids: methods"):
        stages_main([str(out), str(other), "--out", str(both)])
    with pytest.raises(CliError, match="stage 'before'"):
        stages_main([str(after), str(other), "--out", str(both)])
    cut = json.loads(after.read_text())   # a run still going (or cut short) is refused
    cut.update(complete=False, records=cut["records"][:3])
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    with pytest.raises(CliError, match="an unfinished run \\(3 records"):
        stages_main([str(out), str(tmp_path / "cut.json"), "--out", str(both)])
    assert json.loads(after.read_text())["complete"] is True
    with pytest.raises(CliError, match="--steps and --lambda"):
        _main(base + ["--stage", "after", "--steps", "3", "--out", str(after)])
    with pytest.raises(CliError, match="--stage"):
        _main(base + ["--lambda", "1", "--out", str(after)])


def test_dense_layer_settings_seeds_and_matched_controls(tiny_dir):
    from mage_ext.eval.harness import EvalConfig, evaluate, summary_table

    cfg = EvalConfig(tasks=("niah_multivalue",), lengths=(192,), depths=(0.5,), samples_per_depth=2,
                     methods=("exact", "mage", "random", "recent", "mage_l1"), ks=(16, 32),
                     dense_layers=(0, 2), batch_size=2, recall=True, needle_mass=False,
                     seed=3, progress=False)
    recs = evaluate(tiny_dir, cfg)["records"]
    got = sorted((r["method"], r["k"] or 0, -1 if r["dense_layers"] is None else r["dense_layers"])
                 for r in recs)
    want = sorted([("exact", 0, -1), ("mage_l1", 16, 1), ("mage_l1", 32, 1)] +
                  [(m, k, d) for m in ("mage", "random", "recent") for k in (16, 32) for d in (0, 2)])
    assert got == want and all(r["seed"] == 3 and r["n"] == 2 for r in recs)
    for r in recs:
        if r["method"] in ("random", "recent"):   # a selection at later steps: recall measured
            assert 0.0 <= r["recall"] <= 1.0 and r["kv_fraction"] < 1.0
    table = summary_table(recs)
    assert "| random | 16 | 0 |" in table and "| random | 16 | 2 |" in table
    assert "| exact | - | - |" in table
    head, rule, *rows = table.splitlines()
    assert "| mass recall | mass ceiling | KV read |" in head
    assert all(row.count("|") == head.count("|") == rule.count("|") for row in rows)
    assert summary_table([dict(r, oracle_mass=None) for r in recs])   # files from before the key


def test_bad_config():
    from mage_ext.eval.harness import EvalConfig

    with pytest.raises(ValueError, match="unknown task"):
        EvalConfig(tasks=("nope",))
    with pytest.raises(ValueError, match="unknown method"):
        EvalConfig(methods=("mage", "magic"))
    with pytest.raises(ValueError, match="depths"):
        EvalConfig(depths=(1.5,))
    with pytest.raises(ValueError, match="dense_layers"):
        EvalConfig(dense_layers=(2, -1))


def test_heatmaps_one_file_per_dense_setting_seeds_averaged(tmp_path, monkeypatch):
    """plots.heatmaps with a stand-in matplotlib (not a dependency): names and averaged cells."""
    import sys
    import types
    from unittest import mock

    from mage_ext.eval.plots import heatmaps

    ax, fig = mock.MagicMock(), mock.MagicMock()
    plt = types.SimpleNamespace(subplots=lambda **kw: (fig, ax), close=lambda f: None)
    mpl = types.SimpleNamespace(use=lambda name: None, pyplot=plt)
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    heat = [dict(method=m, k=k, dense_layers=d, task="t", context_len=1024, depth=0.5, seed=s,
                 accuracy=acc)
            for m, k, d, s, acc in [("exact", None, None, 0, 1.0), ("mage", 64, 0, 0, 0.0),
                                    ("mage", 64, 0, 1, 1.0), ("mage", 64, 2, 0, 1.0)]]
    paths = heatmaps(heat, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "needle_t_exact.png", "needle_t_mage_k64_dl0.png", "needle_t_mage_k64_dl2.png"]
    grids = [c.args[0] for c in ax.imshow.call_args_list]
    assert grids == [[[1.0]], [[0.5]], [[1.0]]]          # the two seeds of dense 0 averaged
