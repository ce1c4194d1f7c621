"""End to end: what a user of ``mage_ext.generate`` gets per forward, per block and per prompt.

Random-weight models of the Fast-dLLM v2 1.5B and 7B shapes, bf16, batch 1 and 16, contexts of
32K and 128K tokens. Decoding runs the same path ``generate`` takes on a GPU by default (the
fused forward of mage_ext/hf/fast_forward.py, the block loop of mage_ext/core/loop.py with its
first / later / commit forwards replayed as CUDA graphs), with a fixed count of 8 denoising
forwards + 1 commit per block so the exact / MAGE ratio does not depend on random confidences
(one row per shape also in the threshold mode). The cache is filled with random K/V instead of a
prefill (the decode cost does not depend on the values); the prefill is timed on its own at
batch 1 with the same loop (``prefill_s``).

Per row: first / later / commit forward (CUDA events, median over the steady-state blocks),
block (host wall time between consecutive block ends, i.e. everything a user waits for per
block), decode tokens/s, and the byte floor of each forward = (weight bytes + KV bytes that must
be read) / device copy bandwidth measured in this run. Peers in the same run: the stock
transformers model (SDPA) prefilling the whole prompt in one causal forward, and one 32-token
denoising forward of the stock model over the same-length cache (what a user runs instead).

    python benchmarks/bench_e2e.py                       # H200 grid -> results/e2e_h200.json
    python benchmarks/bench_e2e.py --shapes 1.5b --contexts 32768 --batches 1
    python benchmarks/bench_e2e.py --smoke               # tiny CPU run of the same code path
"""
from __future__ import annotations

import argparse
import gc
import inspect
import os
import sys
import time
from statistics import median

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (RESULTS, copy_bandwidth_tbps, env_set, environment,  # noqa: E402
                    write_result)

from mage_ext import PolicyConfig  # noqa: E402
from mage_ext.core.loop import DEFAULT_PREFILL_CHUNK, BlockLoop, DecodeConfig  # noqa: E402
from mage_ext.generation import _forward  # noqa: E402
from mage_ext.hf.cache import MageCache  # noqa: E402
from mage_ext.hf.checkpoint import to_dtype_keeping_rope_fp32  # noqa: E402
from mage_ext.hf.enable import disable_mage, enable_mage  # noqa: E402

SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, layers=28, tie=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, layers=28, tie=False),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, layers=4, tie=True),
}
BLOCK = 32


