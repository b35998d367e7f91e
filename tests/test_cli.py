"""The CLI's help, config show and its exit codes."""

from __future__ import annotations

import subprocess
import sys

import yaml
from click.testing import CliRunner

from workflows.cli import main


def test_help_lists_commands() -> None:
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0
    for cmd in ("run", "resume", "status", "lineage", "shard", "submit", "tune", "ui", "config"):
        assert f"  {cmd} " in out.output


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
