"""``python -m mage_ext.generate``: the command line of mage_ext/cli.py (``generate_main``).

The package never imports this module, so runpy runs it without a double-import warning and the
name ``mage_ext.generate`` stays the function (mage_ext/generation.py).
"""
from mage_ext.cli import generate_main

if __name__ == "__main__":
    generate_main()