def build_model(shape: dict, max_pos: int, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                      num_attention_heads=shape["num_attention_heads"],
                      num_key_value_heads=shape["num_key_value_heads"],
                      vocab_size=shape["vocab_size"], num_hidden_layers=shape["layers"],
                      max_position_embeddings=max_pos, rope_theta=1e6,
                      tie_word_embeddings=shape["tie"], mask_token_id=shape["vocab_size"] - 1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    to_dtype_keeping_rope_fp32(model, dtype)
    return model.eval()


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes(cfg, batch: int, entries_per_layer: list, elem: int) -> int:
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return sum(2 * batch * cfg.num_key_value_heads * n * d * elem for n in entries_per_layer)


def floors_ms(model, batch, context, policy, bw_tbps) -> dict:
    """Byte floors of the three forwards: weights + the cache entries each must read."""
    cfg, elem = model.config, next(model.parameters()).element_size()
    layers = cfg.num_hidden_layers
    w = weight_bytes(model)
    dense = [context] * layers
    if policy.method == "exact":
        sparse = dense
    else:
        sparse = [context if l < policy.dense_layers else min(policy.k, context)
                  for l in range(layers)]
    ms = lambda nbytes: nbytes / (bw_tbps * 1e12) * 1e3  # noqa: E731
    return {"floor_first_ms": ms(w + kv_bytes(cfg, batch, dense, elem)),
            "floor_later_ms": ms(w + kv_bytes(cfg, batch, sparse, elem)),
            "floor_commit_ms": ms(w + kv_bytes(cfg, batch, sparse if
                                               policy.commit_attention == "sparse" else dense, elem))}


def random_cache(model, batch, context, capacity, policy, keys=None, values=None):
    cache = MageCache.for_model(model, batch, capacity, policy)
    if keys is None:
        g = torch.Generator(device=cache.keys[0].device).manual_seed(0)
        for t in cache.keys + cache.values:
            t[:, :, :context].normal_(generator=g)
    else:  # share one random cache between the policies of a (context, batch) point
        cache.keys, cache.values = keys, values
    cache.cache_lens.fill_(context)
    cache.max_len = context
    return cache


def decode_run(model, cache, batch, context, policy, blocks, fixed_steps, threshold, fused):
    """Runs ``blocks`` generation blocks after a filled cache; returns the loop and the host
    times at which each block's denoising ended."""
    mask_id = model.config.vocab_size - 1
    cfg = DecodeConfig(style="fast_dllm", block_size=BLOCK, mask_id=mask_id, stop_ids=set(),
                       max_new_tokens=blocks * BLOCK, fixed_steps=fixed_steps,
                       threshold=threshold)
    device = cache.cache_lens.device
    use_graphs = device.type == "cuda"
    seqs = [[0] * context for _ in range(batch)]  # lengths only: the prefill is skipped
    forward = _forward(model, cache, fused, device)
    ends = []
    loop = BlockLoop(forward, cache, seqs, cfg, policy=policy, use_graphs=use_graphs,
                     on_block=lambda i, x: ends.append(time.perf_counter()))
    loop.x[:, 0] = torch.randint(0, mask_id, (batch,), device=device)  # the prefill's token
    with torch.no_grad():
        loop.blocks()
    return loop, ends


def summarize(loop, ends, warm_blocks: int) -> dict:
    def med(phase, first=None):
        vals = [r.device_s for r in loop.records if r.phase == phase and r.block >= warm_blocks
                and (first is None or r.first == first)]
        return 1e3 * median(vals) if vals else None
    steps = [r for r in loop.records if r.phase == "denoise" and r.block >= warm_blocks]
    spans = [b - a for a, b in zip(ends[warm_blocks:], ends[warm_blocks + 1:])]
    block_s = median(spans) if spans else None
    n_blocks = len({r.block for r in steps}) or 1
    return {"first_ms": med("denoise", True), "later_ms": med("denoise", False),
            "commit_ms": med("commit"), "block_ms": block_s * 1e3 if block_s else None,
            "steps_per_block": len(steps) / n_blocks,
            "tokens_per_s": len(loop.seqs) * BLOCK / block_s if block_s else None}


def prefill_loop(model, context, policy, fused, chunk=DEFAULT_PREFILL_CHUNK) -> BlockLoop:
    """The block loop of one random prompt of ``context`` tokens (batch 1), ready to prefill
    ``chunk`` prompt tokens per forward."""
    mask_id = model.config.vocab_size - 1
    prompt = torch.randint(0, mask_id, (context,), generator=torch.Generator().manual_seed(1))
    cache = MageCache.for_model(model, 1, context + 2 * BLOCK, policy)
    cfg = DecodeConfig(style="fast_dllm", block_size=BLOCK, mask_id=mask_id, stop_ids=set())
    device = cache.cache_lens.device
    return BlockLoop(_forward(model, cache, fused, device), cache, [prompt.tolist()], cfg,
                     policy=policy, prefill_chunk=chunk)


def time_prefill(model, context, policy, fused, chunk=DEFAULT_PREFILL_CHUNK) -> float:
    """Seconds to prefill one random prompt of ``context`` tokens through the loop (batch 1),
    ``chunk`` prompt tokens per forward."""
    loop = prefill_loop(model, context, policy, fused, chunk)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        loop.prefill()
    sync()
    return time.perf_counter() - t0


def with_peak_gb(fn):
    """(fn(), peak GPU memory in GB above what was allocated before the call)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    return result, (torch.cuda.max_memory_allocated() - base) / 1e9


def default_prefill_path(device) -> str:
    from mage_ext.core.cache import _block_attention_on_gpu
    return "block_attention" if device == "cpu" or _block_attention_on_gpu() else "per_block"


def time_prefill_paths(model, context, fused, device) -> tuple:
    """Prefill seconds of the default path (one block_attention call per chunk of
    DEFAULT_PREFILL_CHUNK tokens; on sm90+ its parts run on cuDNN, whose first prefill builds a
    graph per chunk shape: "block_attention" is that first, cold run, "block_attention_warm" a
    second one of the same length) and, on the GPU, of the alternatives: FlashAttention-2 for the
    parts, in 16K and in 4K chunks (the default before), and one dense_attention call per block.
    The CPU has one path. Also returns the warm run's peak GPU memory (GB above what was
    allocated before it, its cache included, as the stock peer's peak; None on the CPU)."""
    exact = PolicyConfig(method="exact")
    out, peak = {}, None
    enable_mage(model)
    try:
        with env_set("MAGE_PREFILL_BLOCK_ATTENTION", "1"):
            out["block_attention"] = time_prefill(model, context, exact, fused)
            if device != "cpu":
                out["block_attention_warm"], peak = with_peak_gb(
                    lambda: time_prefill(model, context, exact, fused))
                with env_set("MAGE_BLOCK_ATTENTION_KERNEL", "flash"):
                    out["block_attention_flash"] = time_prefill(model, context, exact, fused)
                    out["block_attention_flash_chunk4k"] = time_prefill(model, context, exact,
                                                                        fused, chunk=4096)
        if device != "cpu":
            with env_set("MAGE_PREFILL_BLOCK_ATTENTION", "0"):
                out["per_block"] = time_prefill(model, context, exact, fused)
    finally:
        disable_mage(model)
    return out, peak


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stock_peers(model, context, reps: int = 5) -> dict:
    """The stock transformers model (SDPA): a one-shot causal prefill of the prompt (seconds,
    peak memory above the weights) and one 32-token denoising forward over its cache (ms)."""
    mask_id = model.config.vocab_size - 1
    device = next(model.parameters()).device
    ids = torch.randint(0, mask_id, (1, context), device=device)
    block = torch.randint(0, mask_id, (1, BLOCK), device=device)
    cuda = device.type == "cuda"
    with torch.no_grad():
        out = model(input_ids=ids[:, :BLOCK], use_cache=True, logits_to_keep=1)  # warm-up
        del out
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync()
        prefill_s = time.perf_counter() - t0
        peak_gb = (torch.cuda.max_memory_allocated() - base) / 1e9 if cuda else None
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params and "past_key_values" not in params else \
            "past_key_values"
        times = []
        for _ in range(reps + 1):
            if cuda:
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                ev[0].record()
            t0 = time.perf_counter()
            model(input_ids=block, use_cache=True, logits_to_keep=0, **{name: cache})
            if cuda:
                ev[1].record()
                sync()
                times.append(ev[0].elapsed_time(ev[1]))
            else:
                times.append((time.perf_counter() - t0) * 1e3)
            cache.crop(-BLOCK)  # back to the prompt
    del cache, out
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"stock_sdpa_prefill_s": prefill_s, "stock_sdpa_prefill_peak_gb": peak_gb,
            "stock_denoise_forward_ms": median(times[1:])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1.5b", "7b"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--k", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--blocks", type=int, default=6, help="blocks per row (2 warm up the graphs)")
    ap.add_argument("--fixed-steps", type=int, default=8)
    ap.add_argument("--prefill-contexts", type=int, nargs="*", default=None,
                    help="contexts whose batch-1 prefill is timed (default: all)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-threshold", action="store_true", help="skip the threshold-mode rows")
    ap.add_argument("--eager", action="store_true", help="stock forward, no graphs (diagnosis)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (tests the script)")
    ap.add_argument("--max-kv-gb", type=float, default=100.0,
                    help="skip points whose KV cache would exceed this")
    ap.add_argument("--out", default=None, help="result JSON (default results/e2e_h200.json)")
    a = ap.parse_args(argv)
    if a.blocks < 4:
        ap.error("--blocks must be >= 4: 2 warm the graphs up, the block time is a span of two")
    if a.smoke:
        device, dtype = "cpu", torch.float32
        a.shapes, a.contexts, a.batches, a.k, a.blocks = ["smoke"], [256], [1, 2], [64], 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_e2e: needs a CUDA GPU (or --smoke for a CPU run)")
        device, dtype = "cuda", torch.bfloat16
    fused = False if a.eager else None
    env = environment(device)
    bw = copy_bandwidth_tbps() if device == "cuda" else 0.02
    records = []
    warm = 2
    for shape_name in a.shapes:
        shape = SHAPES[shape_name]
        model = build_model(shape, max(a.contexts) + 4 * BLOCK * a.blocks, dtype, device)
        cfg = model.config
        d = cfg.hidden_size // cfg.num_attention_heads
        for context in a.contexts:
            peers = {} if a.no_peers else stock_peers(model, context)
            prefill_s, prefill_paths, prefill_peak = {}, {}, None
            if a.prefill_contexts is None or context in a.prefill_contexts:
                prefill_paths, prefill_peak = time_prefill_paths(model, context, fused, device)
                prefill_s = prefill_paths[default_prefill_path(device)]
            for batch in a.batches:
                kv_gb = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * \
                    (context + a.blocks * BLOCK + BLOCK) * d * 2 / 1e9
                if kv_gb > a.max_kv_gb:
                    print(f"skip {shape_name} {context} batch {batch}: KV {kv_gb:.0f} GB")
                    continue
                capacity = context + (a.blocks + 1) * BLOCK
                policies = [("exact", PolicyConfig(method="exact"), 0)] + [
                    (f"mage k={k}", PolicyConfig(method="mage", k=k), k) for k in a.k]
                modes = [("fixed", a.fixed_steps)] + ([] if a.no_threshold or batch != 1
                                                     else [("threshold", None)])
                shared = None
                for mode, fixed in modes:
                    rows = {}
                    for label, policy, k in policies:
                        if mode == "threshold" and k not in (0, 512):
                            continue
                        enable_mage(model, policy)
                        try:
                            cache = random_cache(model, batch, context, capacity, policy,
                                                 *(shared or (None, None)))
                            shared = shared or (cache.keys, cache.values)
                            loop, ends = decode_run(model, cache, batch, context, policy,
                                                    a.blocks, fixed, 0.9, fused)
                        finally:
                            disable_mage(model)
                        rec = {"shape": shape_name, "context": context, "batch": batch,
                               "policy": policy.method, "k": k or None, "mode": mode,
                               "graphs": device == "cuda" and not a.eager,
                               "runtime": "python",
                               "prefill_s": prefill_s if batch == 1 and prefill_s else None,
                               "prefill_s_paths": prefill_paths if batch == 1 else {},
                               "prefill_peak_gb": prefill_peak if batch == 1 else None}
                        rec.update(summarize(loop, ends, warm))
                        rec.update(floors_ms(model, batch, context, policy, bw))
                        rec["peers"] = dict(peers) if batch == 1 else {}
                        rows[label] = rec
                        records.append(rec)
                        del loop, cache
                        gc.collect()
                    ex = rows.get("exact")
                    for label, rec in rows.items():
                        if ex and rec is not ex and ex["later_ms"] and rec["later_ms"]:
                            rec["later_speedup_vs_exact"] = ex["later_ms"] / rec["later_ms"]
                            if ex["block_ms"] and rec["block_ms"]:
                                rec["block_speedup_vs_exact"] = ex["block_ms"] / rec["block_ms"]
                    _print(rows)
                del shared
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    out = a.out or (os.path.join("/tmp", "e2e_smoke.json") if a.smoke
                    else str(RESULTS / "e2e_h200.json"))
    payload = {"device": env["device"], "torch": env["torch"], "cuda": env["cuda"],
               "commit": env["commit"], "date": env["date"], "copy_bw_tbps": bw,
               "records": records}
    write_result(out, payload)


def _print(rows: dict) -> None:
    f = lambda v, w=8, p=2: f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa
    for label, r in rows.items():
        peers = r["peers"]
        print(f"{r['shape']:>5} {r['context']:>7} b{r['batch']:<3}{r['mode']:<10}{label:<12}"
              f" prefill{f(r['prefill_s'])}s first{f(r['first_ms'])} later{f(r['later_ms'])}"
              f" (floor{f(r['floor_later_ms'])}) commit{f(r['commit_ms'])} block{f(r['block_ms'])}"
              f" x{f(r.get('block_speedup_vs_exact'), 5)} tok/s{f(r['tokens_per_s'], 9, 0)}"
              f" steps{f(r['steps_per_block'], 5, 1)}"
              + "".join(f" | prefill {k}{f(v)}s" for k, v in r["prefill_s_paths"].items())
              + (f" | prefill peak{f(r['prefill_peak_gb'])} GB vs stock"
                 f"{f(peers.get('stock_sdpa_prefill_peak_gb'))} GB"
                 if r.get("prefill_peak_gb") is not None else "")
              + (f" | stock prefill{f(peers.get('stock_sdpa_prefill_s'))}s"
                 f" denoise{f(peers.get('stock_denoise_forward_ms'))}ms" if peers else ""),
              flush=True)


if __name__ == "__main__":
    main()
