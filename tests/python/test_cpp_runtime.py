"""The pure C++ runtime (build/cpp-tests/mage_generate) against the Python path.

The binary is built by the CMake build of tests/run_all.sh (MAGE_BUILD_RUNTIME, on by default).
On the shipped tiny model with a passkey prompt, its greedy tokens must equal those of
``mage_ext.generate`` in float32 on the CPU, token for token, for exact attention and MAGE.
"""
import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import mage_ext
from mage_ext.eval import tasks

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "build" / "cpp-tests" / "mage_generate"
MODEL = Path(mage_ext.__file__).parent / "assets" / "tiny_bd"

pytestmark = pytest.mark.skipif(
    not BINARY.is_file(),
    reason=f"{BINARY} is not built (cmake -S . -B build/cpp-tests -G Ninja && "
           "cmake --build build/cpp-tests)")


def run_binary(*args, check=True):
    if "--device" not in args and "--help" not in args:  # the CPU parity tests, on any build
        args = (*args, "--device", "cpu")
    r = subprocess.run([str(BINARY), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, f"mage_generate failed ({r.returncode}): {r.stderr}"
    return r


@pytest.fixture(scope="module")
def passkey():
    lm = mage_ext.load_model(str(MODEL), dtype=torch.float32, tokenizer=False)
    s = tasks.make_sample("passkey", 2048, seed=0, depth=0.5, block_size=lm.block_size)
    return lm, s.prompt, lm.block_size - len(s.prefix)


def assert_parity(lm, prompt, max_new, method, k, dense_layers):
    policy = mage_ext.PolicyConfig(method=method, k=k, dense_layers=dense_layers)
    res = mage_ext.generate(lm, input_ids=[prompt], policy=policy, max_new_tokens=max_new)
    want = res.token_ids[0]
    r = run_binary("--model", MODEL, "--ids", ",".join(map(str, prompt)), "--policy", method,
                   "--k", k, "--dense-layers", dense_layers, "--max-new-tokens", max_new)
    got = [int(t) for t in r.stdout.split()]
    assert got == want, f"C++ {got} != Python {want}"
    read = re.search(r"KV read ([0-9.]+)", r.stderr)
    assert read and float(read.group(1)) == pytest.approx(res.kv_fraction, abs=1e-3), r.stderr


@pytest.mark.parametrize("method,k,dense_layers", [("exact", 512, 2), ("mage", 128, 2),
                                                   ("mage", 128, 1)])
def test_matches_python_token_for_token(passkey, method, k, dense_layers):
    lm, prompt, max_new = passkey
    assert_parity(lm, prompt, max_new, method, k, dense_layers)


# Longer generations (no early stop): several blocks, commit forwards, sparse later steps,
# a prompt remainder heading the first block (1000 % 32 = 8) and a block-aligned prompt.
@pytest.mark.parametrize("n,method,k,dense_layers", [(1000, "exact", 512, 2),
                                                     (1000, "mage", 64, 0),
                                                     (1024, "mage", 128, 1)])
def test_matches_python_over_several_blocks(passkey, n, method, k, dense_layers):
    lm, prompt, _ = passkey
    assert_parity(lm, prompt[:n], 64, method, k, dense_layers)


def test_bfloat16_runs(passkey):
    _, prompt, max_new = passkey
    r = run_binary("--model", MODEL, "--ids", ",".join(map(str, prompt[-100:])), "--dtype",
                   "bfloat16", "--max-new-tokens", max_new)
    assert len(r.stdout.split()) >= 1


def test_missing_model_dir_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    r = run_binary("--model", missing, "--ids", "1,2,3", check=False)
    assert r.returncode != 0
    assert str(missing) in r.stderr


def test_prefill_chunks_give_the_tokens_of_python(tmp_path, passkey):
    """A prompt of 9 full blocks + 13 tokens prefilled 1, 2, 4 or all blocks per forward (one
    mage::block_attention call per multi-block chunk) gives Python's tokens at each chunking."""
    lm, prompt, _ = passkey
    prompt = prompt[:9 * 32 + 13]
    for chunk, forwards in ((32, 9), (64, 5), (128, 3), (4096, 1)):
        policy = mage_ext.PolicyConfig(method="mage", k=64, dense_layers=1)
        want = mage_ext.generate(lm, input_ids=[prompt], policy=policy, max_new_tokens=40,
                                 prefill_chunk=chunk).token_ids[0]
        out = tmp_path / f"t{chunk}.json"
        r = run_binary("--model", MODEL, "--ids", ",".join(map(str, prompt)), "--k", 64,
                       "--dense-layers", 1, "--max-new-tokens", 40, "--prefill-chunk", chunk,
                       "--timing-json", out)
        assert [int(t) for t in r.stdout.split()] == want, f"--prefill-chunk {chunk}"
        assert json.loads(out.read_text())["prefill_forwards"] == forwards


@pytest.mark.parametrize("args,needle", [
    (["--ids", "1,2"], "--model"),
    (["--model", str(MODEL), "--ids", "1,x"], "--ids"),
    (["--model", str(MODEL), "--ids", "1", "--policy", "quest"], "quest"),
    (["--model", str(MODEL), "--ids", "1", "--bogus", "1"], "--bogus"),
    (["--model", str(MODEL), "--ids", "99999"], "vocabulary"),
    (["--model", str(MODEL), "--ids", "1,2", "--ids", "99999"], "vocabulary"),  # any prompt
    (["--model", str(MODEL), "--ids", "1", "--style", "llada"], "--style: expected fast_dllm or sdar"),
    (["--model", str(MODEL), "--ids", "1", "--remasking", "random"], "--remasking: expected"),
    (["--model", str(MODEL), "--ids", "1", "--steps", "x"], "--steps: expected an integer"),
    (["--model", str(MODEL), "--ids", "1", "--style", "sdar", "--steps", "0"],
     "steps must lie in [1, block_size=32], got 0"),
    (["--model", str(MODEL), "--ids", "1", "--style", "sdar", "--block-size", "8", "--steps", "9"],
     "steps must lie in [1, block_size=8], got 9"),
])
def test_bad_arguments(args, needle):
    r = run_binary(*args, check=False)
    assert r.returncode != 0
    assert needle in r.stderr


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    r = run_binary("--model", tmp_path, "--ids", "1", check=False)
    assert r.returncode != 0 and "unknown model_type 'llama'" in r.stderr


# Random tiny Qwen2 (q/k/v biases, untied lm_head) and Qwen3 (q_norm/k_norm) checkpoints in
# float32, saved by transformers: the C++ forward of both architectures against the Python path.
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_matches_python_on_random_checkpoints(tmp_path, family):
    from tiny_models import MASK_ID, tiny_model

    model = tiny_model(family, seed=3)
    model.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, MASK_ID, (75,), generator=g).tolist()
    policy = mage_ext.PolicyConfig(method="mage", k=16, dense_layers=1)
    want = mage_ext.generate(model, input_ids=[prompt], policy=policy, style="fast_dllm",
                             block_size=16, max_new_tokens=40).token_ids[0]
    r = run_binary("--model", tmp_path, "--ids", ",".join(map(str, prompt)), "--k", 16,
                   "--dense-layers", 1, "--block-size", 16, "--max-new-tokens", 40,
                   "--style", "fast_dllm")
    assert [int(t) for t in r.stdout.split()] == want


# The SDAR loop (no shift, `steps` steps per block, low-confidence remasking) on random Qwen3
# (its default style) and Qwen2 (style sdar) checkpoints: blocks of 8 so 40 new tokens span
# several blocks and commits; prompts of 48 (block-aligned: the first block is all [MASK]) and
# 53 (its remainder heads the first block); uneven schedules (8 / 3 steps = 3, 3, 2).
@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory):
    from tiny_models import tiny_model

    out = {}
    for family in ("qwen2", "qwen3"):
        model = tiny_model(family, seed=7, initializer_range=1.0)  # peaked: dynamic rule fires
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        out[family] = (model, path)
    return out


