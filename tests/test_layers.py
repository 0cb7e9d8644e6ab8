"""The codebase's shape, checked so that a later change cannot undo it: the layers only point down (the
import-linter contracts in pyproject.toml), a job's status is written in one module, and every error code is one
of ErrorCode's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*sorted((ROOT / "app").rglob("*.py")), *sorted((ROOT / "worker").rglob("*.py"))]


def test_the_import_contracts_hold() -> None:
    """Entry points -> domains -> library (app.ml: no web, database or queue package) -> core. In a process of its
    own: import-linter's command configures logging (disabling every logger the tests' process has)."""
    done = subprocess.run(
        [Path(sys.prefix) / "bin" / "lint-imports", "--config", ROOT / "pyproject.toml", "--no-cache"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_only_the_state_machine_writes_a_jobs_status() -> None:
    writes = re.compile(r"\bstatus\s*=(?!=)\s*JobStatus\.|\bjob\.status\s*=(?!=)|values\([^)]*\bstatus\s*=(?!=)", re.S)
    offenders = [
        str(path.relative_to(ROOT))
        for path in SOURCES
        if path != ROOT / "app/jobs/state.py" and "Job" in path.read_text() and writes.search(path.read_text())
    ]
    assert offenders == []


def test_error_codes_are_the_enums_not_free_strings() -> None:
    free = re.compile(r"""\bcode\s*=\s*["']|LineIssue\(\s*["']""")
    offenders = [str(path.relative_to(ROOT)) for path in SOURCES if free.search(path.read_text())]
    assert offenders == []
