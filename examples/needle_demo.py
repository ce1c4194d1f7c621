"""The main job: the project's own block-diffusion model finds a pass key hidden in a long prompt,
once with exact attention and once with MAGE, on the CPU (or a GPU).

    python examples/needle_demo.py [--length 8192] [--k 512] [--task passkey] [--model DIR]

The prompt is prefilled once and decoded by both policies (the prefill is the same for every
policy). Progress goes to stderr; stdout gets the answers, then one line each on what MAGE read
and how long its steps took. The model (4.96M parameters, shipped in mage_ext/assets/tiny_bd)
was trained by finetune/train_tiny.py; see finetune/README.md.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

import mage_ext
from mage_ext.cli_common import PrefillProgress, StatusLine, positive_int, unit_interval
from mage_ext.eval import tasks, vocab

DEFAULT_MODEL = Path(mage_ext.__file__).parent / "assets" / "tiny_bd"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--task", default="passkey", choices=tasks.TASKS)
    p.add_argument("--length", type=positive_int, default=8192, help="prompt tokens")
    p.add_argument("--depth", type=unit_interval, default=0.35, help="needle depth in [0, 1]")
    p.add_argument("--k", type=positive_int, default=512, help="MAGE's budget")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available()
                   and mage_ext.cuda_kernels_built() else "cpu")
    a = p.parse_args()
    status = StatusLine()
    t_start = time.perf_counter()
    status.update("loading the model", force=True)
    lm = mage_ext.load_model(a.model, device=a.device)
    status.clear()
    cfg = lm.model.config
    try:
        s = tasks.make_sample(a.task, a.length, seed=a.seed, depth=a.depth,
                              block_size=lm.block_size)
    except ValueError as e:
        sys.exit(f"needle_demo: --length {a.length}: {e}")
    n_params = sum(x.numel() for x in lm.model.parameters()) / 1e6
    print(f"model: {os.path.relpath(a.model)} ({n_params:.2f}M parameters, {cfg.num_hidden_layers} layers), "
          f"{a.device}, float32")
    print(f"prompt: {a.task} task, {len(s.prompt)} tokens, the needle {a.depth:.0%} deep; it ends "
          f"with the question \"{vocab.decode(s.prefix)}\" (truth: {vocab.decode(s.answer)})")

    runs = [("exact attention", mage_ext.PolicyConfig(method="exact")),
            (f"MAGE k={a.k}", mage_ext.PolicyConfig(method="mage", k=a.k))]
    results, prefix = {}, None
    n_ctx = len(s.prompt) // lm.block_size * lm.block_size
    for i, (name, policy) in enumerate(runs):
        label = f"[{i + 1}/{len(runs)}] {name}"
        with PrefillProgress(lm.model, status, 0 if prefix else len(s.prompt), lm.block_size,
                             label=label + ("" if prefix else " (its prefill serves both runs)")):
            t0 = time.perf_counter()
            res = mage_ext.generate(lm, input_ids=[s.prompt], policy=policy, prefix=prefix,
                                    keep_prefix=prefix is None,
                                    max_new_tokens=lm.block_size - len(s.prefix))
            wall = time.perf_counter() - t0
        prefix = prefix or res.prefix
        results[name] = res
        status.done(f"{label}: done in {wall:.1f}s")

    exact, mage = results.values()
    n = len(s.answer)
    agree = exact.token_ids[0][:n] == mage.token_ids[0][:n]
    for name, res in results.items():
        ok = tasks.score(s, res.token_ids[0])
        print(f"answer, {name + ':':18} {vocab.decode(res.token_ids[0][:n]):10} "
              f"({'correct' if ok == 1.0 else 'wrong' if ok == 0 else f'score {ok:.2f}'}"
              f"{'; same as exact' if name != runs[0][0] and agree else ''})")
    dense = min(mage_ext.PolicyConfig().dense_layers, cfg.num_hidden_layers)
    print(f"KV read: MAGE read {mage.kv_fraction:.1%} of the cache entries exact attention read "
          f"(all {cfg.num_hidden_layers} layers, every step and the commit; layers 0-{dense - 1} "
          f"stay dense, the others read {a.k} of {n_ctx} entries per KV head after the first "
          f"step)")
    ms = lambda t: "n/a" if t is None else f"{t * 1e3:.1f} ms"  # noqa: E731
    t_exact, t_later = exact.median_step_time(False), mage.median_step_time(False)
    gain = ""
    if t_exact and t_later:
        gain = (f": {t_exact / t_later:.1f}x faster than exact" if t_later < t_exact
                else ": no faster than exact at this length")
    print(f"step time (median): exact {ms(t_exact)}; MAGE first step "
          f"{ms(mage.median_step_time(True))} (exact attention + top-k selection), later steps "
          f"{ms(t_later)} (sparse{gain})")
    if a.device == "cpu":
        print("note: these times are from the CPU (torch's CPU kernels, float32, a 4-layer "
              "model): they show the mechanism, not GPU speed; README.md has the H200 numbers")
    status.done(f"total {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
