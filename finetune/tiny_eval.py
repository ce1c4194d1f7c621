"""Quick exact-attention answer accuracy of a tiny block-diffusion model (teacher-forced, one block).

The answer block holds the question prefix (unmasked), then the answer; answer token k is predicted
with the gold tokens before it revealed and everything after it masked -- one denoising step per
answer token. `window=1` is the control: the answer block sees only itself and the last context
block, so the lookup cannot happen and accuracy must fall to chance.
"""
from __future__ import annotations

import torch

from mage_ext.eval import tasks as T

import bd_objective as BD


@torch.no_grad()
def answer_accuracy(model, task: str, length: int, n: int, mask_id: int, block_size: int = 32,
                    window: int | None = None, batch_size: int = 16, seed0: int = 1_000_000,
                    autocast_dtype=None) -> float:
    device = next(model.parameters()).device
    samples = [T.make_sample(task, length, seed0 + i, depth=(i + 0.5) / n, block_size=block_size)
               for i in range(n)]
    nb = length // block_size
    entries, n_x0 = [nb - 1], length - block_size
    mask = BD.attention_mask(entries, block_size, n_x0, window, device)
    _, _, pos = BD.layout(entries, block_size, n_x0)
    src = BD.shift_sources(entries, block_size)
    total = 0.0
    for c in range(0, n, batch_size):
        chunk = samples[c:c + batch_size]
        n_pre, n_ans = len(chunk[0].prefix), len(chunk[0].answer)
        ctx = torch.tensor([s.context for s in chunk])
        ans = torch.tensor([s.answer for s in chunk])
        block = torch.full((len(chunk), block_size), mask_id)
        block[:, :n_pre] = torch.tensor([s.prefix for s in chunk])
        pred = torch.empty_like(ans)
        for k in range(n_ans):
            block[:, n_pre:n_pre + k] = ans[:, :k]               # teacher forcing
            ids = torch.cat([block, ctx], dim=1).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                h = BD.hidden_states(model, ids, mask, pos.to(device))
                logits = model.lm_head(h[:, src[n_pre + k]])
            pred[:, k] = logits.argmax(-1).cpu()
        total += sum(T.score(s, p.tolist()) for s, p in zip(chunk, pred))
    return total / n


def evaluate(model, tasks, lengths, n, mask_id, block_size=32, batch_tokens=65536, autocast_dtype=None,
             log=print) -> dict:
    """{task: {length: {"exact": acc, "control": acc}}} with the control of the module docstring."""
    out = {}
    for task in tasks:
        out[task] = {}
        for length in lengths:
            bs = max(1, batch_tokens // length)
            kw = dict(mask_id=mask_id, block_size=block_size, batch_size=bs, autocast_dtype=autocast_dtype)
            exact = answer_accuracy(model, task, length, n, **kw)
            control = answer_accuracy(model, task, length, n, window=1, **kw)
            out[task][length] = {"exact": exact, "control": control}
            log(f"eval {task:22s} len {length:6d}: exact {exact:6.1%}  control {control:6.1%}")
    return out
