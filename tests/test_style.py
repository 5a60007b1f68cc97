"""House style a reader notices first: every Python line of the project fits in 99 columns
(the team's rule: lines under 100), docstrings and strings included."""
from __future__ import annotations

from pathlib import Path

import raylm

REPO = Path(raylm.__file__).parent.parent
FOLDERS = ("raylm", "kernels", "deployments", "tests", "scripts")
MAX_COLUMNS = 99


def _python_files():
    for folder in FOLDERS:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_lines_fit_in_99_columns():
    files = list(_python_files())
    assert len(files) > 100  # the check sees the whole project
    too_long = [f"{path.relative_to(REPO)}:{n} ({len(line)} columns)"
                for path in files
                for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                if len(line) > MAX_COLUMNS]
    assert too_long == []
