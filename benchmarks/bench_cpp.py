"""The C++ binary (mage_generate) against the Python path on the same checkpoint.

A random-weight checkpoint with the Fast-dLLM v2 1.5B shape (28 layers, hidden 1536, 12/2 heads,
d 128, intermediate 8960, vocab 151936, bf16, sharded safetensors) is written to a temp dir once;
each runtime then loads it and generates from the same random prompts in its own process, so
the host memory peak is that runtime's alone. Decoding is SDAR style with 8 steps per block of
32, so every block is exactly 8 denoising forwards + 1 commit (the count does not depend on
random confidences). Per run: prefill s (chunks of 4096 tokens), first / later / commit forward
ms (device time, median over the blocks after the first two, which run eagerly and capture), block ms (median of a block's 8 forwards + commit), decode tokens/s,
load s and the host memory peak. The Python path runs with cuda_graphs=True.

Rows go into benchmarks/results/e2e_h200.json's "records" with "runtime": "cpp" or "python"
(a row with the same shape, context, batch, policy, k, graphs and runtime is replaced; other
rows and the file's top-level fields are kept). One (context, batch) per command keeps each run
under the GPU session's 10-minute limit:

    cmake -S . -B build/cuda -G Ninja -DMAGE_WITH_CUDA=ON -DMAGE_BUILD_TESTS=OFF
    cmake --build build/cuda --target mage_generate
    python benchmarks/bench_cpp.py --context 32768 --batch 1
    python benchmarks/bench_cpp.py --context 32768 --batch 16
    python benchmarks/bench_cpp.py --context 131072 --batch 1
    python benchmarks/bench_cpp.py --context 131072 --batch 16 --policy mage
    python benchmarks/bench_cpp.py --smoke        # tiny shape on the CPU: tests the script
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

SHAPE_1P5B = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, num_hidden_layers=28)
SHAPE_SMOKE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=512, num_hidden_layers=2)
BLOCK, STEPS = 32, 8
KEY = ("shape", "context", "batch", "policy", "k", "graphs", "runtime")


def write_checkpoint(path: Path, shape: dict, context: int, dtype, device: str) -> None:
    """Random weights (seed 0), saved in shards as a Fast-dLLM v2 (qwen2) checkpoint."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**shape, max_position_embeddings=max(32768, 2 * context), rope_theta=1e6,
                      tie_word_embeddings=True, mask_token_id=shape["vocab_size"] - 1,
                      eos_token_id=None, bos_token_id=None)
    cfg.bd_size = BLOCK
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, max_shard_size="1GB")


def write_prompts(path: Path, shape: dict, context: int, batch: int) -> None:
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"] - 1, (batch, context), generator=g)
    path.write_text("\n".join(" ".join(map(str, row)) for row in ids.tolist()) + "\n")


WARM_BLOCKS = 2  # block 0 runs each kind of forward eagerly, block 1 captures its graph


def summarize(forwards: list, prefill_s: float, load_s: float, peak_mb: float, decode_s: float,
              tokens: int) -> dict:
    """forwards: (kind, block, device_ms) of the denoising and commit forwards; the medians
    leave out the first WARM_BLOCKS blocks (eager and capturing forwards)."""
    forwards = [f for f in forwards if f[1] >= WARM_BLOCKS]

    def med(kind):
        v = [ms for k, _, ms in forwards if k == kind]
        return median(v) if v else None

    blocks = {}
    for kind, block, ms in forwards:
        blocks.setdefault(block, [0.0, False])
        blocks[block][0] += ms
        blocks[block][1] |= kind == "commit"
    whole = [total for total, committed in blocks.values() if committed]
    return {"prefill_s": prefill_s, "first_ms": med("first"), "later_ms": med("later"),
            "commit_ms": med("commit"), "block_ms": median(whole) if whole else None,
            "tokens_per_s": tokens / decode_s if decode_s > 0 else None, "load_s": load_s,
            "host_peak_mb": peak_mb}


