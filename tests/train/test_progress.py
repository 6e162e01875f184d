"""Progress that fits in a log file: no carriage-return frames when stderr is not a terminal."""

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

from lrd_dist.train.progress import progress
from tests.conftest import TINY_LRD

REPO = Path(__file__).resolve().parents[2]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_a_file_gets_periodic_lines(caplog) -> None:
    terminal = Terminal()
    assert list(progress(range(5), total=5, desc="epoch 0", stream=terminal)) == list(range(5))
    assert terminal.getvalue().startswith("\repoch 0:")  # a tqdm bar (it redraws only after 0.1 s)

    file = io.StringIO()
    with caplog.at_level(logging.INFO, logger="lrd_dist.train.progress"):
        assert list(progress(range(5), total=5, initial=1, desc="epoch 3", seconds=0, stream=file)) == list(
            range(5)
        )
    assert file.getvalue() == ""  # nothing drawn
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("epoch 3: 2/5 (40%)") and len(lines) == 3  # the last item is not logged


def test_a_training_log_written_to_a_file_has_no_bar_frames(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    overrides = [
        f"data.dir={synth_with_embeddings}",
        f"train.out_dir={tmp_path}",
        *TINY_LRD,
        "train.epochs=1",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrd_dist.cli",
            "train",
            *overrides,
            "train.progress_seconds=0",
            "data.batch_size=64",
        ],
        env=os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr
    assert "lrd_dist.train.progress: epoch 0: 2/" in result.stderr
