"""The CLI's help, config show and its exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from workflows.cli import main


def test_help_lists_commands() -> None:
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0
    commands = (
        "run", "local", "resume", "status", "lineage", "compare", "shard", "submit", "tune", "ui"
    )  # fmt: skip
    for cmd in (*commands, "config"):
        assert f"  {cmd} " in out.output


def test_config_show_stage_prints_what_the_kind_reads() -> None:
    out = CliRunner().invoke(
        main, ["config", "show", "demo", "--stage", "baseline", "--set", "finetune.seed=7"]
    )
    assert out.exit_code == 0, out.output
    shown = yaml.safe_load(out.output)
    assert shown["seed"] == 7 and shown["baseline_lr"] == {"0.1": 0.1, "1.0": 0.03}
    assert "pretrain" not in shown and "tune" not in shown and shown["bf16"] is False
    assert "# not in the cache key: consistency.baseline:" in out.output
    bad = CliRunner().invoke(main, ["config", "show", "demo", "--stage", "pretrian"])
    assert bad.exit_code == 2 and "pretrian" in bad.output


def test_config_show_resolves_overrides() -> None:
    out = CliRunner().invoke(main, ["config", "show", "smoke", "--set", "pretrain.epochs=9"])
    assert out.exit_code == 0, out.output
    shown = yaml.safe_load(out.output)
    assert shown["pretrain"]["epochs"] == 9
    assert shown["data"]["source"] == "digits"


def test_bad_config_value_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "workflows.cli",
            "config",
            "show",
            "smoke",
            "--set",
            "pretrain.temperature=0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: config error: pretrain.temperature: must be > 0 (got 0)"]


def test_every_subcommand_has_help() -> None:
    for cmd in (
        ["run"],
        ["local"],
        ["resume"],
        ["status"],
        ["lineage"],
        ["shard"],
        ["submit"],
        ["tune"],
        ["ui"],
        ["config", "show"],
    ):
        out = CliRunner().invoke(main, [*cmd, "--help"])
        assert out.exit_code == 0, (cmd, out.output)


def _finished_run(store, seed: int, metrics: dict[str, float], **overrides) -> str:
    from pipeline.config import parse_config

    cfg = parse_config({"name": "cmp", "seed": seed, **overrides})
    rid = store.create_run(cfg)
    store.write_manifest(rid, "evaluate", {"outputs": {}, "metrics": metrics})
    return rid


def test_compare_aggregates_runs_and_names_what_differs(tmp_path) -> None:
    from workflows.state import RunStore, code_label

    store = RunStore(tmp_path / "store")
    per_seed = [  # (baseline, fine-tuned, student) at 5 %; kNN
        (60.0, 70.0, 71.0, 80.0),
        (64.0, 72.0, 71.0, 82.0),
        (68.0, 71.0, 70.5, 81.0),
    ]
    ids = [
        _finished_run(
            store,
            seed,
            {"baseline_top1@5": b, "finetune_top1@5": f, "student_top1@5": s, "knn_top1": k},
        )
        for seed, (b, f, s, k) in enumerate(per_seed)
    ]
    out = CliRunner().invoke(main, ["compare", "--storage", str(tmp_path / "store"), *ids])
    assert out.exit_code == 0, out.output
    assert "differing in seed = 0, 1, 2" in out.output
    row = next(ln for ln in out.output.splitlines() if ln.startswith("5%"))
    cells = row.split()
    # runs, baseline mean ± sd, fine-tuned, Δ (per run: +10, +8, +3), student, student - teacher
    assert cells[:2] == ["5%", "3"]
    assert cells[2:5] == ["64.0", "±", "4.0"] and cells[5:8] == ["71.0", "±", "1.0"]
    assert cells[8:11] == ["+7.0", "±", "3.6"]  # mean of the per-run differences, not of means
    assert cells[11] == "2.1"  # its standard error: 3.61 / sqrt(3)
    assert cells[12:15] == ["70.8", "±", "0.3"] and cells[15:18] == ["-0.2", "±", "1.0"]
    assert cells[18] == "-"  # no linear probe recorded
    assert "kNN (all labels): 81.0 ± 1.0" in out.output
    code = code_label(store.load_run(ids[0]).code)
    assert f"\ncode: {code}\n" in out.output  # all three made with this checkout's code
    # a run recorded at another commit (or before runs recorded their code) is named as such
    run_json = Path(store.load_run(ids[2]).path) / "run.json"
    record = json.loads(run_json.read_text())
    record["code"] = {"version": "0.1.0", "commit": "0123456789abcdef", "dirty": True}
    run_json.write_text(json.dumps(record))
    record = json.loads((Path(store.load_run(ids[1]).path) / "run.json").read_text())
    del record["code"]
    (Path(store.load_run(ids[1]).path) / "run.json").write_text(json.dumps(record))
    out = CliRunner().invoke(main, ["compare", "--storage", str(tmp_path / "store"), *ids])
    assert f"code differs: {code}, unknown, 0123456+changes" in out.output
    # --last 2: the two newest finished runs (run ids sort by creation second, then at random)
    newest = sorted(ids)[-2:]
    out = CliRunner().invoke(main, ["compare", "--storage", str(tmp_path / "store"), "--last", "2"])
    assert out.exit_code == 0 and f"2 run(s): {' '.join(newest)}" in out.output


def test_compare_errors_name_the_run(tmp_path) -> None:
    from pipeline.config import parse_config
    from workflows.state import RunStore

    store = RunStore(tmp_path / "store")
    done = _finished_run(store, 0, {"finetune_top1@1": 50.0})
    unfinished = store.create_run(parse_config({"name": "cmp"}))
    root = str(tmp_path / "store")
    out = CliRunner().invoke(main, ["compare", "--storage", root, done, unfinished])
    assert out.exit_code == 2
    assert f"run {unfinished!r} has no finished evaluate stage" in out.output
    out = CliRunner().invoke(main, ["compare", "--storage", root, done, "20990101-000000-abcdef"])
    assert out.exit_code == 2 and "no run '20990101-000000-abcdef'" in out.output
    out = CliRunner().invoke(main, ["compare", "--storage", root])
    assert out.exit_code == 2 and "give run ids, --last N, or both" in out.output
    out = CliRunner().invoke(main, ["compare", "--storage", root, "--last", "0"])
    assert out.exit_code == 2 and "--last must be >= 1" in out.output
    # one run: plain values, and the same run twice counts once
    out = CliRunner().invoke(main, ["compare", "--storage", root, done, done])
    assert out.exit_code == 0 and "1 run(s)" in out.output and "identical configs" in out.output
    assert next(ln for ln in out.output.splitlines() if ln.startswith("1%")).split()[3] == "50.0"


def test_every_one_line_error_is_a_user_error_and_keeps_its_builtin_base() -> None:
    from pipeline.config import ConfigError
    from pipeline.data.sources import DataError
    from pipeline.errors import UserError
    from workflows.dag import GraphError
    from workflows.digests import DigestMismatch
    from workflows.local import LocalRunError
    from workflows.orchestrate import PipelineError
    from workflows.runtypes import RunError
    from workflows.state import LeaseHeld, StateError
    from workflows.tracking import TrackingError
    from workflows.tune import TuneError

    value_errors = (ConfigError, DataError, GraphError, LocalRunError, TuneError)
    runtime_errors = (PipelineError, RunError, DigestMismatch, StateError, LeaseHeld, TrackingError)
    for cls in value_errors + runtime_errors:
        assert issubclass(cls, UserError), cls
        assert cls("x").exit_code == 2, cls
    assert all(issubclass(c, ValueError) for c in value_errors)
    assert all(issubclass(c, RuntimeError) for c in runtime_errors)
    assert TuneError("failed", exit_code=1).exit_code == 1


def test_a_user_error_from_any_command_is_one_line_with_its_exit_code(monkeypatch) -> None:
    from pipeline.errors import UserError
    from workflows import orchestrate
    from workflows.tune import TuneError

    def fail(*_a: object, **_k: object) -> str:
        raise UserError("first line\nsecond line")

    monkeypatch.setattr(orchestrate, "status_text", fail)
    out = CliRunner().invoke(main, ["status"])
    assert out.exit_code == 2 and out.output == "error: first line\n", out.output

    def stopped(*_a: object, **_k: object) -> str:
        raise TuneError("tune: search s1 stopped", exit_code=1)

    monkeypatch.setattr(orchestrate, "lineage_text", stopped)
    out = CliRunner().invoke(main, ["lineage", "r1"])
    assert out.exit_code == 1 and out.output == "error: tune: search s1 stopped\n", out.output
