"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

A local file is written to a temporary file in the same folder, made readable (``0o644``, as a
plain ``open`` under the usual umask) and renamed over the target (``os.replace``, atomic on one
file system); on any failure the temporary file is removed and the target is left as it was. On
an object store (a ``pyarrow.fs`` file system other than the local one, :func:`atomic_put`) one
put is already atomic: the object appears once the upload completes.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pyarrow.fs as pafs

__all__ = [
    "atomic_put",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
]

T = TypeVar("T")

#: Permissions of a file written here (``mkstemp`` alone would leave it owner-only).
FILE_MODE = 0o644


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], T]) -> T:
    """Call ``write(tmp)`` on a temporary path beside ``path`` (parents created), then rename it
    to ``path``; returns what ``write`` returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        out = write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        return out
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int = 2,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Write ``obj`` as JSON (``indent``, keys in their order, a final newline) atomically;
    ``default`` converts what ``json`` cannot (e.g. ``float`` for numpy scalars)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` inside the ``pyarrow.fs`` file system ``fs`` (parents created):
    locally through :func:`atomic_write_bytes`, on an object store as one put."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        atomic_write_bytes(path, data)
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:  # the object appears once the upload completes
        f.write(data)
