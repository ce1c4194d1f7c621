"""Sharded MAGE-FT (FSDP2, mage_ext/train/sharded.py) on gloo CPU processes: 2 ranks give the
per-step losses of one process over the same global batch (full and LoRA, with gradient
accumulation), a run checkpointed on 2 ranks resumes on 1 with the losses of an uninterrupted
one-process run, the merged final model equals one process's, and the errors are clear.

Each world size runs all its jobs in one group of processes (start-up dominates on a small
machine); the tiny checkpoint of test_mage_ft keeps every step a fraction of a second."""
import datetime
import json
import os
import re

import pytest
import torch

import mage_ext
from gloo_ranks import launch
from mage_ext.train.config import ConfigError
from mage_ext.train.mage_ft import finetune
from test_mage_ft import LOSS_KEYS, config, make_checkpoint, read_log
from tiny_models import one_thread  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_BD = os.path.join(ROOT, "mage_ext", "assets", "tiny_bd")

# name -> config changes; every job's global batch is 2 sequences (1 per rank on 2 ranks)
JOBS = {
    "full": dict(mode="full", batch_size=2, grad_accum=2, steps=3),
    "lora": dict(batch_size=2, steps=3),
    "resume": dict(batch_size=2, steps=4, save_every=100),
    # bf16 autocast and activation checkpointing (the GPU settings): the same run, bf16 rounding
    "bf16": dict(batch_size=2, steps=2, precision="bf16", gradient_checkpointing=True),
    # the shipped model ties lm_head to the embeddings: both in the root's FSDP unit
    "tied": dict(model=TINY_BD, batch_size=2, steps=2, seq_len=128, k=32,
                 data={"synthetic": {"filler": 1}}),
}
TOLERANCE = {"bf16": 2e-2}
ERRORS = {
    "odd_batch": (dict(batch_size=3), "config key 'batch_size': 3 sequences per micro-batch "
                                      r"\(the global batch\) do not split over 2 ranks"),
    "plain_checkpoint": (dict(batch_size=2, steps=1), "holds a one-process checkpoint.pt; resume it without "
                                        "torch.distributed"),
}


def _worker(rank, world, port, jobs, out_dir):
    """Runs finetune for each (name, config, stop_after) job; rank r writes rank{r}.json with
    each job's status or error text."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    for name, cfg, stop_after in jobs:
        try:
            r = finetune(cfg, _stop_after=stop_after)
            results[name] = {"status": r["status"], "step": r["step"]}
        except ConfigError as e:   # raised on every rank alike, before any collective
            results[name] = {"error": str(e)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def _run(world, jobs, tmp):
    tmp.mkdir(parents=True, exist_ok=True)
    seconds = launch(_worker, world, (jobs, str(tmp)), timeout=240)
    print(f"\n{world} gloo ranks: {seconds:.1f} s")
    ranks = []
    for r in range(world):
        with open(tmp / f"rank{r}.json") as f:
            ranks.append(json.load(f))
    return ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process references, then 2 ranks (every job; the resume job stops after step 2),
    then 1 rank finishing the resume job."""
    root = tmp_path_factory.mktemp("fsdp")
    ck = make_checkpoint(root / "ck")
    cfg = {name: (lambda out, kw=kw: config(kw.get("model", ck), out,
                                            **{k: v for k, v in kw.items() if k != "model"}))
           for name, kw in JOBS.items()}
    one = {name: finetune(make(root / "one" / name)) for name, make in cfg.items()}
    plain = finetune(config(ck, root / "plain", **ERRORS["plain_checkpoint"][0]))  # checkpoint.pt
    jobs = [(name, make(root / "two" / name), 2 if name == "resume" else None)
            for name, make in cfg.items()]
    jobs += [(name, config(ck, root / ("plain" if name == "plain_checkpoint" else name), **kw),
              None) for name, (kw, _) in ERRORS.items()]
    two = _run(2, jobs, root / "ranks2")
    resumed = _run(1, [("resume", cfg["resume"](root / "two" / "resume"), None)], root / "ranks1")
    return {"root": root, "ck": ck, "one": one, "plain": plain, "two": two, "resumed": resumed}


def _same_losses(got, want, rel=1e-4):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in LOSS_KEYS:
            if w[k] is None:
                assert g[k] is None
            else:
                assert g[k] == pytest.approx(w[k], rel=rel), (k, g["step"])


@pytest.mark.parametrize("name", ["full", "lora", "bf16", "tied"])
def test_two_ranks_give_the_losses_of_one_process(runs, name):
    for r in runs["two"]:
        assert r[name] == {"status": "done", "step": JOBS[name]["steps"]}
    root = runs["root"]
    _same_losses(read_log(root / "two" / name), read_log(root / "one" / name),
                 TOLERANCE.get(name, 1e-4))
    assert os.path.isdir(root / "two" / name / "checkpoint")       # DCP, not checkpoint.pt
    assert not os.path.exists(root / "two" / name / "checkpoint.pt")


@pytest.mark.parametrize("name", ["full", "lora", "tied"])
def test_the_gathered_final_model_equals_one_process(runs, name):
    root = runs["root"]
    ids = torch.randint(10, 1900, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        two, one = (mage_ext.load_model(str(root / d / name / "final")).model(ids).logits
                    for d in ("two", "one"))
    assert (two - one).abs().max() < 1e-4 * one.abs().max()
    if name == "lora":
        assert os.path.isfile(root / "two" / name / "adapter" / "adapter_config.json")


def test_two_ranks_checkpoint_and_one_rank_resumes_step_for_step(runs):
    root = runs["root"]
    assert all(r["resume"] == {"status": "interrupted", "step": 2} for r in runs["two"])
    assert runs["resumed"][0]["resume"] == {"status": "done", "step": 4}
    _same_losses(read_log(root / "two" / "resume"), read_log(root / "one" / "resume"))
    assert not [n for n in os.listdir(root / "two" / "resume") if ".tmp" in n or ".old-" in n]


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_clear_errors_on_every_rank(runs, name):
    for r in runs["two"]:
        assert "error" in r[name], r[name]
        assert re.search(ERRORS[name][1], r[name]["error"])
    assert not os.path.exists(runs["root"] / "odd_batch")


def test_one_process_refuses_a_sharded_checkpoint(runs):
    out = runs["root"] / "two" / "resume"
    with pytest.raises(ConfigError, match="holds a sharded checkpoint/ .* resume it under "
                                          "torchrun"):
        finetune(config(runs["ck"], out, **JOBS["resume"]))
