"""pipeline.atomic: the one set of atomic-write helpers."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.atomic import (
    atomic_put,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def test_writes_create_parents_leave_no_temp_and_are_readable(tmp_path) -> None:
    atomic_write_text(tmp_path / "a" / "t.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "a" / "j.json", {"b": 1, "a": 0.5})
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    text = (tmp_path / "a" / "j.json").read_text()
    assert text.endswith("\n") and list(json.loads(text)) == ["b", "a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "j.json", "t.txt"]
    assert stat.S_IMODE((tmp_path / "a" / "t.txt").stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path) -> None:
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def boom(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_returns_what_the_writer_returns(tmp_path) -> None:
    assert atomic_write(tmp_path / "x", lambda tmp: Path(tmp).write_bytes(b"abc")) == 3


def test_atomic_put_on_the_local_file_system(tmp_path) -> None:
    path = str(tmp_path / "d" / "e" / "x.bin")
    atomic_put(pafs.LocalFileSystem(), path, b"data")
    assert (tmp_path / "d" / "e" / "x.bin").read_bytes() == b"data"
    assert [p.name for p in (tmp_path / "d" / "e").iterdir()] == ["x.bin"]
