"""docs/environment.md names every MAGE_* environment variable the library's code reads, so a new
switch cannot go undocumented."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READS = re.compile(r'(?:getenv|environ(?:\.get)?|env_flag|env_is|env_set)\(?\[?\s*"(MAGE_[A-Z0-9_]+)"')


def switches_read():
    names = set()
    for pattern in ("csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh",
                    "mage_ext/**/*.py", "setup.py"):
        for path in ROOT.glob(pattern):
            names.update(READS.findall(path.read_text(errors="replace")))
    return names


def test_every_switch_is_documented():
    doc = (ROOT / "docs" / "environment.md").read_text()
    names = switches_read()
    assert "MAGE_BLOCK_ATTENTION_KERNEL" in names and "MAGE_FORCE_CPU" in names  # the scan works
    missing = sorted(n for n in names if f"`{n}" not in doc)
    assert not missing, f"docs/environment.md does not name {missing}"
