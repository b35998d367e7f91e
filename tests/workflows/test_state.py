"""Durable run records: layout, atomic writes, exclusive run creation, lookups."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.config import parse_config
from workflows.state import RunStore, StageState, StateError, new_run_id


@pytest.fixture
def cfg():
    return parse_config({"name": "t", "finetune": {"label_fractions": [1, 10]}})


def test_run_id_format_and_order():
    a = new_run_id()
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", a)
    assert len({new_run_id() for _ in range(200)}) == 200


def test_create_and_load_run(tmp_path, cfg):
    store = RunStore(tmp_path / "store")
    rid = store.create_run(cfg, tracking_uri="sqlite:///x.db", address="auto")
    d = tmp_path / "store" / rid
    assert (d / "config.yaml").is_file() and (d / "run.json").is_file() and (d / "stages").is_dir()
    info = store.load_run(rid)
    assert info.run_id == rid and info.status == "created" and info.name == "t"
    assert info.tracking_uri == "sqlite:///x.db" and info.address == "auto"
    assert store.load_config(rid) == cfg
    store.update_run(rid, status="running", mlflow_run_id="abc")
    info = store.load_run(rid)
    assert info.status == "running" and info.mlflow_run_id == "abc" and info.updated
    with pytest.raises(StateError, match="run status 'weird'"):
        store.update_run(rid, status="weird")
    assert [r.run_id for r in store.list_runs()] == [rid]


def test_unknown_run_is_one_line_naming_root(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(StateError) as e:
        store.load_run("20200101-000000-abcdef")
    msg = str(e.value)
    assert "no run '20200101-000000-abcdef'" in msg and str(tmp_path) in msg and "\n" not in msg
    with pytest.raises(StateError, match="run id '../x' is not valid"):
        store.load_run("../x")


def test_explicit_run_id_is_exclusive(tmp_path, cfg):
    store = RunStore(tmp_path)
    assert store.create_run(cfg, run_id="my-run") == "my-run"
    with pytest.raises(StateError, match="run 'my-run' already exists under"):
        store.create_run(cfg, run_id="my-run")


def test_concurrent_creation_never_shares_a_folder(tmp_path, cfg):
    store = RunStore(tmp_path)
    results: list[str] = []
    errors: list[Exception] = []

    def make() -> None:
        try:
            results.append(store.create_run(cfg, run_id="same"))
        except StateError as err:
            errors.append(err)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["same"] and len(errors) == 7
    ids = [store.create_run(cfg) for _ in range(5)]
    assert len(set(ids)) == 5


def test_atomic_write_leaves_no_temp_and_keeps_old_on_failure(tmp_path, cfg, monkeypatch):
    store = RunStore(tmp_path)
    rid = store.create_run(cfg)
    st = StageState("pretrain", state="running", attempts=1, cache_key="k")
    store.write_state(rid, st)
    sdir = tmp_path / rid / "stages" / "pretrain"
    assert json.loads((sdir / "state.json").read_text())["state"] == "running"
    assert [p.name for p in sdir.iterdir()] == ["state.json"]

    # a crash in the middle of writing: the old file is intact and no temp file is left
    import pipeline.atomic

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline.atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.write_state(rid, StageState("pretrain", state="failed"))
    monkeypatch.undo()
    assert store.read_state(rid, "pretrain").state == "running"
    assert [p.name for p in sdir.iterdir()] == ["state.json"]


def test_stage_records_and_manifest(tmp_path, cfg):
    store = RunStore(tmp_path)
    rid = store.create_run(cfg)
    assert store.read_state(rid, "shard") == StageState("shard")  # never started -> pending
    assert store.read_manifest(rid, "shard") is None
    store.write_state(
        rid, StageState("shard", state="succeeded", metrics={"n": 3.0}, key_metric="n")
    )
    store.write_manifest(
        rid, "shard", {"outputs": {"dataset": "/x"}, "cache_key": "k1", "digest": "d"}
    )
    assert store.read_manifest(rid, "shard")["cache_key"] == "k1"
    assert store.stage_names(rid) == ["shard"]
    assert store.stage_states(rid)["shard"].metrics == {"n": 3.0}
    path = store.write_error(rid, "shard", "Traceback...\nValueError: x\n")
    assert os.path.isfile(path) and path.endswith("stages/shard/error.txt")
    with pytest.raises(StateError, match="needs an 'outputs' mapping"):
        store.write_manifest(rid, "shard", {"cache_key": "k"})
    with pytest.raises(StateError, match="state 'done' is not one of"):
        store.write_state(rid, StageState("shard", state="done"))
    store.delete_manifest(rid, "shard")
    assert store.read_manifest(rid, "shard") is None
    store.delete_manifest(rid, "shard")  # idempotent


def test_find_finished_by_key_newest_first(tmp_path, cfg):
    store = RunStore(tmp_path)
    r1 = store.create_run(cfg, run_id="20200101-000000-aaaaaa")
    r2 = store.create_run(cfg, run_id="20200102-000000-bbbbbb")
    store.write_manifest(r1, "pretrain", {"outputs": {"m": "/1"}, "cache_key": "K"})
    store.write_manifest(r2, "pretrain", {"outputs": {"m": "/2"}, "cache_key": "K"})
    assert store.find_finished_by_key("K")[0] == r2
    assert store.find_finished_by_key("K", exclude_run_id=r2)[:2] == (r1, "pretrain")
    assert store.find_finished_by_key("other") is None


def test_corrupt_json_is_one_line_error(tmp_path, cfg):
    store = RunStore(tmp_path)
    rid = store.create_run(cfg)
    (tmp_path / rid / "run.json").write_text("{not json")
    with pytest.raises(StateError, match=r"run.json is not valid JSON"):
        store.load_run(rid)


def test_object_store_paths(cfg):
    """The object-store code path (no rename, claim marker) on pyarrow's in-memory file system."""
    fs = pafs._MockFileSystem()
    store = RunStore("bucket/prefix", filesystem=fs)
    assert not store.is_local
    rid = store.create_run(cfg, run_id="r1")
    with pytest.raises(StateError, match="already exists"):
        store.create_run(cfg, run_id="r1")
    store.write_state(rid, StageState("shard", state="running"))
    assert store.read_state(rid, "shard").state == "running"
    store.write_manifest(rid, "shard", {"outputs": {}, "cache_key": "K"})
    assert store.find_finished_by_key("K") == ("r1", "shard", {"outputs": {}, "cache_key": "K"})
    assert [r.run_id for r in store.list_runs()] == ["r1"]
    names = sorted(f.path for f in fs.get_file_info(pafs.FileSelector("bucket", recursive=True)))
    assert not any(n.endswith(".tmp") for n in names)