SDAR_CASES = [  # family, remasking, policy, prompt length, steps, CLI defaults only
    ("qwen3", "low_confidence_static", "exact", 53, 3, False),
    ("qwen3", "low_confidence_static", "mage", 48, 4, True),
    ("qwen3", "low_confidence_dynamic", "exact", 48, 3, False),
    ("qwen3", "low_confidence_dynamic", "mage", 53, 8, False),
    ("qwen2", "low_confidence_static", "exact", 48, 8, False),
    ("qwen2", "low_confidence_static", "mage", 53, 3, False),
    ("qwen2", "low_confidence_dynamic", "exact", 53, 4, False),
    ("qwen2", "low_confidence_dynamic", "mage", 48, 3, False),
]


@pytest.mark.parametrize("family,remasking,method,n,steps,defaults", SDAR_CASES)
def test_sdar_matches_python(random_checkpoints, family, remasking, method, n, steps, defaults):
    from tiny_models import MASK_ID

    model, path = random_checkpoints[family]
    prompt = torch.randint(0, MASK_ID, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    threshold = 0.9 if defaults else 0.5  # lower: the dynamic rule fires in some blocks
    policy = mage_ext.PolicyConfig(method=method, k=16, dense_layers=1)
    res = mage_ext.generate(model, input_ids=[prompt], policy=policy, style="sdar", block_size=8,
                            steps=steps, remasking=remasking, threshold=threshold,
                            max_new_tokens=40)
    if remasking == "low_confidence_dynamic":  # the case is meaningful: a full block ended early
        later = [r.block for r in res.steps if r.phase == "denoise" and r.block > 0]
        assert len(later) < len(set(later)) * steps
    args = ["--model", path, "--ids", ",".join(map(str, prompt)), "--policy", method, "--k", 16,
            "--dense-layers", 1, "--block-size", 8, "--max-new-tokens", 40]
    if not defaults:
        args += ["--style", "sdar", "--steps", steps, "--remasking", remasking,
                 "--threshold", threshold]
    got = [int(t) for t in run_binary(*args).stdout.split()]
    assert got == res.token_ids[0], f"C++ {got} != Python {res.token_ids[0]}"
    assert len(got) == 40


# A batch of prompts of different lengths (block 8: 19 and 41 leave remainders, 64 is aligned;
# they differ by more than one block, so some prefill chunks hold scratch rows): the rows run in
# lockstep, and each row's tokens equal both the Python batch and the binary on that prompt alone.
BATCH_LENGTHS = (19, 64, 41)


def batch_prompts(lengths=BATCH_LENGTHS):
    from tiny_models import MASK_ID

    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, MASK_ID, (n,), generator=g).tolist() for n in lengths]


