"""The C++ binary on CUDA against mage_ext.generate on CUDA (the lead runs these on the H200).

Needs a CUDA build of the binary (the CPU build of tests/run_all.sh cannot take --device cuda):

    cmake -S . -B build/cuda -G Ninja -DMAGE_WITH_CUDA=ON -DMAGE_BUILD_TESTS=OFF
    cmake --build build/cuda --target mage_generate
    python3 -m pytest tests/python/test_cpp_runtime_cuda.py -q

(or point MAGE_GENERATE_CUDA at the binary). Checked here: token-for-token parity with the Python
path on the shipped model and on random Qwen2 / Qwen3 checkpoints (exact and MAGE, both styles,
a batch of unequal prompts, float32 and bfloat16), CUDA graphs == eager forwards, sampling with a
seed == Python with a CUDA generator seeded alike, no host synchronisation inside a block other
than the per-step flag (MAGE_SYNC_CHECK=1 turns any other into an error), and host memory while
loading a sharded checkpoint straight to the GPU (<= the largest shard + 10%).
"""
import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import mage_ext
from conftest import requires_cuda
from mage_ext.eval import tasks
from mage_ext.hf.checkpoint import to_dtype_keeping_rope_fp32

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("MAGE_GENERATE_CUDA", ROOT / "build" / "cuda" / "mage_generate"))
MODEL = Path(mage_ext.__file__).parent / "assets" / "tiny_bd"

pytestmark = [
    requires_cuda,
    pytest.mark.skipif(not BINARY.is_file(),
                       reason=f"{BINARY} is not built: cmake -S . -B build/cuda -G Ninja "
                              "-DMAGE_WITH_CUDA=ON -DMAGE_BUILD_TESTS=OFF && cmake --build "
                              "build/cuda --target mage_generate (or set MAGE_GENERATE_CUDA)"),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run_binary(*args, env=None, check=True):
    r = subprocess.run([str(BINARY), *map(str, args)], capture_output=True, text=True,
                       timeout=900, env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, f"mage_generate failed ({r.returncode}): {r.stderr}"
    return r


def lines(r):
    return [[int(t) for t in line.split()] for line in r.stdout.splitlines()]


def ids_args(prompts):
    return [a for p in prompts for a in ("--ids", ",".join(map(str, p)))]


def test_cuda_is_the_default_device_with_bfloat16(tmp_path):
    out = tmp_path / "t.json"
    run_binary("--model", MODEL, "--ids", "10,11,12", "--max-new-tokens", 8, "--timing-json", out)
    t = json.loads(out.read_text())
    assert t["device"].startswith("cuda") and t["dtype"] == "bfloat16" and t["graphs"]


# -- the shipped model (Fast-dLLM v2 style), passkey prompt ---------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method,k,dense_layers", [("exact", 512, 2), ("mage", 128, 1),
                                                   ("mage", 64, 0)])
def test_shipped_model_matches_python(dtype, method, k, dense_layers):
    lm = mage_ext.load_model(str(MODEL), dtype=DTYPES[dtype], device="cuda", tokenizer=False)
    s = tasks.make_sample("passkey", 2048, seed=0, depth=0.5, block_size=lm.block_size)
    prompt = s.prompt[:1000]  # a remainder heads the first block
    policy = mage_ext.PolicyConfig(method=method, k=k, dense_layers=dense_layers)
    want = mage_ext.generate(lm, input_ids=[prompt], policy=policy, max_new_tokens=96).token_ids[0]
    got = lines(run_binary("--model", MODEL, "--ids", ",".join(map(str, prompt)), "--device", "cuda",
                           "--dtype", dtype, "--policy", method, "--k", k, "--dense-layers",
                           dense_layers, "--max-new-tokens", 96))[0]
    assert got == want


def test_text_streams_the_python_text_on_cuda():
    lm = mage_ext.load_model(str(MODEL), dtype=torch.bfloat16, device="cuda")
    text = "the pass key is 71432 . remember it . " * 40 + "what is the pass key ?"
    want = mage_ext.generate(lm, None, [text], max_new_tokens=64).texts[0]
    r = run_binary("--model", MODEL, "--prompt", text, "--max-new-tokens", 64)
    assert r.stdout == want + "\n"


# -- random Qwen2 / Qwen3 checkpoints, both styles, a batch of unequal prompts ---------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tiny_models import tiny_model

    out = {}
    for family in ("qwen2", "qwen3"):
        model = tiny_model(family, layers=3, head_dim=64, seed=7, initializer_range=1.0)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        out[family] = (model, path)
    return out


def python_tokens(model, dtype, prompts, **kw):
    m = copy.deepcopy(model).to("cuda")  # the fixture's float32 model stays as saved
    to_dtype_keeping_rope_fp32(m, DTYPES[dtype])
    return mage_ext.generate(m, input_ids=prompts, **kw).token_ids


def batch_prompts(lengths=(19, 64, 41, 150)):
    from tiny_models import MASK_ID

    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, MASK_ID, (n,), generator=g).tolist() for n in lengths]