def test_uri_root(tmp_path, cfg):
    store = RunStore(f"file://{tmp_path}/s")
    assert store.is_local
    rid = store.create_run(cfg)
    assert (tmp_path / "s" / rid / "run.json").is_file()
    with pytest.raises(StateError, match="storage.root 'nosuch://x'"):
        RunStore("nosuch://x")


def test_a_run_records_the_code_it_was_made_with(tmp_path, cfg):
    import hashlib
    import subprocess

    from workflows.state import code_label, code_version

    repo = Path(__file__).resolve().parents[2]
    info = RunStore(tmp_path).load_run(RunStore(tmp_path).create_run(cfg))
    assert info.code == code_version()
    if not (repo / ".git").exists():
        assert info.code["commit"] is None and code_label(info.code) == "unknown"
        return
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    diff = subprocess.run(
        ["git", "-C", str(repo), "diff", "HEAD", "--no-ext-diff", "--no-color"],
        capture_output=True,
        check=True,
    ).stdout
    assert info.code["commit"] == head and info.code["dirty"] == bool(diff)
    want = head[:7] + (f"+changes-{hashlib.sha256(diff).hexdigest()[:8]}" if diff else "")
    assert code_label(info.code) == want


def test_code_labels_tell_uncommitted_edits_apart():
    from workflows.state import code_label

    base = {"version": "0.1.0", "commit": "0123456789abcdef"}
    assert code_label({**base, "dirty": False}) == "0123456"
    a = code_label({**base, "dirty": True, "changes": "aaaa1111"})
    b = code_label({**base, "dirty": True, "changes": "bbbb2222"})
    assert a == "0123456+changes-aaaa1111" and a != b
    assert code_label({**base, "dirty": True}) == "0123456+changes"  # a record without the hash
    assert code_label(None) == code_label({"commit": None}) == "unknown"


def test_runs_sit_directly_under_the_root_and_older_layout_is_read(tmp_path, cfg):
    store = RunStore(tmp_path)
    rid = store.create_run(cfg)
    assert (tmp_path / rid / "run.json").is_file() and not (tmp_path / "runs").exists()
    # a run written by the older layout, one folder deeper
    old = RunStore(tmp_path)
    old_id = "20200101-000000-abcdef"
    (tmp_path / "runs" / old_id / "stages").mkdir(parents=True)
    (tmp_path / "runs" / old_id / "config.yaml").write_text(cfg.to_yaml())
    (tmp_path / "runs" / old_id / "run.json").write_text(
        json.dumps({"run_id": old_id, "created": "2020-01-01T00:00:00Z", "status": "succeeded"})
    )
    assert [r.run_id for r in old.list_runs()] == [old_id, rid]
    assert old.load_run(old_id).status == "succeeded"
    assert old.run_dir(old_id).endswith(f"/runs/{old_id}")
    with pytest.raises(StateError, match="reserved"):
        old.create_run(cfg, "tune")
