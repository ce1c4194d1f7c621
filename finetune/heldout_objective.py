"""What MAGE-FT optimises, measured on held-out batches: the block-diffusion CE of the sparse
student and KL(p_sparse || p_exact) per masked token, plus the selection's recall, for one or
more checkpoints on the same batches and noise (no gradients).

    python finetune/heldout_objective.py MODEL_DIR [MODEL_DIR ...] --k 64 --dense-layers 0 \
        --seq-len 2048 --batches 8 --out runs/heldout.json

The batches come from the synthetic tasks (the project's tiny vocabulary) under a seed the
fine-tuning runs do not use, so a before / after comparison reads the same data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mage_ext import load_model  # noqa: E402
from mage_ext.train.data import SyntheticSource  # noqa: E402
from mage_ext.train.objective import MageFTObjective, mage_ft_loss  # noqa: E402

MIX = {"niah_multivalue": 1, "niah_multikey": 1, "niah_single": 1, "passkey": 1, "filler": 1}


def measure(model_dir: str, a) -> dict:
    lm = load_model(model_dir, dtype=torch.float32, device="cpu")
    obj = MageFTObjective(block_size=lm.block_size, mask_id=lm.mask_id, k=a.k,
                          dense_layers=a.dense_layers, lam=1.0)
    source = SyntheticSource(MIX, a.seq_len, lm.block_size, seed=a.seed,
                             vocab_size=lm.model.config.vocab_size, mask_id=lm.mask_id)
    lm.model.eval()
    sums = {"ce": 0.0, "kl": 0.0, "set_recall": 0.0, "mass_recall": 0.0}
    for i in range(a.batches):
        batch = source.next_batch(1)
        gen = torch.Generator().manual_seed(a.seed * 1000 + i)  # the same noise for every model
        with torch.no_grad():
            _, stats = mage_ft_loss(lm.model, batch["tokens"], batch["weight"],
                                    batch["force_mask"], batch["keep"], obj, gen)
        for key in sums:
            sums[key] += stats[key] / a.batches
    return {"model": model_dir, **sums}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", metavar="MODEL_DIR")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dense-layers", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=12345, help="data and noise seed (held out)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, metavar="FILE")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = [measure(m, a) for m in a.models]
    print("| model | CE (sparse student) | KL(sparse || exact) / token | set recall | mass recall |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ce']:.4f} | {r['kl']:.4f} | {r['set_recall']:.3f} | "
              f"{r['mass_recall']:.3f} |")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"config": {k: v for k, v in vars(a).items() if k != "out"},
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
