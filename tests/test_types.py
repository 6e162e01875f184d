"""The type hints are checked, not decoration: mypy (configured in pyproject.toml) runs clean over
the package."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.launch import REPO


def test_mypy_runs_clean_over_the_package() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(REPO / "pyproject.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout
