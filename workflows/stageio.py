"""Where a stage's inputs, outputs and checkpoints live, on whichever node the stage runs.

A run's storage is a local path (a folder every node sees, or one machine) or an object-store URI
(``s3://bucket/prefix``, ``gs://...``; a custom endpoint through ``AWS_ENDPOINT_URL`` or the URI's
own ``?endpoint_override=HOST:PORT&scheme=http``), read and written through ``pyarrow.fs``.

On an object store no node can assume a path exists on another node, so:

* every input is resolved on the node that uses it, by :func:`materialize_input` alone: a URI is
  copied into a node-local cache (:func:`cache_root`), except the input names in
  :data:`URI_INPUTS`, which the stage receives as URIs and reads in place;
* a stage writes its outputs into a local scratch folder on its node; :func:`upload_dir` puts them
  in the run's storage before the driver writes the stage's manifest;
* training checkpoints go straight to ``<run>/stages/<stage>/checkpoints/latest.pt`` in the run's
  storage (:func:`save_torch`, one atomic put), so a killed driver or a lost node resumes mid-stage.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.atomic import atomic_put
from pipeline.errors import first_line

__all__ = [
    "URI_INPUTS",
    "cache_root",
    "download_dir",
    "exists",
    "is_uri",
    "join",
    "load_torch",
    "materialize_input",
    "materialize_inputs",
    "read_text",
    "remove_tree",
    "save_torch",
    "upload_dir",
    "write_text",
]

#: Stage inputs handed to the stage as URIs, read in place (streamed) instead of copied to the
#: node's cache: the dataset folder (``pipeline.data`` reads dataset.json, subsets and shards
#: through ``pyarrow.fs``).
URI_INPUTS: frozenset[str] = frozenset({"dataset"})


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` locations other than ``file://``-less local paths."""
    return "://" in str(location)


def _split(location: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or a URI."""
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except (OSError, ValueError) as err:
            raise OSError(f"cannot open {location}: {first_line(err)}") from None
    return pafs.LocalFileSystem(), os.path.abspath(location)


def join(location: str, *parts: str) -> str:
    """``location`` / parts, for local paths and URIs (a URI's ``?query`` stays at the end)."""
    rel = posixpath.join(*parts) if parts else ""
    if not is_uri(location):
        return os.path.join(location, rel) if rel else location
    base, sep, query = location.partition("?")
    joined = base.rstrip("/") + ("/" + rel if rel and rel != "." else "")
    return joined + (sep + query if sep else "")


def exists(location: str) -> bool:
    fs, path = _split(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str) -> str:
    """The text of a file at a local path or URI."""
    fs, path = _split(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str, text: str) -> None:
    """Write ``text`` atomically (temp file + rename locally, one put on an object store)."""
    _put(location, text.encode())


def _put(location: str, data: bytes) -> None:
    fs, path = _split(location)
    atomic_put(fs, path, data)


def save_torch(obj: Any, location: str) -> None:
    """``torch.save`` to a local path or URI, atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    _put(location, buf.getvalue())


def load_torch(location: str) -> Any | None:
    """The checkpoint ``torch.save`` wrote at ``location``; None when there is none. Loaded with
    ``weights_only=True`` (tensors and plain types, never arbitrary unpickling: the storage may
    be a shared bucket); a file holding anything else is a one-line error naming it."""
    from pipeline.runtime import load_checkpoint_file

    fs, path = _split(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        data = f.read()
    return load_checkpoint_file(io.BytesIO(data), name=location)


def remove_tree(location: str) -> None:
    """Delete a folder (no error when it is not there)."""
    fs, path = _split(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(path)


def upload_dir(local_dir: str, location: str) -> None:
    """Copy the folder ``local_dir`` to ``location`` (a URI or local path)."""
    fs, path = _split(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(
        os.path.abspath(local_dir),
        path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
        use_threads=True,
    )


def download_dir(location: str, local_dir: str) -> None:
    """Copy the folder (or file) at ``location`` into ``local_dir`` (which it becomes)."""
    fs, path = _split(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{location} does not exist")
    os.makedirs(os.path.dirname(os.path.abspath(local_dir)), exist_ok=True)
    pafs.copy_files(
        path,
        os.path.abspath(local_dir),
        source_filesystem=fs,
        destination_filesystem=pafs.LocalFileSystem(),
        use_threads=True,
    )


def cache_root() -> str:
    """This node's cache of inputs copied from object storage: ``$CONTRASTIVE_CACHE``, else
    ``<temp dir>/contrastive-cache``. Entries are keyed by URI: a finished stage's outputs never
    change, so a copy stays valid for every later stage on the node that reads them."""
    return os.environ.get("CONTRASTIVE_CACHE") or os.path.join(
        tempfile.gettempdir(), "contrastive-cache"
    )


def materialize_input(name: str, location: str, cache: str | None = None) -> str:
    """What stage input ``name`` stored at ``location`` is handed to the stage as, on this node.

    A local path is returned as it is (a local storage root is one machine's disk or a file system
    mounted on every node). A URI whose input name is in :data:`URI_INPUTS` is returned as it is.
    Any other URI is copied (a file or a whole folder) into ``cache`` (default
    :func:`cache_root`) once per node, atomically, and the local copy's path is returned. A URI
    that names no object is a one-line :class:`FileNotFoundError` naming input and URI.
    """
    if not is_uri(location) or name in URI_INPUTS:
        return location
    fs, path = _split(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {name!r}: {location} does not exist")
    root = Path(cache or cache_root())
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    base = posixpath.basename(path.rstrip("/")) or "input"
    dst = root / key / base
    if dst.exists():
        return str(dst)
    tmp = root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(
            path,
            str(tmp / base),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
            use_threads=True,
        )
        try:
            os.rename(tmp, root / key)  # atomic; another task on this node may have won
        except OSError:
            if not dst.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dst)


def materialize_inputs(inputs: dict[str, str], cache: str | None = None) -> dict[str, str]:
    """:func:`materialize_input` for every input of a stage."""
    return {name: materialize_input(name, loc, cache) for name, loc in inputs.items()}
