"""Train the project's tiny block-diffusion model (stock Qwen2ForCausalLM) on synthetic tasks.

    python finetune/train_tiny.py --out runs/tiny --minutes 7.5            # GPU: bf16 autocast
    python finetune/train_tiny.py --out /tmp/t --device cpu --smoke        # a few CPU steps
    python finetune/train_tiny.py --out runs/tiny2 --resume runs/tiny --minutes 5

The recipe (finetune/tiny_recipe.json) gives the model shape and the curriculum: phases that each take
a share of the --minutes budget (or stop at max_steps), with their own lengths, batch size in tokens,
cosine learning rate and data mix. The objective is bd_objective.py's; the output directory is a
loadable HF checkpoint (config.json with mask_token_id, bf16 safetensors in <= 6 MB shards, tokenizer.json) plus
train_state.pt (fp32 weights + optimizer, for --resume only), train_log.json and eval.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bd_objective as BD  # noqa: E402
import tiny_data  # noqa: E402
import tiny_eval  # noqa: E402
import tiny_init  # noqa: E402
from mage_ext.eval import vocab as V  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--recipe", default=os.path.join(HERE, "tiny_recipe.json"))
    p.add_argument("--minutes", type=float, default=None, help="training wall-clock budget (eval extra)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", default=None, help="directory with train_state.pt to continue from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="2 steps per phase, short lengths, tiny eval")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--attention", choices=BD.ATTENTIONS, default="sdpa",
                   help="training attention: stock SDPA with the dense layout mask, or the MAGE ops "
                        "(mage_ext.train.TrainLayout: no L x L mask)")
    p.add_argument("--workers", type=int, default=None,
                   help="data-building processes (default: 6 on CUDA, 0 on CPU)")
    a = p.parse_args(argv)
    if a.minutes is not None and a.minutes <= 0:
        p.error(f"--minutes must be > 0, got {a.minutes}")
    return a


def load_recipe(path: str, smoke: bool) -> dict:
    with open(path) as f:
        r = json.load(f)
    for k in ("model", "phases", "eval", "block_size"):
        if k not in r:
            raise ValueError(f"recipe {path} lacks the key {k!r}")
    if smoke:   # same code paths, a few seconds of work
        for ph in r["phases"]:
            ph["max_steps"] = 1
            ph["lengths"] = [min(256, x) for x in ph["lengths"]]
            ph["batch_tokens"] = min(ph["batch_tokens"], 2048)
        r["eval"].update(lengths=[256], samples=2, tasks=r["eval"]["tasks"][:2])
    return r


def build_model(recipe: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = dict(recipe["model"])
    ids = V.token_to_id()
    cfg = Qwen2Config(vocab_size=len(V.vocabulary()), bos_token_id=ids[V.EOS], eos_token_id=ids[V.EOS],
                      pad_token_id=ids[V.PAD], mask_token_id=ids[V.MASK], bd_size=recipe["block_size"],
                      use_cache=False, **m)
    return Qwen2ForCausalLM(cfg)


def lr_at(ph: dict, progress: float, step: int) -> float:
    warm = ph.get("warmup_steps", 0)
    if step < warm:
        return ph["lr"] * (step + 1) / warm
    floor = ph["lr"] * ph.get("min_lr_ratio", 0.1)
    return floor + (ph["lr"] - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def xt_blocks_for(ph: dict, length: int, block_size: int) -> list[int]:
    nb = length // block_size
    last = ph.get("xt_last_blocks", "all")
    return list(range(nb)) if last == "all" else list(range(max(0, nb - int(last)), nb))


def layout_tokens(ph: dict, length: int, block_size: int = 32) -> int:
    """Tokens one sequence costs in the layout: two x_t copies of its x_t blocks + the x_0 prefix."""
    xtb = xt_blocks_for(ph, length, block_size)
    return 2 * len(xtb) * block_size + max(xtb) * block_size


def batches(ph: dict, block_size: int, seed: str, workers: int):
    ds = tiny_data.PhaseBatches(ph, block_size, seed, functools.partial(layout_tokens, block_size=block_size))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    return iter(loader)


def save(model, opt, state: dict, out: str, log: list) -> None:
    import copy

    os.makedirs(out, exist_ok=True)
    ship = copy.deepcopy(model).to(torch.bfloat16)
    # shards under 8 MB: the shipped copy lives in git (mage_ext/assets/tiny_bd)
    ship.save_pretrained(out, safe_serialization=True, max_shard_size="6MB")
    V.save_tokenizer(out)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, 
               os.path.join(out, "train_state.pt"))
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(log, f)


def train(args) -> dict:
    recipe = load_recipe(args.recipe, args.smoke)
    bs = recipe["block_size"]
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(recipe)
    if recipe.get("init") and not args.resume:
        tiny_init.apply(model, recipe["init"])
    model = model.to(dev)
    model.config._attn_implementation = "sdpa"
    opt_cfg = recipe.get("optimizer", {})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=tuple(opt_cfg.get("betas", (0.9, 0.95))),
                            weight_decay=opt_cfg.get("weight_decay", 0.1))
    state = {"phase": 0, "phase_step": 0, "phase_seconds": 0.0, "step": 0}
    log = []
    if args.resume:
        ck = torch.load(os.path.join(args.resume, "train_state.pt"), map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        with open(os.path.join(args.resume, "train_log.json")) as f:
            log = json.load(f)
    mask_id = V.token_to_id()[V.MASK]
    amp = torch.bfloat16 if dev.type == "cuda" else None
    workers = args.workers if args.workers is not None else (6 if dev.type == "cuda" else 0)
    gen = torch.Generator().manual_seed(args.seed * 1000003 + state["step"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params on {dev}; phases {[p['name'] for p in recipe['phases']]}")
    budget = None if args.minutes is None else args.minutes * 60
    t_start = time.time()
    while state["phase"] < len(recipe["phases"]):
        ph = recipe["phases"][state["phase"]]
        share = None if budget is None else ph.get("share", 1.0) * budget
        max_steps = ph.get("max_steps")
        if share is None and max_steps is None:
            raise ValueError(f"phase {ph['name']!r} needs max_steps when --minutes is not given")
        t0 = time.time() - state["phase_seconds"]
        data = batches(ph, bs, f"{args.seed}/{state['phase']}/{state['step']}", workers)
        while True:
            el = time.time() - t0
            prog = max(el / share if share else 0.0,
                       state["phase_step"] / max_steps if max_steps else 0.0)
            if prog >= 1.0:
                break
            length, b = next(data)
            xtb = xt_blocks_for(ph, length, bs)
            n = b["tokens"].shape[0]
            lr = lr_at(ph, prog, state["phase_step"])
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                loss, st = BD.loss(model, b["tokens"], b["weight"], b["force_mask"], b["keep"], xtb, bs,
                                   mask_id, gen, attention=args.attention)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.get("grad_clip", 1.0))
            opt.step()
            state["phase_step"] += 1
            state["step"] += 1
            rec = {"step": state["step"], "phase": ph["name"], "len": length, "batch": n, "lr": lr,
                   "loss": float(loss.detach()), "grad_norm": float(gn), "t": round(time.time() - t_start, 1), **st}
            log.append(rec)
            if state["step"] % ph.get("log_every", 20) == 0 or args.smoke:
                extra = "".join(f" {k} {rec[k]:.3f}" for k in ("answer_ce", "answer_acc") if k in rec)
                print(f"[{rec['t']:7.1f}s] step {state['step']:5d} {ph['name']:>10s} len {length:5d} "
                      f"x{n:3d} lr {lr:.2e} loss {rec['loss']:.3f}{extra}", flush=True)
        del data                                   # stops this phase's workers
        state.update(phase=state["phase"] + 1, phase_step=0, phase_seconds=0.0)
    save(model, opt, state, args.out, log)
    print(f"saved {args.out} after {state['step']} steps, {time.time() - t_start:.0f}s")
    result = {"steps": state["step"], "train_seconds": time.time() - t_start}
    if not args.no_eval:
        ev = recipe["eval"]
        model.eval()
        result["eval"] = tiny_eval.evaluate(model, ev["tasks"], ev["lengths"], ev["samples"], mask_id, bs,
                                            autocast_dtype=amp)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    train(parse_args())
