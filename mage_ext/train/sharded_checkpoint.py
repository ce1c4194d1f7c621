"""Checkpoints of a sharded (FSDP2) MAGE-FT run: torch.distributed.checkpoint (DCP).

``output_dir/checkpoint/`` holds the DCP shards of the trainable weights and the optimizer
(get_state_dict: keyed by parameter name, so a checkpoint loads on any number of ranks) and
``meta.pt`` (step, config, scheduler, generators, data position: the same on every rank, written
by rank 0). Every rank writes into ``checkpoint.tmp`` and rank 0 swaps it in by renames once all
have finished, so an interruption leaves the previous checkpoint whole. The output directory must
be on a file system every rank sees.
"""
from __future__ import annotations

import os
import shutil

import torch

from .checkpoint import swap_in

DIRNAME = "checkpoint"
META = "meta.pt"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: the frozen base is the model the config names; only what trains is saved
    return StateDictOptions(ignore_frozen_params=True, **kw)


def save(path: str, root, opt, meta: dict, ranks) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = f"{path}.tmp"
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    ranks.barrier()
    model_sd, optim_sd = get_state_dict(root, opt, options=_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    if ranks.main:
        torch.save(meta, os.path.join(tmp, META))
        swap_in(tmp, path)
    ranks.barrier()


def read_meta(path: str) -> dict:
    return torch.load(os.path.join(path, META), map_location="cpu", weights_only=False)


def load(path: str, root, opt) -> None:
    """Loads the trainable weights and the optimizer state into the (sharded) ``root``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(root, opt, options=_options())
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(root, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))


def full_model_state(root) -> dict:
    """The whole (unsharded) model state on rank 0's CPU ({} elsewhere); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(root, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))
