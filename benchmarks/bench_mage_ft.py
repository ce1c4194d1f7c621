"""MAGE-FT memory and speed on a GPU: random-weight Fast-dLLM v2 1.5B / 7B shapes (issue 15).

Per (shape, mode, seq_len): one MAGE-FT optimizer step (mage_ext.train.objective.mage_ft_loss:
selection + teacher without grad, the sparse student with grad; the complementary copy; k 512,
2 dense layers, lambda 10, bf16 autocast, activation checkpointing, recall measured) and a plain
block-diffusion step of the same batch (objective.bd_loss: both noisy copies exact, CE only).
Modes: "lora" (r 16 on every projection, frozen bf16 base) and "full" (fp32 master weights);
AdamW (torch, fused). Records: shape, mode, seq_len, optimizer, peak_gb (max allocated over the
step), step_s / plain_step_s (median of the timed steps after one warm-up), passes {"select_teacher",
"student_fwd_bwd", "optimizer"} in seconds; top level device, torch, cuda, commit, date.

    python benchmarks/bench_mage_ft.py                       # H200: 1.5B and 7B, 8K-32K, both modes
    python benchmarks/bench_mage_ft.py --shapes fdllm-7b --modes lora --lengths 32768
    python benchmarks/bench_mage_ft.py --smoke --out /tmp/ft.json   # CPU, tiny shape
Writes benchmarks/results/mage_ft_h200.json. A configuration that runs out of memory is recorded
with "error" and the run goes on.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

DEFAULT_OUT = "mage_ft_h200.json"
# transformers Qwen2Config fields of the Fast-dLLM v2 checkpoints (spec section 5).
MODEL_SHAPES = {
    "fdllm-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True),
    "fdllm-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                     tie_word_embeddings=False),
    "smoke": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                  tie_word_embeddings=False),
}
BLOCK, K, DENSE, LAMBDA = 32, 512, 2, 10.0


def build(shape: str, mode: str, device):
    import peft
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from mage_ext.train.layout import enable_activation_checkpointing

    cfg = Qwen2Config(max_position_embeddings=65536, rope_theta=1e6, **MODEL_SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    base_dtype = torch.bfloat16 if mode == "lora" and device.type == "cuda" else torch.float32
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(base_dtype)
    enable_activation_checkpointing(model)
    if mode == "lora":
        with warnings.catch_warnings():   # peft calls transformers' deprecated names
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    return model, opt, cfg.vocab_size - 1


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_config(shape, mode, seq_len, device, reps, block, k):
    from mage_ext.train.objective import MageFTObjective, bd_loss, mage_ft_loss

    model, opt, mask_id = build(shape, mode, device)
    obj = MageFTObjective(block_size=block, mask_id=mask_id, k=k, dense_layers=DENSE, lam=LAMBDA,
                          loss_chunk=1024)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mask_id, (1, seq_len), generator=gen)
    weight = torch.ones(1, seq_len)
    no = torch.zeros(1, seq_len, dtype=torch.bool)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(fn):
        t0 = time.perf_counter()
        with autocast:
            loss, st = fn(model, tokens, weight, no, no, obj, gen)
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return {"step": time.perf_counter() - t0, "optimizer": time.perf_counter() - t1,
                "select_teacher": st.get("t_select", 0.0)}

    rec = {"shape": shape, "mode": mode, "seq_len": seq_len, "block": block, "k": k,
           "dense_layers": DENSE, "optimizer": "AdamW (torch, fused)" if device.type == "cuda"
           else "AdamW (torch)", "trainable_params": sum(p.numel() for p in model.parameters()
                                                         if p.requires_grad)}
    for name, fn in (("mage_ft", mage_ft_loss), ("plain", bd_loss)):
        step(fn)                                   # warm-up (also allocates AdamW's states)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = [step(fn) for _ in range(reps)]
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        if name == "mage_ft":
            rec["step_s"] = med["step"]
            rec["passes"] = {"select_teacher": med["select_teacher"],
                             "student_fwd_bwd": med["step"] - med["select_teacher"]
                             - med["optimizer"], "optimizer": med["optimizer"]}
            rec["peak_gb"] = (torch.cuda.max_memory_allocated(device) / 2**30
                              if device.type == "cuda" else None)
        else:
            rec["plain_step_s"] = med["step"]
            rec["plain_peak_gb"] = (torch.cuda.max_memory_allocated(device) / 2**30
                                    if device.type == "cuda" else None)
    rec["ratio"] = rec["step_s"] / rec["plain_step_s"]
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU")
    p.add_argument("--out", default=None, help=f"output JSON (default results/{DEFAULT_OUT})")
    p.add_argument("--shapes", nargs="*", default=["fdllm-1.5b", "fdllm-7b"],
                   choices=[s for s in MODEL_SHAPES if s != "smoke"])
    p.add_argument("--modes", nargs="*", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--lengths", nargs="*", type=int, default=[8192, 16384, 32768])
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args(argv)
    if a.smoke:
        device, shapes, modes, lengths, reps, block, k = (
            torch.device("cpu"), ["smoke"], ["lora", "full"], [64], 1, 8, 12)
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (or --smoke for the CPU check)")
        device, shapes, modes, lengths, reps, block, k = (
            torch.device("cuda"), a.shapes, a.modes, a.lengths, a.reps, BLOCK, K)
    records = []
    env = environment(device.type)

    def save():   # after every configuration: a run stopped at a time limit keeps its rows
        payload = {**env, "records": records}
        if a.out:
            Path(a.out).write_text(json.dumps(payload, indent=1) + "\n")
            return Path(a.out), payload
        from common import write_results
        return write_results(DEFAULT_OUT, payload), payload

    for shape in shapes:
        for mode in modes:
            for t in lengths:
                try:
                    rec = one_config(shape, mode, t, device, reps, block, k)
                except torch.OutOfMemoryError as e:
                    rec = {"shape": shape, "mode": mode, "seq_len": t,
                           "error": f"OutOfMemoryError: {str(e).splitlines()[0][:200]}"}
                records.append(rec)
                print(json.dumps({key: rec[key] for key in rec if key != "passes"}), flush=True)
                out, payload = save()
                gc.collect()              # an out-of-memory traceback can hold the model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