def batch_args(path, prompts, style, method, max_new=40):
    ids = [a for p in prompts for a in ("--ids", ",".join(map(str, p)))]
    return ["--model", path, *ids, "--policy", method, "--k", 16, "--dense-layers", 1,
            "--block-size", 8, "--max-new-tokens", max_new, "--style", style]


def binary_lines(*args):
    return [[int(t) for t in line.split()] for line in run_binary(*args).stdout.splitlines()]


@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
@pytest.mark.parametrize("method", ["exact", "mage"])
def test_batch_matches_python_and_single_runs(random_checkpoints, style, method):
    model, path = random_checkpoints["qwen2"]
    prompts = batch_prompts()
    policy = mage_ext.PolicyConfig(method=method, k=16, dense_layers=1)
    want = mage_ext.generate(model, input_ids=prompts, policy=policy, style=style, block_size=8,
                             max_new_tokens=40).token_ids
    got = binary_lines(*batch_args(path, prompts, style, method))
    assert got == want, f"C++ {got} != Python {want}"
    assert all(len(t) == 40 for t in got)
    alone = [binary_lines(*batch_args(path, [p], style, method))[0] for p in prompts]
    assert got == alone


@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
def test_batch_in_prefill_chunks_matches_python(random_checkpoints, style):
    """Chunks of 2 blocks: rows whose prompts end in different chunks (scratch rows, start
    lengths per row) give Python's tokens for the same chunking."""
    model, path = random_checkpoints["qwen2"]
    prompts = batch_prompts()
    policy = mage_ext.PolicyConfig(method="mage", k=16, dense_layers=1)
    want = mage_ext.generate(model, input_ids=prompts, policy=policy, style=style, block_size=8,
                             max_new_tokens=40, prefill_chunk=16).token_ids
    got = binary_lines(*batch_args(path, prompts, style, "mage"), "--prefill-chunk", 16)
    assert got == want, f"C++ {got} != Python {want}"


# A stop id (the checkpoint's eos_token_id) that ends one row early: the batch keeps running for
# the others and the stopped row returns only the tokens before it.
def test_batch_stop_id(random_checkpoints, tmp_path):
    model, path = random_checkpoints["qwen2"]
    prompts = batch_prompts()
    policy = mage_ext.PolicyConfig(method="mage", k=16, dense_layers=1)
    free = binary_lines(*batch_args(path, prompts, "fast_dllm", "mage"))
    stop = next(t for t in free[0][4:] if t not in free[0][:4] and any(t not in f for f in free))
    saved = copy.deepcopy(model)  # the fixture's model stays without a stop id
    saved.config.eos_token_id = saved.generation_config.eos_token_id = stop
    saved.save_pretrained(tmp_path)
    want = mage_ext.generate(model, input_ids=prompts, policy=policy, style="fast_dllm",
                             block_size=8, max_new_tokens=40, stop_ids=[stop]).token_ids
    got = binary_lines(*batch_args(tmp_path, prompts, "fast_dllm", "mage"))
    assert got == want, f"C++ {got} != Python {want}"
    assert got[0] == free[0][:free[0].index(stop)]
    assert any(len(t) == 40 for t in got)  # another row ran to the end


# -- text in, text out ---------------------------------------------------------------------------
# The binary tokenizes with its own C++ tokenizer (tokenizer.json) and streams the decoded text;
# both must match the Python path, which tokenizes with the `tokenizers` library.
PASSKEY_TEXT = "the pass key is 71432 . remember it . " * 20 + "what is the pass key ?"


@pytest.fixture(scope="module")
def shipped():
    return mage_ext.load_model(str(MODEL), dtype=torch.float32)


def python_text(lm, text, **kw):
    res = mage_ext.generate(lm, None, [text], **kw)
    return res.texts[0], res.token_ids[0]


@pytest.mark.parametrize("method", ["exact", "mage"])
def test_text_prompt_streams_the_python_text(shipped, method):
    policy = mage_ext.PolicyConfig(method=method, k=64, dense_layers=1)
    want, ids = python_text(shipped, PASSKEY_TEXT, policy=policy, max_new_tokens=48)
    r = run_binary("--model", MODEL, "--prompt", PASSKEY_TEXT, "--policy", method, "--k", 64,
                   "--dense-layers", 1, "--max-new-tokens", 48, "--device", "cpu")
    assert r.stdout == want + "\n"
    assert len(ids) > 0


