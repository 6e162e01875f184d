"""Datasets that live elsewhere: ``data.dir`` as an ``http(s)://`` location, an fsspec URL
(``s3://``, ``gs://``, ...) or a command (``pipe:...``).

The small files (manifest, catalog, users, the embedding table) are fetched once per process into a
local *view* directory; the shards are not. ``SequenceStream`` reads the view's ``REMOTE`` file and
fetches each shard it needs, one at a time, into a temporary file, checks its sha256 against the
manifest, reads it and deletes it: every rank and worker fetches only the shards of its own range,
and the splitting, exactly-once and resume rules are those of local data.

A ``pipe:`` location is a command with ``{path}`` where the relative path of a file goes, whose
standard output is the file, e.g. ``pipe:curl -s -f -L https://host/ds/{path}`` or
``pipe:aws s3 cp s3://bucket/ds/{path} -``. fsspec URLs need the filesystem's package (s3fs, gcsfs).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from lrd_dist.data.format import is_inside
from lrd_dist.errors import InputError

log = logging.getLogger(__name__)
REMOTE = "REMOTE"  # in a local view: the location its shards are fetched from
SMALL_FILES = (
    "manifest.json",
    "catalog.parquet",
    "users.parquet",
    "item_embeddings.safetensors",
    "planted_pairs.parquet",
    "cold_items.parquet",
)
REQUIRED = ("manifest.json", "catalog.parquet")
_views: dict[str, Path] = {}


def is_remote(location: str | Path) -> bool:
    text = str(location)
    return text.startswith("pipe:") or ("://" in text and not text.startswith("file://"))


class TransientFetchError(InputError):
    """A remote location that stalled, trickled or dropped the connection on every attempt: not a
    bad input but a bad moment. ``lrd-dist`` exits with the requeue code on it (75), so a scheduler
    runs the job again and it resumes from its last checkpoint."""


FETCH_ATTEMPTS = 4  # a fetch and its retries
FETCH_RETRIES = {"count": 0}  # retries in this process (logged each time)
BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0)  # before the 1st, 2nd, ... retry


def fetch(
    location: str,
    relative: str,
    destination: Path,
    deadline: float = 120.0,
    attempts: int = FETCH_ATTEMPTS,
) -> Path:
    """Copy ``location/relative`` to ``destination`` within ``deadline`` seconds per attempt.
    Transient failures (timeouts, a stalled or trickling stream, dropped connections, HTTP 5xx and
    429, a ``pipe:`` command that overruns) are retried with backoff (1, 2, 4 s); after the last
    attempt a ``TransientFetchError``. Wrong locations (HTTP 4xx, a refused connection, missing
    files, a command that fails) are an ``InputError`` at once."""
    if not is_inside(relative):  # a manifest's shard path is checked when it is loaded; this is the last door
        raise InputError(location, f"{relative!r} is not a relative path inside the dataset", "re-prepare it")
    url = f"{location.rstrip('/')}/{relative}" if not location.startswith("pipe:") else location
    partial = destination.with_name(destination.name + ".partial")
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(location, relative, url, partial, deadline)
            partial.replace(destination)
            return destination
        except _Transient as exc:
            partial.unlink(missing_ok=True)
            if attempt == attempts:
                raise TransientFetchError(
                    url,
                    f"{exc} (after {attempts} attempts)",
                    "check the server and the network; the job exits 75 so a scheduler requeues it",
                ) from exc
            FETCH_RETRIES["count"] += 1
            wait = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS)) - 1]
            log.warning("fetch %s: %s; retry %d of %d in %.0f s", url, exc, attempt, attempts - 1, wait)
            time.sleep(wait)
        except InputError:
            partial.unlink(missing_ok=True)
            raise
    raise AssertionError("unreachable")


class _Transient(Exception):
    pass


def _fetch_once(location: str, relative: str, url: str, partial: Path, deadline: float) -> None:
    end = time.monotonic() + deadline
    if location.startswith("pipe:"):
        # split first, then put the path in: it is one argument, never words of the command
        argv = [word.replace("{path}", relative) for word in shlex.split(location[len("pipe:") :])]
        try:
            with open(partial, "wb") as out:
                done = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, timeout=deadline)
        except subprocess.TimeoutExpired as exc:
            raise _Transient(f"the command ran past the {deadline:.0f} s read deadline") from exc
        except FileNotFoundError as exc:
            raise InputError(shlex.join(argv), "no such program", "check data.dir=pipe:...") from exc
        if done.returncode != 0:  # a command's failure cannot be told transient: said, not retried
            raise InputError(
                shlex.join(argv),
                f"exited with {done.returncode} ({done.stderr.decode(errors='replace').strip()[:200]})",
                "check the command and the location (data.dir=pipe:... with {path})",
            )
        return
    if not url.startswith(("http://", "https://")):
        _fsspec_copy(url, partial)
        return
    try:
        with urllib.request.urlopen(url, timeout=min(deadline, 30.0)) as response, open(partial, "wb") as out:
            while block := response.read1(
                1 << 20
            ):  # what has arrived: a trickle cannot block past the deadline
                out.write(block)
                if time.monotonic() > end:
                    raise _Transient(f"no complete file within the {deadline:.0f} s read deadline")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise InputError(
            url, f"HTTP {exc.code} {exc.reason}", "check the URL: data.dir must be the dataset directory"
        ) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(exc, urllib.error.URLError) and isinstance(reason, ConnectionRefusedError):
            raise InputError(
                url, f"unreachable ({reason})", "check the host, the port and the network"
            ) from exc
        raise _Transient(f"unreachable or interrupted ({reason})") from exc


def _fsspec_copy(url: str, destination: Path) -> None:
    try:
        import fsspec

        with fsspec.open(url, "rb") as source, open(destination, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    except ImportError as exc:
        raise InputError(
            url, f"no filesystem for this URL ({exc})", "pip install the fsspec backend (s3fs, gcsfs, ...)"
        ) from exc
    except FileNotFoundError as exc:
        raise InputError(url, "not found", "check the URL: data.dir must be the dataset directory") from exc


def local_view(location: str | Path) -> Path:
    """The directory to read a dataset from: ``location`` itself when local, else a local view
    of its small files (fetched once per process), whose shards are fetched on demand."""
    if not is_remote(location):
        return Path(location)
    key = str(location)
    if key in _views:
        return _views[key]
    view = Path(tempfile.mkdtemp(prefix="lrd-dist-remote-"))
    for name in SMALL_FILES:
        try:
            fetch(key, name, view / name)
        except InputError:
            if name in REQUIRED:
                shutil.rmtree(view, ignore_errors=True)
                raise
    (view / REMOTE).write_text(key)
    log.info(
        "dataset %s: manifest and catalog fetched into %s; shards are fetched as they are read", key, view
    )
    _views[key] = view
    return view


def remote_of(directory: Path) -> str | None:
    marker = Path(directory) / REMOTE
    return marker.read_text() if marker.is_file() else None


class FetchedShard:
    """A remote shard in a temporary file while it is read, checked against its sha256."""

    def __init__(self, location: str, relative: str, sha256: str, deadline: float = 120.0) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="lrd-dist-shard-"))
        self.path = fetch(location, relative, self.directory / Path(relative).name, deadline)
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        self.matches = digest.hexdigest() == sha256

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __del__(self) -> None:  # a reader that stops early (resume, max_steps) still cleans up
        if os.path.isdir(getattr(self, "directory", "")):
            self.close()