CASES = [(f, s, m, d) for f in ("qwen2", "qwen3") for s in ("fast_dllm", "sdar")
         for m in ("exact", "mage") for d in ("float32", "bfloat16")]


@pytest.mark.parametrize("family,style,method,dtype", CASES)
def test_random_checkpoints_batch_matches_python(checkpoints, family, style, method, dtype):
    model, path = checkpoints[family]
    prompts = batch_prompts()
    kw = dict(policy=mage_ext.PolicyConfig(method=method, k=16, dense_layers=1), style=style,
              block_size=16, max_new_tokens=64, threshold=0.5, steps=4,
              remasking="low_confidence_dynamic" if style == "sdar" else "low_confidence_static")
    want = python_tokens(model, dtype, prompts, **kw)
    common = ["--model", path, "--device", "cuda", "--dtype", dtype, "--policy", method, "--k", 16,
              "--dense-layers", 1, "--block-size", 16, "--max-new-tokens", 64, "--style", style,
              "--threshold", 0.5, "--steps", 4, "--remasking", kw["remasking"]]
    got = lines(run_binary(*common, *ids_args(prompts)))
    assert got == want, f"C++ {got} != Python {want}"
    assert lines(run_binary(*common, *ids_args(prompts), "--no-cuda-graphs")) == got  # graphs change nothing
    # A prompt alone: the binary equals Python alone. (Not "alone == its batch row": on a GPU
    # the batched and single GEMMs round apart, and Python's own batch and single runs part too,
    # e.g. at token 17 of prompt 0 in bf16 with MAGE, H200.)
    alone = [lines(run_binary(*common, *ids_args([p])))[0] for p in prompts[:2]]
    assert alone == [python_tokens(model, dtype, [p], **kw)[0] for p in prompts[:2]]


@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
def test_sampling_matches_python_with_a_cuda_generator(checkpoints, style):
    model, path = checkpoints["qwen3"]
    prompts = batch_prompts((37, 90))
    kw = dict(policy=mage_ext.PolicyConfig(method="mage", k=16, dense_layers=1), style=style,
              block_size=16, max_new_tokens=48, temperature=0.9, top_p=0.8)
    want = python_tokens(model, "float32", prompts,
                         generator=torch.Generator(device="cuda").manual_seed(5), **kw)
    got = lines(run_binary("--model", path, *ids_args(prompts), "--device", "cuda", "--dtype",
                           "float32", "--k", 16, "--dense-layers", 1, "--block-size", 16,
                           "--max-new-tokens", 48, "--style", style, "--temperature", 0.9,
                           "--top-p", 0.8, "--seed", 5))
    assert got == want


# -- no hidden synchronisation, graphs replayed ----------------------------------------------------
@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
@pytest.mark.parametrize("extra", [[], ["--temperature", "0.7", "--seed", "3"]])
def test_no_host_sync_inside_a_block(checkpoints, style, extra, tmp_path):
    _, path = checkpoints["qwen2"]
    out = tmp_path / "t.json"
    r = run_binary("--model", path, *ids_args(batch_prompts()), "--device", "cuda",
                   "--block-size", 16, "--k", 16, "--dense-layers", 1, "--max-new-tokens", 96,
                   "--style", style, "--timing-json", out, *extra, env={"MAGE_SYNC_CHECK": "1"})
    assert r.returncode == 0
    t = json.loads(out.read_text())
    assert t["graphs"] and t["later_ms"] is not None and t["commit_ms"] is not None
    blocks = {f["block"] for f in t["forwards"]}
    assert len(blocks) >= 4  # first, later and commit forwards all reached their replays


def test_sync_check_catches_a_sync():
    """The check is live: the same run with the loop's own flag read not exempted must fail.
    (MAGE_SYNC_CHECK=1 makes c10's sync debug mode raise; here forced on the whole run.)"""
    r = run_binary("--model", MODEL, "--ids", "10,11,12", "--max-new-tokens", 8,
                   env={"MAGE_SYNC_CHECK": "1", "MAGE_SYNC_CHECK_STRICT": "1"}, check=False)
    assert r.returncode != 0 and "synchroniz" in r.stderr.lower()


# -- loading straight to the GPU -------------------------------------------------------------------
def test_loading_holds_at_most_one_shard_on_the_host(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=2048, intermediate_size=5632, num_hidden_layers=6,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                      tie_word_embeddings=False, mask_token_id=31999)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="300MB")
    del model
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 3
    largest_kb = max(s.stat().st_size for s in shards) // 1024
    out = tmp_path / "t.json"
    run_binary("--model", tmp_path, "--ids", "1,2,3", "--max-new-tokens", 4, "--dtype",
               "bfloat16", "--timing-json", out)
    t = json.loads(out.read_text())
    growth = t["host_peak_load_kb"] - t["host_rss_before_load_kb"]
    assert growth <= largest_kb * 11 // 10, (growth, largest_kb)
