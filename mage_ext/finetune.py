"""python -m mage_ext.finetune --config cfg.json: MAGE-FT (mage_ext.train.mage_ft).

Exit status: 0 when the run finished, 2 for a bad config or data (one line on stderr, nothing
written), 143 when SIGTERM / SIGINT stopped it (a checkpoint was saved: the same command resumes).
Under ``torchrun --nproc-per-node N`` the run is sharded with FSDP2 (mage_ext/train/sharded.py);
rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from .train.config import ConfigError, FTConfig
    from .train.mage_ft import INTERRUPTED_EXIT, finetune

    p = argparse.ArgumentParser(prog="python -m mage_ext.finetune", description=(
        "MAGE-FT: fine-tune a block-diffusion checkpoint (Fast-dLLM v2 / SDAR / the shipped "
        "tiny model) for MAGE's sparse attention. Config keys: finetune/README.md (MAGE-FT)."))
    p.add_argument("--config", help="JSON config file")
    p.add_argument("--print-defaults", action="store_true",
                   help="print every config key with its default and exit")
    a = p.parse_args(argv)
    if a.print_defaults:
        d = FTConfig(model="<checkpoint dir>", output_dir="<output dir>",
                     data={"jsonl": "<file.jsonl>"}).to_json()
        print(json.dumps(d, indent=1))
        return 0
    if not a.config:
        p.error("--config is required")
    try:
        _init_distributed(a.config)
        result = finetune(a.config)
    except ConfigError as e:
        print(f"mage_ft: error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank:
            return 0 if result["status"] == "done" else INTERRUPTED_EXIT  # rank 0 reports
    if result["status"] == "interrupted":
        print(f"mage_ft: stopped at step {result['step']}; checkpoint saved in "
              f"{result['output_dir']}; run the same command to resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    print(f"mage_ft: done after {result['step']} steps; model: {result['final']}; "
          f"log: {result['log']}")
    return 0


def _init_distributed(config_path) -> None:
    """Under torchrun (any number of processes): the process group for sharded MAGE-FT
    (mage_ext/train/sharded.py), on the device the config names."""
    import torch

    from .cli_common import CliError, init_distributed
    from .train.config import ConfigError, load_config

    cfg = load_config(config_path)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        init_distributed(device, option="config key 'device':", min_world=1)
    except CliError as e:
        raise ConfigError(str(e)) from e


if __name__ == "__main__":
    sys.exit(main())
