"""docs/errors.md lists every case of the user-surface error tests (generate's arguments, broken
checkpoint directories), so the table cannot fall behind the tests."""
from pathlib import Path

from test_checkpoint import LOAD_ERRORS
from test_generate import BAD_GENERATE_ARGS

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def test_every_error_case_is_in_the_table():
    rows = {line.split("|")[1].strip() for line in DOC.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| ---")}
    missing = [c for c in list(BAD_GENERATE_ARGS) + [c[0] for c in LOAD_ERRORS] if c not in rows]
    assert not missing, f"docs/errors.md lacks rows for {missing}"