def run_cpp(binary: Path, model: Path, prompts: Path, a, policy: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timing.json"
        cmd = [str(binary), "--model", str(model), "--ids-file", str(prompts), "--device",
               a.device, "--dtype", a.dtype, "--policy", policy, "--k", str(a.k), "--style",
               "sdar", "--steps", str(STEPS), "--block-size", str(BLOCK), "--max-new-tokens",
               str(BLOCK * a.blocks), "--timing-json", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"bench_cpp: mage_generate failed: {r.stderr}")
        t = json.loads(out.read_text())
    fw = [(f["kind"], f["block"], f["device_ms"]) for f in t["forwards"]]
    return summarize(fw, t["prefill_s"], t["load_s"], t["host_peak_kb"] / 1024, t["decode_s"],
                     t["tokens"])


def worker_python(a) -> None:
    """The Python path in this (fresh) process; prints one JSON line."""
    import torch

    import mage_ext

    t0 = time.perf_counter()
    lm = mage_ext.load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device,
                             tokenizer=False)
    load_s = time.perf_counter() - t0
    prompts = [list(map(int, line.split())) for line in Path(a.prompts).read_text().splitlines()]
    policy = mage_ext.PolicyConfig(method=a.policy, k=a.k)
    t0 = time.perf_counter()
    res = mage_ext.generate(lm, input_ids=prompts, policy=policy, style="sdar", steps=STEPS,
                            block_size=BLOCK, max_new_tokens=BLOCK * a.blocks, stop_ids=[],
                            cuda_graphs=a.device == "cuda")
    total_s = time.perf_counter() - t0
    prefill_s = sum(r.wall_s for r in res.steps if r.phase == "prefill")
    fw = [("commit" if r.phase == "commit" else "first" if r.first else "later", r.block,
           r.device_s * 1e3) for r in res.steps if r.phase != "prefill"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = sum(len(t) for t in res.token_ids)
    print(json.dumps(summarize(fw, prefill_s, load_s, peak_mb, total_s - prefill_s, tokens)))


def run_python(model: Path, prompts: Path, a, policy: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--prompts", str(prompts),
           "--policy", policy, "--k", str(a.k), "--blocks", str(a.blocks), "--device", a.device,
           "--dtype", a.dtype]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"bench_cpp: the Python worker failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def merge(out: Path, rows: list, env: dict) -> None:
    """Replaces rows with the same KEY in out's records, keeps the rest (and the top level)."""
    data = json.loads(out.read_text()) if out.exists() else {}
    for k in ("device", "torch", "cuda", "commit", "date"):
        data.setdefault(k, env.get(k))
    keyed = {tuple(r.get(k) for k in KEY) for r in rows}
    kept = [r for r in data.get("records", []) if tuple(r.get(k) for k in KEY) not in keyed]
    data["records"] = kept + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, nargs="+", default=[32768])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--policy", nargs="+", default=["exact", "mage"], choices=["exact", "mage"])
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=6,
                    help="generation blocks (8 steps + commit; the first 2 are not measured)")
    ap.add_argument("--runtime", nargs="+", default=["cpp", "python"], choices=["cpp", "python"])
    ap.add_argument("--binary", default=str(ROOT / "build" / "cuda" / "mage_generate"))
    ap.add_argument("--out", default=None, help="result JSON (default results/e2e_h200.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (tests the script)")
    # worker mode (internal): the Python path in a fresh process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.blocks < WARM_BLOCKS + 1:
        ap.error(f"--blocks must be >= {WARM_BLOCKS + 1}: the first {WARM_BLOCKS} are not measured")
    if a.worker:
        a.policy = a.policy[0]
        return worker_python(a)

    import torch

    from common import RESULTS, environment

    if a.smoke:
        shape, a.device, a.dtype = SHAPE_SMOKE, "cpu", "float32"
        a.binary = a.binary if Path(a.binary).is_file() else str(ROOT / "build" / "cpp-tests" / "mage_generate")
        if a.context == [32768]:
            a.context = [200]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_cpp: needs a CUDA GPU (or --smoke for a CPU run)")
        shape, a.device, a.dtype = SHAPE_1P5B, "cuda", "bfloat16"
    binary = Path(a.binary)
    if "cpp" in a.runtime and not binary.is_file():
        raise SystemExit(f"bench_cpp: {binary} is not built (see this script's docstring)")
    out = Path(a.out) if a.out else (Path("/tmp/bench_cpp_smoke.json") if a.smoke
                                     else RESULTS / "e2e_h200.json")
    label = "smoke" if a.smoke else "fdllm-1.5b"
    rows = []
    env = environment(a.device)  # each row carries its own commit and date (the file mixes runs)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        write_checkpoint(model, shape, max(a.context), getattr(torch, a.dtype), a.device)
        for context in a.context:
            for batch in a.batch:
                prompts = Path(tmp) / f"prompts_{context}_{batch}.txt"
                write_prompts(prompts, shape, context, batch)
                for policy in a.policy:
                    for runtime in a.runtime:
                        run = run_cpp if runtime == "cpp" else run_python
                        args = (binary, model, prompts, a, policy) if runtime == "cpp" else \
                            (model, prompts, a, policy)
                        r = run(*args)
                        r.update(shape=label, context=context, batch=batch, policy=policy,
                                 k=a.k if policy == "mage" else None, graphs=a.device == "cuda",
                                 runtime=runtime, dtype=a.dtype, style=f"sdar {STEPS} steps",
                                 blocks=a.blocks, commit=env["commit"], date=env["date"])
                        rows.append(r)
                        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
                        print(f"{label} {context:>7} b{batch:<3} {policy:<6} {runtime:<7} "
                              f"prefill {fmt(r['prefill_s'])} s  first {fmt(r['first_ms'])} "
                              f"later {fmt(r['later_ms'])} commit {fmt(r['commit_ms'])} "
                              f"block {fmt(r['block_ms'])} ms  host peak "
                              f"{fmt(r['host_peak_mb'])} MB", flush=True)
    merge(out, rows, env)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
