"""Under CI=true a skip is a failure unless tests/conftest.py allows it with a reason: a missing test
dependency or compiler cannot turn the suite green by skipping what it cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.integration.launch import REPO


def _run(directory: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(REPO)}
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_skip_fails_under_ci_and_is_reported_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_runtest_makereport  # noqa: F401\n"
    )
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n\n\ndef test_needs_a_package():\n    pytest.importorskip('no_such_package_here')\n"
    )
    local = _run(tmp_path, ci=False)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout
    ci = _run(tmp_path, ci=True)
    assert ci.returncode == 1 and "skipped under CI=true" in ci.stdout, ci.stdout


def test_an_allowed_name_skipping_for_another_reason_still_fails_under_ci(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_runtest_makereport  # noqa: F401\n"
    )
    (tmp_path / "test_office_probe.py").write_text(
        "import pytest\n\n\ndef test_office_needs_a_package():\n"
        "    pytest.importorskip('no_such_package_here')\n"
    )
    ci = _run(tmp_path, ci=True)
    assert ci.returncode == 1 and "skipped under CI=true" in ci.stdout, ci.stdout


def test_a_module_skipped_at_import_fails_under_ci(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_make_collect_report  # noqa: F401\n"
    )
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n\npytest.importorskip('no_such_package_here')\n\n\ndef test_x():\n    pass\n"
    )
    local = _run(tmp_path, ci=False)  # exit 5 there: the skipped module leaves no test
    assert "1 skipped" in local.stdout and "failed" not in local.stdout, local.stdout
    ci = _run(tmp_path, ci=True)
    assert ci.returncode != 0 and "module skipped under CI=true" in ci.stdout, ci.stdout
