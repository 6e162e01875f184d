"""The repository as a product: pages whose links lead somewhere, and no run state or large
generated artifact committed (a clone downloads every byte of it)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.launch import REPO

MAX_TRACKED_BYTES = 1_000_000
# [text](target) in Markdown, leaving out images' alt text handling (the same syntax after "!")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [REPO / name for name in listed.split("\0") if name]


def _pages() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").rglob("*.md")),
        *sorted((REPO / "experiments").rglob("*.md")),
    ]


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_no_tracked_file_is_over_a_megabyte() -> None:
    large = [
        f"{path.relative_to(REPO)} ({path.stat().st_size:,} bytes)"
        for path in _tracked()
        if path.is_file() and path.stat().st_size > MAX_TRACKED_BYTES
    ]
    assert not large, f"tracked files over {MAX_TRACKED_BYTES:,} bytes: {large}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_of_a_page_resolves(page: Path) -> None:
    broken = []
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve()
            if not resolved.exists():
                broken.append(f"line {number}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"line {number}: {target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors
