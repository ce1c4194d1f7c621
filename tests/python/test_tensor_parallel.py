"""Tensor-parallel generation (mage_ext/hf/tensor_parallel.py) over torch.distributed: 2 and 4
gloo processes on the CPU give the tokens of one process, Qwen2 and Qwen3, exact and MAGE (fixed
and adaptive budgets), both decoding styles, the stock (DTensor) and the fused forward, greedy
and seeded sampling; every rank computes bitwise the same logits. The CLI under torchrun prints
once, the same as one process. A CUDA / NCCL variant runs where two GPUs are visible.

One group of processes per world size runs all its cases (process start-up dominates on a small
machine); the tests compare what they wrote against one-process references computed here.
"""
import datetime
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import cuda_ready
from gloo_ranks import free_port, launch
from mage_ext import PolicyConfig, generate
from mage_ext.hf.tensor_parallel import local
from tiny_models import MASK_ID, VOCAB, one_thread, tiny_model  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_BD = os.path.join(ROOT, "mage_ext", "assets", "tiny_bd")
MODEL = dict(layers=3, heads=8, kv_heads=4)  # 4 KV heads: 2 or 1 per rank

# name -> (family, policy options, style, fused, sampling)
CASES = {
    "qwen2-exact-fast_dllm-stock": ("qwen2", dict(method="exact"), "fast_dllm", False, False),
    "qwen2-mage-fast_dllm-fused": ("qwen2", dict(method="mage", k=8, dense_layers=1),
                                   "fast_dllm", True, False),
    "qwen3-mage-sdar-stock": ("qwen3", dict(method="mage", k=8, dense_layers=1), "sdar", False,
                              False),
    "qwen3-exact-sdar-fused": ("qwen3", dict(method="exact"), "sdar", True, False),
    "qwen2-adaptive-sdar-fused": ("qwen2", dict(method="mage", k=8, dense_layers=1,
                                                adaptive=True, k_min=4), "sdar", True, False),
    "qwen3-mage-fast_dllm-sampled": ("qwen3", dict(method="mage", k=8, dense_layers=1),
                                     "fast_dllm", True, True),
    # Quest pages of 3 straddle the blocks: the KV read differs between heads, so the sum over
    # the ranks matters
    "qwen2-quest-sdar-fused": ("qwen2", dict(method="quest", k=8, dense_layers=1,
                                             quest_page_size=3, quest_min_pages=1), "sdar",
                               True, False),
}
WORLD_CASES = {2: list(CASES), 4: ["qwen2-mage-fast_dllm-fused", "qwen3-mage-sdar-stock"]}


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in (45, 21)]


def _head_dim(device) -> int:
    return 64 if str(device).startswith("cuda") else 8  # the CUDA kernels take d = 64 / 128


def _model(family, seed, device, dtype=torch.float32, **kw):
    return tiny_model(family, seed=seed, head_dim=_head_dim(device),
                      **{**MODEL, **kw}).to(device, dtype)


def _run_case(name, device="cpu", dtype=torch.float32, **extra):
    family, options, style, fused, sampled = CASES[name]
    model = _model(family, 3, device, dtype)
    torch.manual_seed(7)
    res = generate(model, input_ids=_prompts(), policy=PolicyConfig(**options), style=style,
                   block_size=8, max_new_tokens=16, mask_id=MASK_ID, stop_ids=[], threshold=0.5,
                   steps=4, fused=fused, temperature=0.8 if sampled else 0.0,
                   top_p=0.9 if sampled else 1.0, **extra)
    k_rows = local(model.model.layers[0].self_attn.k_proj.weight).shape[0]
    return {"tokens": res.token_ids, "kv_fraction": res.kv_fraction,
            "kv_heads_here": k_rows // _head_dim(device)}


# -- the ranks --------------------------------------------------------------------------------

def _worker(rank, world, port, backend, names, out_dir, extra):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    out = {name: _run_case(name, device, **extra) for name in names}
    out["logits"] = _logits_check(device)
    out["training"] = _training_check(device)
    out["error"] = _error_text(device)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _logits_check(device) -> dict:
    """One prefill forward of each forward kind, one process's weights sharded after a run of
    the fused forward (its fused q/k/v and gate/up views are sharded, then fused again):
    bitwise the same logits on every rank, and close to the logits of the unsharded model."""
    import torch.distributed as dist

    from mage_ext.hf import fast_forward, forward as hf_forward
    from mage_ext.hf.cache import MageCache
    from mage_ext.hf.enable import enable_mage
    from mage_ext.hf.tensor_parallel import shard_model

    model = _model("qwen3", 5, device)
    enable_mage(model, PolicyConfig(method="exact"))
    ids = torch.tensor(_prompts()[0][:16], device=device).unsqueeze(0)
    kinds = (fast_forward.FastForward, hf_forward.HFForward)

    def logits(cls):
        cache = MageCache.for_model(model, 1, 32, PolicyConfig(method="exact"))
        cache.begin_prefill()
        with torch.no_grad():
            return cls(model, cache)(ids)
    one = [logits(cls) for cls in kinds]
    shard_model(model)
    same, diff = True, 0.0
    for cls, ref in zip(kinds, one):
        got = logits(cls)
        gathered = [torch.empty_like(got) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, got)
        same &= all(torch.equal(g, gathered[0]) for g in gathered)
        diff = max(diff, float((got - ref).abs().max() / ref.abs().max()))
    return {"ranks_equal": same, "rel_diff": diff}


def _training_check(device) -> float:
    """A training step of the stock forward (SDPA) on the sharded model: the largest relative
    difference of the loss and every parameter's gradient from one process's."""
    from mage_ext.hf.tensor_parallel import shard_model

    ids = torch.tensor(_prompts()[0][:16], device=device).unsqueeze(0)

    def step(sharded):
        model = _model("qwen3", 6, device).train()
        if sharded:
            shard_model(model)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for n, p in model.named_parameters()}
        return loss.detach(), grads
    (loss1, g1), (loss2, g2) = step(False), step(True)
    diffs = [float((g1[n] - g2[n]).abs().max() / g1[n].abs().max()) for n in g1]
    return max([abs(float(loss1 - loss2)) / float(loss1)] + diffs)


def _error_text(device) -> str:
    """The error of a model whose KV heads do not split over the ranks."""
    import torch.distributed as dist

    world = dist.get_world_size()
    model = _model("qwen2", 5, device, layers=1, heads=2 * (world - 1), kv_heads=world - 1)
    try:
        generate(model, input_ids=[[1, 2, 3]], block_size=8, max_new_tokens=4, mask_id=MASK_ID)
    except ValueError as e:
        return str(e)
    return ""