def test_prompt_file_and_chat_template(shipped, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text(PASSKEY_TEXT)
    chat = "<|im_start|>user\n" + PASSKEY_TEXT + "<|im_end|>\n<|im_start|>assistant\n"
    for args, text in ((["--prompt-file", f], PASSKEY_TEXT), (["--prompt-file", f, "--chat"], chat)):
        want, _ = python_text(shipped, text, max_new_tokens=32)
        r = run_binary("--model", MODEL, *args, "--max-new-tokens", 32)
        assert r.stdout == want + "\n", args


def test_text_batch_prints_each_text(shipped):
    texts = [PASSKEY_TEXT, "remember it . what is the pass key ?"]
    res = mage_ext.generate(shipped, None, texts, max_new_tokens=32)
    r = run_binary("--model", MODEL, "--prompt", texts[0], "--prompt", texts[1],
                   "--max-new-tokens", 32)
    sep = "-" * 40
    assert r.stdout == "".join(f"{t}\n{sep}\n" for t in res.texts)


# Sampling: the binary draws with a torch generator seeded by --seed through the same ops as
# decoding.sample, so it matches mage_ext.generate(generator=torch.Generator().manual_seed(seed)).
@pytest.mark.parametrize("style", ["fast_dllm", "sdar"])
def test_sampling_matches_python_for_a_seed(random_checkpoints, style):
    from tiny_models import MASK_ID

    model, path = random_checkpoints["qwen3"]
    prompt = torch.randint(0, MASK_ID, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    policy = mage_ext.PolicyConfig(method="mage", k=16, dense_layers=1)
    want = mage_ext.generate(model, input_ids=[prompt], policy=policy, style=style, block_size=8,
                             max_new_tokens=40, temperature=0.9, top_p=0.8,
                             generator=torch.Generator().manual_seed(7)).token_ids[0]
    args = ["--model", path, "--ids", ",".join(map(str, prompt)), "--k", 16, "--dense-layers", 1,
            "--block-size", 8, "--max-new-tokens", 40, "--style", style, "--temperature", 0.9,
            "--top-p", 0.8]
    got = [int(t) for t in run_binary(*args, "--seed", 7).stdout.split()]
    assert got == want
    again = [int(t) for t in run_binary(*args, "--seed", 7).stdout.split()]
    assert again == got
    greedy = [int(t) for t in run_binary(*args[:-4]).stdout.split()]
    other = [[int(t) for t in run_binary(*args, "--seed", s).stdout.split()] for s in (8, 9)]
    assert any(o != got for o in other) and got != greedy


def test_timing_json(tmp_path, passkey):
    _, prompt, _ = passkey
    out = tmp_path / "t.json"
    run_binary("--model", MODEL, "--ids", ",".join(map(str, prompt[:200])), "--max-new-tokens", 64,
               "--timing-json", out)
    t = json.loads(out.read_text())
    assert t["runtime"] == "cpp" and t["device"] == "cpu" and t["dtype"] == "float32"
    # 6 full blocks, one chunk (the default --prefill-chunk)
    assert t["prefill_forwards"] == 1 and t["prefill_s"] > 0 and t["host_peak_kb"] > 0
    assert t["later_ms"] > 0 and t["commit_ms"] > 0 and t["block_ms"] > 0
    kinds = {f["kind"] for f in t["forwards"]}
    assert kinds <= {"first", "later", "commit"} and "first" in kinds


@pytest.mark.parametrize("args,needle", [
    (["--ids", "1", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["--ids", "1", "--temperature", "nan"], "--temperature: expected a finite number"),
    (["--ids", "1", "--top-p", "0"], "--top-p: must lie in (0, 1]"),
    (["--ids", "1", "--top-p", "1.5"], "--top-p: must lie in (0, 1]"),
    (["--ids", "1", "--seed", "-3"], "--seed: must be >= 0"),
    (["--ids", "1", "--seed", "x"], "--seed: expected an integer"),
    (["--ids", "1", "--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
    (["--ids", "1", "--dtype", "int8"], "--dtype: expected float32, bfloat16 or float16"),
    (["--ids", "1", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--ids", "1", "--prefill-chunk", "0"], "--prefill-chunk: must be >= 1"),
    (["--ids", "1", "--threshold", "2"], "--threshold: must lie in [0, 1]"),
    (["--ids", "1", "--k", "0"], "--k: must be >= 1"),
    (["--ids", "1", "--prompt", "x"], "cannot be mixed"),
    (["--ids", "1", "--chat"], "--chat: applies to text prompts only"),
    (["--prompt-file", "/nonexistent/p.txt"], "/nonexistent/p.txt"),
    (["--prompt", ""], "encodes to no tokens"),
    ([], "give a prompt"),
])
def test_bad_cli_values(args, needle):
    r = run_binary("--model", MODEL, *args, check=False)
    assert r.returncode != 0
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, no usage dump


def test_cuda_device_without_a_cuda_build_or_gpu():
    r = run_binary("--model", MODEL, "--ids", "1", "--device", "cuda", check=False)
    assert r.returncode != 0
    assert "built without CUDA" in r.stderr or "no CUDA device" in r.stderr


def test_help_states_the_defaults():
    out = run_binary("--help").stdout
    assert "(default 256)" in out and "bfloat16 on CUDA, float32 on the CPU" in out


def test_ids_file_equals_ids(tmp_path):
    prompts = batch_prompts()[:2]
    f = tmp_path / "ids.txt"
    f.write_text(" ".join(map(str, prompts[0])) + "\n\n" + ",".join(map(str, prompts[1])) + "\n")
    common = ["--model", MODEL, "--max-new-tokens", 16, "--threads", 1]
    by_file = run_binary(*common, "--ids-file", f).stdout
    by_args = run_binary(*common, "--ids", ",".join(map(str, prompts[0])),
                         "--ids", ",".join(map(str, prompts[1]))).stdout
    assert by_file == by_args and len(by_file.splitlines()) == 2
