"""The main job: the project's own block-diffusion model answers a long passkey prompt, once with
exact attention and once with MAGE, on CPU (or GPU).

    python examples/needle_demo.py [--length 8192] [--k 512] [--task passkey] [--model DIR]

Prints both answers, whether they agree with each other and with the truth, the share of the KV
cache MAGE read at its later denoising steps, and the times. The model (4.6M parameters, shipped
in mage_ext/assets/tiny_bd) was trained by finetune/train_tiny.py; see finetune/README.md.
"""
import argparse
import time
from pathlib import Path

import torch

import mage_ext
from mage_ext.eval import tasks, vocab

DEFAULT_MODEL = Path(mage_ext.__file__).parent / "assets" / "tiny_bd"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--task", default="passkey", choices=tasks.TASKS)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--depth", type=float, default=0.35)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    lm = mage_ext.load_model(a.model, device=a.device)
    s = tasks.make_sample(a.task, a.length, seed=a.seed, depth=a.depth, block_size=lm.block_size)
    print(f"model {a.model}: {sum(x.numel() for x in lm.model.parameters()) / 1e6:.1f}M params; "
          f"{a.task} prompt of {len(s.prompt)} tokens, needle at depth {a.depth:.0%}")
    print(f"question: ... {vocab.decode(s.prefix)}   (truth: {vocab.decode(s.answer)})")
    answers = {}
    for name, policy in (("exact", mage_ext.PolicyConfig(method="exact")),
                         (f"MAGE k={a.k}", mage_ext.PolicyConfig(method="mage", k=a.k))):
        t0 = time.perf_counter()
        res = mage_ext.generate(lm, input_ids=[s.prompt], policy=policy,
                                max_new_tokens=lm.block_size - len(s.prefix), progress=False)
        wall = time.perf_counter() - t0
        ids = res.token_ids[0]
        answers[name] = ids
        first, later = res.median_step_time(True), res.median_step_time(False)
        print(f"{name:12} answer: {vocab.decode(ids[:len(s.answer)]):24} "
              f"score {tasks.score(s, ids):.2f}  KV read (all layers and steps) {res.kv_fraction:6.1%}  "
              f"total {wall:5.2f}s, step first {1e3 * (first or 0):6.1f} ms / later "
              f"{1e3 * (later or 0):6.1f} ms")
    same = list(answers.values())[0][:len(s.answer)] == list(answers.values())[1][:len(s.answer)]
    print(f"exact and MAGE answers agree: {same}")


if __name__ == "__main__":
    main()