def _launch(world, backend, names, tmp_path, extra=None, timeout=300):
    """Runs ``_worker`` on ``world`` processes; returns each rank's results and the seconds."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    seconds = launch(_worker, world, (backend, names, str(tmp_path), extra or {}), timeout,
                     spawn=backend == "nccl")
    ranks = []
    for r in range(world):
        with open(tmp_path / f"rank{r}.json") as f:
            ranks.append(json.load(f))
    return ranks, seconds


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """World size -> (per-rank results, seconds), each world run once for the module."""
    done = {}

    def get(world):
        if world not in done:
            done[world] = _launch(world, "gloo", WORLD_CASES[world],
                                  tmp_path_factory.mktemp(f"tp{world}"))
            print(f"\n{world} gloo ranks: {done[world][1]:.1f} s", file=sys.stderr)
        return done[world]
    return get


@pytest.fixture(scope="module")
def references():
    return {name: _run_case(name) for name in CASES}


# -- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("world,name", [(w, n) for w, names in WORLD_CASES.items()
                                        for n in names])
def test_ranks_generate_the_tokens_of_one_process(runs, references, world, name):
    ranks, _ = runs(world)
    ref = references[name]
    if CASES[name][1]["method"] != "exact":
        assert ref["kv_fraction"] < 0.9  # the selection is a real subset
    for r, out in enumerate(ranks):
        assert out[name]["kv_heads_here"] == MODEL["kv_heads"] // world
        assert out[name]["tokens"] == ref["tokens"], f"rank {r} of {world}"
        assert out[name]["kv_fraction"] == pytest.approx(ref["kv_fraction"], rel=1e-9)


@pytest.mark.parametrize("world", sorted(WORLD_CASES))
def test_every_rank_computes_the_same_logits(runs, world):
    ranks, _ = runs(world)
    for out in ranks:
        assert out["logits"]["ranks_equal"]
        assert out["logits"]["rel_diff"] < 1e-5  # float32: only the summation order changed


@pytest.mark.parametrize("world", sorted(WORLD_CASES))
def test_a_sharded_training_step_gives_the_gradients_of_one_process(runs, world):
    """What a tensor-parallel MAGE-FT step would reuse: the same sharded modules."""
    ranks, _ = runs(world)
    assert all(out["training"] < 1e-5 for out in ranks)


@pytest.mark.parametrize("world", sorted(WORLD_CASES))
def test_kv_heads_that_do_not_split_are_a_clear_error(runs, world):
    ranks, _ = runs(world)
    for out in ranks:
        assert f"number of KV heads (num_key_value_heads) ({world - 1}) is not divisible by " \
               f"{world}" in out["error"]


def test_errors_without_a_process_group():
    from mage_ext.hf import tensor_parallel

    model = tiny_model("qwen2", seed=1, layers=1, heads=4, kv_heads=2)
    kw = dict(input_ids=[[1, 2, 3]], block_size=8, max_new_tokens=4, mask_id=MASK_ID)
    with pytest.raises(ValueError, match="needs torch.distributed to be initialised"):
        generate(model, tp=True, **kw)
    assert len(generate(model, tp=False, **kw).token_ids[0]) == 4
    with pytest.raises(ValueError, match=r"MLP width \(intermediate_size\) \(48\) is not "
                                         r"divisible by 5"):
        tensor_parallel.check_shardable(tiny_model("qwen2", layers=1, heads=5, kv_heads=5), 5)
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        model.model.layers[0].mlp.up_proj = torch.nn.Sequential(model.model.layers[0].mlp.up_proj)
        tensor_parallel.check_shardable(model, 2)


def test_cli_under_torchrun_prints_once_what_one_process_prints(tmp_path, capsys):
    from mage_ext import cli

    ids = ",".join(str(t) for t in range(3, 3 + 70))
    args = ["--model", TINY_BD, "--ids", ids, "--device", "cpu", "--policy", "mage", "--k", "16",
            "--max-new-tokens", "12"]
    cli.generate_main(args)
    one = capsys.readouterr().out
    t0 = time.perf_counter()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "mage_ext.generate", *args],
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    print(f"\ntorchrun, 2 ranks: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one and one.strip()
    assert two.stderr.count("tokens; denoising steps") == 1  # rank 0's summary only


def test_cli_ranks_other_than_0_stay_quiet_and_name_themselves(monkeypatch, capsys):
    import warnings

    from mage_ext import cli_common

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(cli_common.CliError, match="each rank takes its own GPU"):
        cli_common.init_distributed(torch.device("cuda", 0))

    def main(argv):
        warnings.warn("a warning")
        raise ValueError("bad value")
    with pytest.raises(SystemExit):
        cli_common.run_cli(main, "prog", [])
    assert capsys.readouterr().err == "prog: error: [rank 1/2] bad value\n"


# -- GPU ----------------------------------------------------------------------------------------

requires_two_gpus = pytest.mark.skipif(not cuda_ready() or torch.cuda.device_count() < 2,
                                       reason="needs 2 CUDA GPUs and a build with the CUDA "
                                              "kernels")


@requires_two_gpus
def test_nccl_ranks_generate_the_tokens_of_one_gpu(tmp_path):
    """float32 (TP changes only the summation order of two GEMMs per layer); the fused forward
    replays its NCCL all-reduces inside CUDA graphs, the stock one runs eagerly."""
    names = ["qwen2-mage-fast_dllm-fused", "qwen3-mage-sdar-stock", "qwen3-exact-sdar-fused",
             "qwen3-mage-fast_dllm-sampled"]
    ranks, seconds = _launch(2, "nccl", names, tmp_path)
    for name in names:
        ref = _run_case(name, "cuda:0")
        for r, out in enumerate(ranks):
            assert out[name]["tokens"] == ref["tokens"], f"{name}, rank {r}"
            assert out[name]["kv_fraction"] == pytest.approx(ref["kv_fraction"], rel=1e-6)
    assert all(out["logits"]["ranks_equal"] and out["logits"]["rel_diff"] < 1e-5
               and out["training"] < 1e-4 for out in ranks)
    assert "is not divisible by 2" in ranks[0]["error"]


@requires_two_gpus
def test_nccl_graphed_bf16_equals_eager(tmp_path):
    """bf16: the CUDA-graph replays (NCCL all-reduces captured) give the eager tokens."""
    names = ["qwen2-mage-fast_dllm-fused", "qwen3-exact-sdar-fused"]
    graphed, _ = _launch(2, "nccl", names, tmp_path / "graphed",
                         extra=dict(dtype=torch.bfloat16))
    eager, _ = _launch(2, "nccl", names, tmp_path / "eager",
                       extra=dict(dtype=torch.bfloat16, cuda_graphs=False))
    for name in names:
        assert graphed[0][name]["tokens"] == eager[0][name]["tokens"]
        assert graphed[1][name]["tokens"] == graphed[0][name]["tokens"]
