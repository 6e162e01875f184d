import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lrd_dist.data.format import MANIFEST, Manifest
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader, worker_progress
from lrd_dist.errors import InputError


def _epoch(directory: Path, split: str = "train", world: int = 1, epoch: int = 0, start: int = 0, **options):
    """Per rank, the list of batches of one epoch."""
    config = LoaderConfig(**({"batch_size": 50, "shuffle_buffer": 300, "max_history": 12} | options))
    out = []
    for rank in range(world):
        stream = SequenceStream(directory, split, config, rank=rank, world_size=world)
        stream.set_position(epoch, start)
        out.append(list(make_loader(stream)))
    return out


def _ids(batches) -> list[tuple[int, int, int]]:
    ids = []
    for batch in batches:
        keep = batch["valid"]
        ids += list(
            zip(
                batch["user"][keep].tolist(),
                batch["target"][keep].tolist(),
                batch["target_time"][keep].tolist(),
                strict=True,
            )
        )
    return ids


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_and_equal_batches(synth_dataset: Path, world: int, workers: int) -> None:
    manifest = Manifest.load(synth_dataset)
    ranks = _epoch(synth_dataset, world=world, num_workers=workers)
    assert len({len(batches) for batches in ranks}) == 1  # DDP never waits on a rank that ran out
    ids = [i for batches in ranks for i in _ids(batches)]
    assert len(ids) == manifest.samples["train"] == len(set(ids))
    padded = sum(int((~b["valid"]).sum()) for batches in ranks for b in batches)
    assert padded < world * max(workers, 1) * 50


def test_epochs_are_shuffled_differently_and_reproducibly(synth_dataset: Path) -> None:
    first = _ids(_epoch(synth_dataset, epoch=0)[0])
    again = _ids(_epoch(synth_dataset, epoch=0)[0])
    second = _ids(_epoch(synth_dataset, epoch=1)[0])
    assert first == again
    assert first != second and sorted(first) == sorted(second)
    unshuffled = _ids(_epoch(synth_dataset, shuffle=False)[0])
    assert unshuffled != first and sorted(unshuffled) == sorted(first)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_continues_with_the_same_batches(synth_dataset: Path, workers: int) -> None:
    full = _epoch(synth_dataset, world=2, epoch=4, num_workers=workers)[1]
    for start in (1, 5, len(full) - 1):
        resumed = _epoch(synth_dataset, world=2, epoch=4, start=start, num_workers=workers)[1]
        assert len(resumed) == len(full) - start
        for expected, got in zip(full[start:], resumed, strict=True):
            assert expected.keys() == got.keys()
            for key in expected:
                assert torch.equal(expected[key], got[key]), key


def test_worker_progress_follows_round_robin() -> None:
    # workers deliver 0,1,2,0,1,2,0,2,0,2,2 when they hold 4, 2 and 5 batches
    order = [0, 1, 2, 0, 1, 2, 0, 2, 0, 2, 2]
    for consumed in range(len(order) + 1):
        taken, following = worker_progress([4, 2, 5], consumed)
        assert taken == [order[:consumed].count(w) for w in range(3)]
        if consumed < len(order):
            assert following == order[consumed]


def test_history_is_cut_to_the_most_recent_items(synth_dataset: Path) -> None:
    long = _epoch(synth_dataset, shuffle=False, max_history=12)[0][0]
    short = _epoch(synth_dataset, shuffle=False, max_history=3)[0][0]
    for row in range(len(long["user"])):
        length = int(long["history_length"][row])
        kept = long["history_items"][row, max(0, length - 3) : length].tolist()
        assert short["history_items"][row].tolist() == kept + [0] * (3 - len(kept))
        assert int(short["history_length"][row]) == min(3, length)


def test_dev_batches_carry_negatives(synth_dataset: Path) -> None:
    batch = _epoch(synth_dataset, "dev", shuffle=False)[0][0]
    assert batch["negatives"].shape == (50, 20)
    assert not (batch["negatives"] == batch["target"][:, None]).any()


