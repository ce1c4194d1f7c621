"""MAGE-FT from the repository checkout: the library function and the CLI of mage_ext.

    python finetune/mage_ft.py --config cfg.json        # = python -m mage_ext.finetune
    from mage_ft import finetune                           # = mage_ext.train.mage_ft.finetune

See finetune/README.md, section "MAGE-FT".
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mage_ext.finetune import main  # noqa: E402
from mage_ext.train.config import ConfigError, FTConfig, load_config  # noqa: E402,F401
from mage_ext.train.mage_ft import finetune  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
