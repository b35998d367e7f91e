"""Output digests: what a stage wrote, hashed when it finishes and checked before it is trusted.

A finished stage's manifest records the SHA-256 of all its outputs (``digest``) and of each output
on its own (``output_digests``), over the outputs' names, relative file names and contents (folders
walked; an output is a local path or a URI of an object store). Before a finished stage is skipped
or reused, :func:`verify_outputs` hashes its outputs again: a file changed or damaged since is a
:class:`DigestMismatch` naming the output, not a silently wrong result downstream.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from workflows.runtypes import RunError, one_line

__all__ = ["DigestMismatch", "digest_outputs", "output_digest", "posix_rel", "verify_outputs"]

#: Opens one file of an output for reading (a local file or an object of a pyarrow file system).
Opener = Callable[[str], BinaryIO]


def _open_local(full: str) -> BinaryIO:
    return open(full, "rb")  # noqa: SIM115 - the caller closes it


def _uri_files(path: str) -> tuple[list[tuple[str, str]] | None, Opener]:
    """The files of an output given as a URI, as (relative name, full path) sorted by name (a
    file on its own is ``.``; None when it does not exist), and how to open them."""
    fs, base = pafs.FileSystem.from_uri(path)
    info = fs.get_file_info(base)
    files: list[tuple[str, str]] | None = None
    if info.type == pafs.FileType.Directory:
        sel = pafs.FileSelector(base, recursive=True)
        files = sorted(
            (posix_rel(fi.path, base), fi.path)
            for fi in fs.get_file_info(sel)
            if fi.type == pafs.FileType.File
        )
    elif info.type == pafs.FileType.File:
        files = [(".", base)]

    def opener(full: str) -> BinaryIO:
        stream: BinaryIO = fs.open_input_stream(full)
        return stream

    return files, opener


def _local_files(path: str) -> tuple[list[tuple[str, str]] | None, Opener]:
    """As :func:`_uri_files`, for a local path."""
    if os.path.isdir(path):
        files = sorted(
            (os.path.relpath(os.path.join(d, f), path), os.path.join(d, f))
            for d, _, names in os.walk(path)
            for f in names
        )
        return files, _open_local
    if os.path.exists(path):
        return [(".", path)], _open_local
    return None, _open_local


def digest_outputs(outputs: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """:func:`output_digest` of all outputs, and the same digest of each output on its own (a
    manifest's ``digest`` and ``output_digests``).

    An output is a local path or a URI :func:`pyarrow.fs.FileSystem.from_uri` understands (a
    reused stage's outputs on object storage); folders are walked."""
    whole = hashlib.sha256()
    each: dict[str, str] = {}
    for name in sorted(outputs):
        path = outputs[name]
        one = hashlib.sha256()
        hs = (whole, one)
        for h in hs:
            h.update(f"output:{name}\n".encode())
        files, opener = _uri_files(path) if "://" in path else _local_files(path)
        if files is None:
            for h in hs:
                h.update(b"missing\n")
        else:
            for rel, full in files:
                for h in hs:
                    h.update(f"file:{rel}\n".encode())
                with opener(full) as fh:
                    while chunk := fh.read(1 << 20):
                        for h in hs:
                            h.update(chunk)
        each[name] = one.hexdigest()
    return whole.hexdigest(), each


def posix_rel(path: str, base: str) -> str:
    return path[len(base.rstrip("/")) + 1 :]


def output_digest(outputs: Mapping[str, str]) -> str:
    """SHA-256 over the outputs' names, relative file names and contents (folders walked)."""
    return digest_outputs(outputs)[0]


class DigestMismatch(RunError):
    """A finished stage's outputs are not what its manifest recorded; one line naming them."""


def verify_outputs(manifest: Mapping[str, Any], where: str) -> None:
    """Re-hash the outputs a manifest points at and compare with its recorded ``digest``;
    raise :class:`DigestMismatch` naming the changed output (and its path). Manifests without a
    digest (written before digests were recorded) pass."""
    recorded = manifest.get("digest")
    outputs = manifest.get("outputs") or {}
    if not recorded or not isinstance(outputs, Mapping):
        return
    try:
        whole, each = digest_outputs(outputs)
    except OSError as err:
        raise DigestMismatch(
            f"{where}: cannot read its outputs to verify them: {one_line(err)}"
        ) from None
    if whole == recorded:
        return
    per = manifest.get("output_digests") or {}
    changed = [n for n in sorted(outputs) if per.get(n) and per[n] != each[n]] or sorted(outputs)
    name = changed[0]
    raise DigestMismatch(
        f"{where}: output {name!r} ({outputs[name]}) does not match the digest recorded when it "
        "was written (changed or damaged since)"
    )
