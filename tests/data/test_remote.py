"""Datasets read from a URL: a local HTTP server started by the test serves a prepared dataset;
the stream yields exactly the local samples, two ranks train on it exactly as on the local copy and
resume exactly after a kill, and a damaged shard, a wrong path or an unreachable server are refused
naming the URL."""

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lrd_dist.data.remote import _views, fetch, local_view
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.errors import InputError
from tests.conftest import TINY_LRD
from tests.faults import kill
from tests.helpers import resumes, training_log
from tests.integration.launch import free_port, lrd_launch


@pytest.fixture(scope="module")
def served(synth_with_embeddings: Path, tmp_path_factory: pytest.TempPathFactory):
    """(URL of a copy of the dataset, that copy's directory), served over HTTP on loopback."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(synth_with_embeddings, root / "ds")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/ds"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/manifest.json", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield url, root / "ds"
    server.terminate()
    server.wait(timeout=10)


def _samples(location, split: str) -> list[tuple]:
    stream = SequenceStream(location, split, LoaderConfig(batch_size=64, shuffle=split == "train", seed=3))
    out = []
    for batch in make_loader(stream):
        valid = batch["valid"]
        out += list(zip(batch["user"][valid].tolist(), batch["target"][valid].tolist(), strict=True))
    return out


def test_a_served_dataset_streams_the_local_samples(served, synth_with_embeddings: Path) -> None:
    url, _ = served
    for split in ("train", "dev"):
        assert _samples(url, split) == _samples(synth_with_embeddings, split)
    view = local_view(url)
    assert (view / "manifest.json").read_bytes() == (synth_with_embeddings / "manifest.json").read_bytes()
    assert not list(view.glob("train/*"))  # shards are not copied with the small files


def test_a_pipe_command_reads_the_same_samples(synth_with_embeddings: Path) -> None:
    location = f"pipe:cat {synth_with_embeddings}/{{path}}"
    assert _samples(location, "test") == _samples(synth_with_embeddings, "test")


def test_bad_locations_are_refused_naming_the_url(served, tmp_path: Path) -> None:
    url, copy = served
    with pytest.raises(InputError, match=r"/nothing-here/manifest\.json: HTTP 404"):
        local_view(url.replace("/ds", "/nothing-here"))
    closed = free_port()
    with pytest.raises(InputError, match=rf"127\.0\.0\.1:{closed}/ds/manifest\.json: unreachable"):
        local_view(f"http://127.0.0.1:{closed}/ds")
    damaged_root = tmp_path / "damaged"
    shutil.copytree(copy, damaged_root)
    manifest = json.loads((damaged_root / "manifest.json").read_text())
    shard = damaged_root / manifest["shards"][0]["path"]
    blob = bytearray(shard.read_bytes())
    blob[3000] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(
        InputError, match=r"sha256 of the copy fetched from pipe:cat .* differs from the manifest"
    ):
        _samples(f"pipe:cat {damaged_root}/{{path}}", manifest["shards"][0]["split"])


def test_a_hostile_manifest_served_over_http_is_refused_and_runs_nothing(served, tmp_path: Path) -> None:
    """Shard paths come from a file someone else serves: an absolute path, a ``..`` or shell words
    are refused naming the manifest and the shard, before anything is fetched or run."""
    url, copy = served
    marker = tmp_path / "pwned"
    original = (copy / "manifest.json").read_text()
    try:
        for hostile in ("/etc/passwd", "../../../etc/passwd", f"x; touch {marker}", "train/$(touch x)"):
            manifest = json.loads(original)
            manifest["shards"][0]["path"] = hostile
            (copy / "manifest.json").write_text(json.dumps(manifest))
            for location in (url, f"pipe:curl -s -f -L {url}/{{path}}"):
                _views.clear()
                with pytest.raises(InputError, match=r"manifest\.json, shard 1: path .* is not a relative"):
                    _samples(location, manifest["shards"][0]["split"])
        assert not marker.exists()
        # and where the path is fine, the command still gets it as one argument: a space stays in it
        with pytest.raises(InputError, match=r"is not a relative path inside the dataset"):
            fetch(f"pipe:touch {marker}", "a b", tmp_path / "out")
        assert not marker.exists()
    finally:
        (copy / "manifest.json").write_text(original)
        _views.clear()


@pytest.mark.slow
def test_two_ranks_train_on_served_data_as_on_the_local_copy_and_resume_exactly(
    served, synth_with_embeddings: Path, tmp_path: Path
) -> None:
    url, _ = served

    def command(data, out, *extra):
        return [
            "train",
            f"data.dir={data}",
            f"train.out_dir={out}",
            "data.batch_size=32",
            *TINY_LRD,
            "train.epochs=1",
            "checkpoint.every_steps=3",
            *extra,
        ]

    def log(run: Path) -> list[dict]:
        entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in e.items() if k not in ("epoch_seconds", "samples_per_s")} for e in entries]

    local, remote, killed = tmp_path / "local", tmp_path / "remote", tmp_path / "killed"
    for data, out in ((synth_with_embeddings, local), (url, remote)):
        result = lrd_launch("cpu_2proc", *command(data, out))
        assert result.returncode == 0, result.stderr[-3000:]
    assert log(remote) == log(local)
    results = [json.loads((run / "results.json").read_text())["test"] for run in (local, remote)]
    assert results[0] == results[1] and results[0]["examples"] == 301  # every user once
    fault, env = kill(step=5, rank=1)
    assert lrd_launch("cpu_2proc", *command(url, killed, *fault), env=env).returncode != 0
    resumed = lrd_launch("cpu_2proc", *command(url, killed, "checkpoint.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumes(killed) and resumes(killed)[0].startswith("step-")
    assert training_log(log(killed)) == log(local)
