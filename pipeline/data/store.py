"""Where a dataset's files live: local paths, ``file://``, ``s3://``, ``gs://`` (any URI
``pyarrow.fs.FileSystem.from_uri`` takes; S3 honours ``AWS_ENDPOINT_URL``) and, for shards,
``pipe:<command>`` (the command's standard output is the tar stream, as in webdataset).

Nothing here copies a dataset: files are opened as input streams where they are.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import IO, Any

from pipeline.data.sources import DataError
from pipeline.errors import first_line

__all__ = ["is_uri", "join", "open_stream", "read_bytes", "exists", "resolve"]


def is_uri(location: str) -> bool:
    """Whether ``location`` names a scheme (``s3://``, ``gs://``, ``file://``, ``pipe:``...)
    rather than a local path."""
    if location.startswith("pipe:"):
        return True
    head, sep, _ = location.partition("://")
    return bool(sep) and head.isalnum() and len(head) > 1


def join(base: str, ref: str) -> str:
    """``ref`` resolved against the folder ``base``: an absolute path or URL stays as it is."""
    if is_uri(ref) or os.path.isabs(ref):
        return ref
    if is_uri(base):
        return base.rstrip("/") + "/" + ref
    return os.path.join(base, ref)


@lru_cache(maxsize=32)
def _filesystem(root: str) -> Any:
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(root)[0]


def resolve(location: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    if location.startswith("file://"):
        return pafs.LocalFileSystem(), location[len("file://") :]
    scheme, _, rest = location.partition("://")
    rest, _, query = rest.partition("?")  # e.g. ?endpoint_override=...: the filesystem's options
    bucket = rest.split("/", 1)[0]
    try:
        fs = _filesystem(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))
        if scheme in ("s3", "gs", "gcs"):  # bucket/key (no new filesystem per file)
            path = rest
        else:
            _, path = pafs.FileSystem.from_uri(location)
    except Exception as err:  # noqa: BLE001 - any pyarrow failure: one line naming the URI
        raise DataError(f"{location}: cannot open ({type(err).__name__}: {err})") from None
    return fs, path


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError:
        return False


def read_bytes(location: str) -> bytes:
    """The whole file (small files only: dataset.json, subsets)."""
    with open_stream(location) as f:
        return f.read()


class _PipeStream:
    """The standard output of ``pipe:<command>``; closing checks the exit status."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.proc = subprocess.Popen(  # noqa: S602 - the command is the user's shard URL
            location[len("pipe:") :],
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout

    def read(self, n: int = -1) -> bytes:
        return self.stdout.read(n)

    def close(self) -> None:
        self.stdout.close()
        rc = self.proc.wait()
        err = self.proc.stderr.read().decode("utf-8", "replace").strip() if self.proc.stderr else ""
        if self.proc.stderr:
            self.proc.stderr.close()
        if rc != 0 and rc != -13:  # -13: SIGPIPE after the reader stopped early
            line = err.splitlines()[-1] if err else ""
            raise DataError(
                f"{self.location}: command exited with {rc}{': ' + line if line else ''}"
            )


@contextmanager
def open_stream(location: str, missing: str = "missing") -> Iterator[IO[bytes]]:
    """A binary input stream of a local file, an object-store URI or a ``pipe:`` command; a
    missing file is a one-line :class:`DataError` naming it."""
    if location.startswith("pipe:"):
        stream = _PipeStream(location)
        try:
            yield stream  # type: ignore[misc]
        except BaseException:
            stream.proc.kill()
            raise
        finally:
            stream.close()
        return
    fs, path = resolve(location)
    try:
        # never decompressed by name (the recorded sha256 is the file's); object stores buffered
        local = type(fs).__name__ == "LocalFileSystem"
        f = fs.open_input_stream(path, compression=None, buffer_size=None if local else 1 << 20)
    except FileNotFoundError:
        raise DataError(f"{location}: {missing}") from None
    except OSError as err:
        msg = first_line(err)
        if "not found" in msg.lower() or "does not exist" in msg.lower():
            raise DataError(f"{location}: {missing}") from None
        raise DataError(f"{location}: cannot open ({msg})") from None
    try:
        yield f
    finally:
        f.close()
