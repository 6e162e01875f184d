"""Datasets read from a URL: a local HTTP server started by the test serves a prepared dataset;
the stream yields exactly the local samples, two ranks train on it exactly as on the local copy and
resume exactly after a kill, and a damaged shard, a wrong path or an unreachable server are refused
naming the URL."""

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
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


class _SlowHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a dataset directory, but its shards stall (half sent, then nothing) or trickle."""

    mode = "stall"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if not self.path.endswith(".tar"):
            return super().do_GET()
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if self.mode == "stall":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(30)
            else:  # trickle: a few bytes at a time, never idle long enough for a socket timeout
                for start in range(0, len(body), 16):
                    self.wfile.write(body[start : start + 16])
                    self.wfile.flush()
                    time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.mark.parametrize("mode", ["stall", "trickle"])
def test_a_stalled_or_trickling_server_is_retried_then_the_job_exits_for_a_requeue(
    synth_with_embeddings: Path, tmp_path: Path, mode: str, monkeypatch
) -> None:
    from lrd_dist.cli import main
    from lrd_dist.data import remote

    monkeypatch.setattr(remote, "BACKOFF_SECONDS", (0.0,))  # no waiting between the retries here
    handler = functools.partial(_SlowHandler, directory=str(synth_with_embeddings.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    _SlowHandler.mode = mode
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{synth_with_embeddings.name}"
        shard = json.loads((synth_with_embeddings / "manifest.json").read_text())["shards"][0]["path"]
        before = remote.FETCH_RETRIES["count"]
        started = time.monotonic()
        with pytest.raises(remote.TransientFetchError, match=r"(deadline|timed out\)) \(after 3 attempts\)"):
            fetch(url, shard, tmp_path / "shard.tar", deadline=1.0, attempts=3)
        assert remote.FETCH_RETRIES["count"] - before == 2 and time.monotonic() - started < 20
        _views.clear()
        command = [
            "train",
            f"data.dir={url}",
            f"train.out_dir={tmp_path / 'run'}",
            "data.read_timeout_s=1",
            *TINY_LRD,
            "train.max_steps=2",
        ]
        assert main(command) == 75  # requeue: the data will be there again
    finally:
        server.shutdown()
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
