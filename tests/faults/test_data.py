"""Data faults: contained image folders, per-shard checksums, label range checks, label fractions
that cannot collide, and a shard cache key that covers the subsets it writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, parse_config
from pipeline.data.shards import SampleTable, ShardRow, finish_dataset, subset_path
from pipeline.data.sources import DataError, load_image_folder
from pipeline.slices import ShardSlice
from pipeline.stages import shard as shard_stage
from workflows.dag import build_graph, compute_keys


def _img(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6), value, np.uint8)).save(path)


def _folder(root: Path, classes=("a", "b"), n: int = 3) -> None:
    for ci, cls in enumerate(classes):
        for i in range(n):
            _img(root / cls / f"{i}.png", 10 * ci + i)


def _all_paths(d) -> list[str]:
    return [r.path for recs in d.splits.values() for r in recs]


def _reasons(d) -> dict[str, str]:
    return {os.path.basename(s.path): s.reason for s in d.skipped}


def test_class_folders_outside_root_or_at_root_are_skipped_and_counted(tmp_path: Path):
    _img(tmp_path / "outside" / "o1.png", 1)
    _img(tmp_path / "outside" / "o2.png", 2)
    root = tmp_path / "root"
    _folder(root)
    (root / "up").symlink_to("..")  # the parent: would pull in every outside image
    (root / "here").symlink_to(".")  # root itself: would duplicate every image as a class
    (root / "ext").symlink_to(tmp_path / "outside")
    (root / "a" / "stray.png").symlink_to(tmp_path / "outside" / "o1.png")
    d = load_image_folder(root)
    assert d.classes == ["a", "b"]
    assert len(_all_paths(d)) == 6
    assert all(Path(p).resolve().is_relative_to(root.resolve()) for p in _all_paths(d))
    r = _reasons(d)
    assert r["up"].startswith("resolves outside data.root")
    assert r["ext"].startswith("resolves outside data.root")
    assert r["stray.png"].startswith("resolves outside data.root")
    assert r["here"] == "resolves to data.root itself"
    assert len(d.skipped) == 4


def test_symlink_loops_and_second_links_are_counted(tmp_path: Path):
    root = tmp_path / "root"
    _folder(root)
    (root / "a" / "loop").symlink_to("..")  # a/loop -> root/: encloses a
    (root / "a" / "self").symlink_to(root / "a")  # encloses itself
    (root / "b" / "x.png").symlink_to("x.png")  # a link to itself: ELOOP
    (root / "b" / "twin.png").symlink_to(root / "b" / "0.png")  # the same file twice
    (root / "c").symlink_to(root / "a")  # a class that is another class's folder
    d = load_image_folder(root)
    assert d.classes == ["a", "b"] and len(_all_paths(d)) == 6
    r = _reasons(d)
    assert r["loop"] == "resolves to data.root itself"
    assert r["self"] == "symlink loop (links to an enclosing folder)"
    assert r["x.png"] == "symlink loop"
    assert r["twin.png"].startswith("same file as ") and r["twin.png"].endswith("0.png")
    assert r["c"] == "links to a folder listed already"
    assert len(d.skipped) == 5


def test_hidden_entries_are_ignored_and_empty_classes_reported(tmp_path: Path):
    root = tmp_path / "root"
    _folder(root, ("a", "b", "c"))
    _img(root / ".thumbs" / "t.png", 3)  # a hidden folder is not a class
    (root / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _img(root / "b" / ".hidden" / "h.png", 4)
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no images here")
    d = load_image_folder(root)
    assert d.classes == ["a", "b", "c"] and len(_all_paths(d)) == 9
    r = _reasons(d)
    assert r["empty"] == "empty class folder (no images)"
    assert r["notes"] == "empty class folder (no images)" and "readme.txt" in r
    assert not any(name.startswith(".") or name in ("t.png", "h.png") for name in r)
    assert len(d.skipped) == 3


def test_fewer_than_two_classes_is_an_error(tmp_path: Path):
    root = tmp_path / "root"
    _folder(root, ("only",))
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"needs at least two class folders.*found only 'only'"):
        load_image_folder(root)
    with pytest.raises(DataError, match="found none"):
        load_image_folder(root / "empty")


def test_every_shard_has_its_sha256_recorded(tmp_path: Path):
    cfg = parse_config({"data": {"source": "digits", "shard_size": 400}})
    shard_stage.run(ShardSlice.of(cfg), tmp_path)
    info = json.loads((tmp_path / "dataset.json").read_text())
    rows = pq.read_table(tmp_path / "shards.parquet").to_pylist()
    names = [n for s in ("train", "val", "test") for n in info["shards"][s]]
    assert [r["shard"] for r in rows] == names and len(names) == 6
    for r in rows:
        data = (tmp_path / r["shard"]).read_bytes()
        assert r["sha256"] == info["shard_sha256"][r["shard"]] == hashlib.sha256(data).hexdigest()
        assert r["bytes"] == len(data) and r["count"] == info["shard_counts"][r["shard"]]
    assert sum(r["count"] for r in rows) == 1797


def test_labels_are_range_checked_against_the_classes(tmp_path: Path):
    t = SampleTable()
    t.add("k0", "train", 0, "s.tar", 1, "x", 4, 4, 1)
    t.add("k1", "train", 2, "s.tar", 1, "x", 4, 4, 1)
    with pytest.raises(DataError, match=r"sample k1: label 2 outside 0\.\.1"):
        finish_dataset(
            tmp_path,
            name="x",
            classes=["a", "b"],
            samples=t,
            shard_rows=[ShardRow("train", "s.tar", 2, 10, "y")],
            skipped=[],
            label_fractions=[],
            seed=0,
            shard_size=2,
        )
    assert not (tmp_path / "dataset.json").exists()


def test_label_fractions_that_share_a_subset_name_are_rejected():
    for fr, want in (
        ([0.1234561, 0.1234564], "give the same subset name label_0.123456"),
        ([1e-7, 2e-7], "rounds to 0"),
    ):
        with pytest.raises(ConfigError, match="finetune.label_fractions: .*" + want) as ei:
            parse_config({"finetune": {"label_fractions": fr}})
        assert "\n" not in str(ei.value)
    with pytest.raises(ConfigError, match=r"pretrain\.label_fraction: 1\.0 and 1\.0000001"):
        parse_config(
            {"finetune": {"label_fractions": [1]}, "pretrain": {"label_fraction": 1.0000001}}
        )


def test_stage_names_and_subset_files_use_one_formatting(tmp_path: Path):
    cfg = parse_config({"finetune": {"label_fractions": [12.345678, 10]}})
    names = build_graph(cfg).names
    assert "finetune@12.345678" in names and "baseline@12.345678" in names
    assert subset_path(tmp_path, 12.345678).name == "label_12.345678.parquet"


def test_shard_cache_key_covers_the_subsets_it_writes():
    def keys(fractions, **pretrain):
        c = parse_config({"finetune": {"label_fractions": fractions}, "pretrain": pretrain})
        return compute_keys(build_graph(c), c)

    a, b = keys([1, 10]), keys([1, 20])
    assert a["shard"] != b["shard"]  # other subsets: --reuse must not link this shard
    assert a["pretrain"] == b["pretrain"] and a["finetune@1"] == b["finetune@1"]
    assert keys([1, 10], label_fraction=5)["shard"] != a["shard"]
    assert keys([1, 10])["shard"] == a["shard"]
