"""Files of a MAGE-FT run, written so that an interruption never leaves one half-written.

Files go to a temporary name in the same directory and are moved over the old one with
os.replace (atomic on POSIX); a directory (the final model) is built under a temporary name and
swapped in by two renames, so it is either the old one, absent for an instant, or the new one.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    _fsync(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(path: str, build) -> None:
    """Calls build(tmp_dir) and swaps the result in at ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, path)


def swap_in(tmp: str, path: str) -> None:
    """Moves the finished directory ``tmp`` to ``path`` by two renames (the old one, if any, is
    removed after)."""
    old = f"{path}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def saved_dtype(source_dir: str, default=torch.float32) -> torch.dtype:
    """The dtype config.json of ``source_dir`` declares for its weights ("dtype" / "torch_dtype")."""
    try:
        with open(os.path.join(source_dir, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return default
    name = raw.get("dtype") or raw.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else default


def export_model(model, source_dir: str, out_dir: str, dtype: torch.dtype) -> None:
    """A checkpoint directory that mage_ext.load_model reads: ``model``'s weights (a plain
    transformers causal LM: merged, no adapters) in ``dtype`` as model.safetensors, and every
    non-weight file of ``source_dir`` (config.json, tokenizer, generation config) copied."""
    from safetensors.torch import save_file

    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {name: t.detach().to("cpu", dtype).contiguous()
             for name, t in model.state_dict().items()
             if not (tied and name == "lm_head.weight") and t.is_floating_point()}

    def build(tmp):
        for name in os.listdir(source_dir):
            src = os.path.join(source_dir, name)
            if (os.path.isfile(src) and not name.endswith(_SKIP_SUFFIXES)
                    and name != "model.safetensors.index.json"):
                shutil.copy2(src, os.path.join(tmp, name))
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})

    replace_dir(out_dir, build)
