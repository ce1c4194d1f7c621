"""The package layout keeps its promises: the ops import without transformers, the core imports
neither transformers nor the evaluation package, every core module imports on its own (no import
cycle), and ``python -m mage_ext.generate`` starts without runpy's double-import warning."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORE = ["mage_ext.core.policy", "mage_ext.core.cache", "mage_ext.core.loop",
        "mage_ext.core.decoding", "mage_ext.core.graphs", "mage_ext.core.traffic",
        "mage_ext.core.selectors", "mage_ext.core.selectors.base",
        "mage_ext.core.selectors.common", "mage_ext.core.selectors.mage",
        "mage_ext.core.selectors.quest", "mage_ext.core.selectors.tidal",
        "mage_ext.core.selectors.sparsed", "mage_ext.core.selectors.window"]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_ops_alone_do_not_import_transformers():
    r = _python("import sys, mage_ext, torch\n"
                "mage_ext.ops.dense_attention  # the ops are there\n"
                "print('transformers' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_core_imports_neither_transformers_nor_eval():
    r = _python(f"import sys, importlib\nfor m in {CORE!r}: importlib.import_module(m)\n"
                "print(sorted(m for m in sys.modules if m == 'transformers' "
                "or m.startswith('mage_ext.eval') or m.startswith('mage_ext.hf')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"the core pulled in {r.stdout.strip()}"


@pytest.mark.parametrize("module", ["mage_ext.core.selectors.common", "mage_ext.core.cache"])
def test_no_import_cycle(module):
    """Modules that once sat in a cycle (selectors/base <-> common) import first on their own."""
    r = _python(f"import importlib; importlib.import_module('{module}')")
    assert r.returncode == 0, r.stderr


def test_generate_cli_starts_without_runpy_warning():
    r = subprocess.run([sys.executable, "-m", "mage_ext.generate", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--model" in r.stdout
    assert "RuntimeWarning" not in r.stderr, r.stderr


def test_generate_stays_the_function_after_the_cli_is_imported():
    import mage_ext
    import mage_ext.cli  # noqa: F401
    assert callable(mage_ext.generate) and mage_ext.generate.__module__ == "mage_ext.generation"