def _copy(dataset: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(dataset, target)
    return target


def _truncate_first_train_shard(directory: Path) -> Path:
    shard = directory / Manifest.load(directory).shards_of("train")[0].path
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    return shard


def test_truncated_tar_fails_naming_the_shard(synth_dataset: Path, tmp_path: Path) -> None:
    directory = _copy(synth_dataset, tmp_path)
    shard = _truncate_first_train_shard(directory)
    with pytest.raises(InputError) as caught:
        _epoch(directory, shuffle=False, verify_checksums=False)
    assert shard.name in str(caught.value) and "truncated" in str(caught.value)


def test_truncated_tar_is_skipped_and_counted(synth_dataset: Path, tmp_path: Path, caplog) -> None:
    directory = _copy(synth_dataset, tmp_path)
    manifest = Manifest.load(directory)
    _truncate_first_train_shard(directory)
    with caplog.at_level(logging.WARNING):
        ranks = _epoch(directory, world=2, shuffle=False, verify_checksums=False, on_corrupt="skip")
    assert len(ranks[0]) == len(ranks[1])
    seen = len(_ids(ranks[0])) + len(_ids(ranks[1]))
    dropped = sum(int(m.split("dropped ")[1].split(" ")[0]) for m in caplog.messages if "dropped" in m)
    assert 0 < dropped < manifest.shards_of("train")[0].samples
    assert seen + dropped == manifest.samples["train"]


def test_checksum_mismatch_fails_or_skips(synth_dataset: Path, tmp_path: Path) -> None:
    directory = _copy(synth_dataset, tmp_path)
    raw = json.loads((directory / MANIFEST).read_text())
    raw["shards"][1]["sha256"] = "0" * 64
    (directory / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(InputError, match="sha256 differs"):
        _epoch(directory, shuffle=False)
    ranks = _epoch(directory, shuffle=False, on_corrupt="skip")
    assert len(_ids(ranks[0])) == raw["samples"]["train"] - raw["shards"][1]["samples"]


def test_manifest_of_another_schema_version_is_refused(synth_dataset: Path, tmp_path: Path) -> None:
    directory = _copy(synth_dataset, tmp_path)
    raw = json.loads((directory / MANIFEST).read_text())
    raw["schema_version"] = 99
    (directory / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(InputError, match="schema version 99"):
        SequenceStream(directory, "train", LoaderConfig())


def test_missing_manifest_and_bad_options_are_refused(synth_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no manifest\.json"):
        SequenceStream(tmp_path, "train", LoaderConfig())
    with pytest.raises(InputError, match="max_history"):
        SequenceStream(synth_dataset, "train", LoaderConfig(max_history=500))
    with pytest.raises(InputError, match="on_corrupt"):
        LoaderConfig(on_corrupt="ignore")


def test_blocks_are_decoded_without_pickle(synth_dataset: Path) -> None:
    import io
    import tarfile

    shard = synth_dataset / Manifest.load(synth_dataset).shards_of("train")[0].path
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[0]
        header = tar.extractfile(member).read()
    array = np.lib.format.read_array(io.BytesIO(header), allow_pickle=False)
    assert array.dtype != object and member.name.endswith(".npy")


def test_ids_outside_the_dataset_are_refused_naming_the_shard_and_sample(
    synth_dataset: Path, tmp_path: Path
) -> None:
    """A shard consistent with its manifest's checksums can still name items no catalog has; they
    would reach the model as an IndexError deep in a step."""
    directory = tmp_path / "shrunk"
    shutil.copytree(synth_dataset, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["num_items"] = 10
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        InputError, match=r"test-000000\.tar, sample \d+: (target|history_items|negatives) \d+ is outside"
    ):
        _epoch(directory, split="test", shuffle=False)
