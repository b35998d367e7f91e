"""Orchestration overhead of the smoke pipeline, and the work a resume redoes after a kill.

Two JSON lines (see ``_common.emit``):

* ``orchestration_overhead`` (s): wall time of ``contrastive run smoke`` (a child process: local
  Ray, MLflow tracking on, durable run records) minus the wall time of the same stage functions
  (``pipeline.stages.shard.run``, ``pretrain.run``, ``finetune.run`` and its baseline per
  fraction, ``distill.run``, ``evaluate.run``) run one after another in one child process with
  ``LocalContext``, without Ray or MLflow. Both walls include starting Python and the imports.
  ``ratio`` = overhead / serial wall. The pipeline runs independent stages concurrently (two CPUs),
  which hides part of its overhead: the line also gives the pipeline wall minus the serial stages'
  own compute (``overhead_vs_stage_compute_s``).
* ``resume_waste`` (s): the same run started again, SIGKILLed (with its process tree, i.e. its
  local Ray) at a seeded random point between 20 % and 80 % of the uninterrupted wall time, then
  ``contrastive resume``: waste = time until the kill + resume wall - uninterrupted wall;
  ``ratio`` = waste / uninterrupted wall; the line names the stages that ran again (attempts > 1).

    python benchmarks/orchestration_overhead.py [--seed 0] [--set finetune.epochs=2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, emit, kill_tree  # noqa: E402

RUN_ID = "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smoke", help="shipped config name or file")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override, passed to both runs")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seeds the kill point")
    p.add_argument("--no-resume", action="store_true", help="skip the resume-waste run")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child run")
    p.add_argument("--serial-child", metavar="ROOT", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def _sets(args: argparse.Namespace, root: Path) -> list[str]:
    out: list[str] = []
    for o in [*args.overrides, f"storage.root={root}"]:
        out += ["--set", o]
    return out


def _cli(*cli_args: str, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "workflows.cli", *cli_args],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise RuntimeError(
            f"contrastive {cli_args[0]} exited {proc.returncode}: {' | '.join(tail)}"
        )
    return wall, proc


# -- the serial baseline (child process) --------------------------------------------------------


def serial_child(args: argparse.Namespace) -> None:
    """Every stage function of the graph in topological order, in this process; prints a JSON
    dict of per-stage seconds."""
    import torch

    from pipeline.config import load_config
    from pipeline.runtime import LocalContext
    from pipeline.slices import slice_for
    from pipeline.stages import shard as shard_stage
    from workflows.dag import build_graph
    from workflows.stages import stage_function, stage_params

    root = Path(args.serial_child)
    cfg = load_config(args.config, [*args.overrides, f"storage.root={root}"])
    torch.set_num_threads(cfg.resources.threads)
    started = time.time()
    outputs: dict[str, dict[str, str]] = {}
    seconds: dict[str, float] = {}
    for node in build_graph(cfg).topological_order():
        out = root / node.name / "out"
        ins = {
            dep: outputs[up]["dataset" if dep == "dataset" else "model"]
            for dep, up in node.deps.items()
        }
        ctx = LocalContext(root / node.name / "checkpoints")
        t0 = time.perf_counter()
        settings = slice_for(node.kind, cfg)
        if node.kind == "shard":
            res = shard_stage.run(settings, str(out))
        else:
            params = stage_params(node, started)
            res = stage_function(node.kind)(settings, ins, str(out), ctx, **params)
        seconds[node.name] = time.perf_counter() - t0
        outputs[node.name] = res.outputs
    print(json.dumps({"threads": cfg.resources.threads, "stage_seconds": seconds}), flush=True)


def run_serial(args: argparse.Namespace, root: Path) -> tuple[float, dict[str, Any]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config,
           "--serial-child", str(root)]  # fmt: skip
    for o in args.overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=args.timeout)  # fmt: skip
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"serial run exited {proc.returncode}: {' | '.join(tail)}")
    return wall, json.loads(lines[-1])


# -- resume after a kill ------------------------------------------------------------------------


def run_killed_then_resume(
    args: argparse.Namespace, root: Path, kill_after: float
) -> dict[str, Any]:
    from workflows.state import RunStore

    cmd = [sys.executable, "-m", "workflows.cli", "run", args.config, "--run-id", RUN_ID,
           *_sets(args, root)]  # fmt: skip
    t0 = time.perf_counter()
    driver = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    while time.perf_counter() - t0 < kill_after and driver.poll() is None:
        time.sleep(0.05)
    finished_early = driver.poll() is not None
    t_kill = time.perf_counter() - t0
    kill_tree(driver.pid)
    driver.wait()
    store = RunStore(str(root))
    at_kill = {n: s.state for n, s in store.stage_states(RUN_ID).items()}
    resume_wall, _ = _cli("resume", RUN_ID, "--storage", str(root), timeout=args.timeout)
    states = store.stage_states(RUN_ID)
    resumed_from = None
    manifest = store.read_manifest(RUN_ID, "pretrain") or {}
    hist = Path(manifest.get("outputs", {}).get("history", "/nonexistent"))
    if hist.is_file():
        resumed_from = max(
            int(h.get("resumed_from_epoch", 0)) for h in json.loads(hist.read_text())
        )
    return {
        "pretrain_resumed_from_epoch": resumed_from,
        "t_kill": t_kill,
        "finished_before_kill": finished_early,
        "resume_wall": resume_wall,
        "at_kill": at_kill,
        "attempts": {n: s.attempts for n, s in states.items()},
        "all_succeeded": all(s.state == "succeeded" for s in states.values()),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serial_child:
        serial_child(args)
        return
    from workflows.state import RunStore

    with tempfile.TemporaryDirectory(prefix="orch_bench_") as tmp:
        tmp_path = Path(tmp)
        serial_wall, serial = run_serial(args, tmp_path / "serial")
        full_root = tmp_path / "full"
        wall, _ = _cli("run", args.config, "--run-id", RUN_ID, *_sets(args, full_root),
                       timeout=args.timeout)  # fmt: skip
        states = RunStore(str(full_root)).stage_states(RUN_ID)
        stage_compute = sum(serial["stage_seconds"].values())
        emit(
            "orchestration_overhead",
            wall - serial_wall,
            "s",
            serial_wall,
            digits=2,
            config=args.config,
            overrides=args.overrides,
            pipeline_wall_s=round(wall, 2),
            serial_wall_s=round(serial_wall, 2),
            serial_stage_compute_s=round(stage_compute, 2),
            overhead_vs_stage_compute_s=round(wall - stage_compute, 2),
            pipeline_stage_durations_sum_s=round(
                sum(s.duration_s or 0.0 for s in states.values()), 2
            ),
            stages=len(states),
            serial_stage_seconds={k: round(v, 2) for k, v in serial["stage_seconds"].items()},
            pipeline_stage_seconds={k: round(s.duration_s or 0.0, 2) for k, s in states.items()},
            note="pipeline (Ray + MLflow + durable records, independent stages concurrent on "
            f"{os.cpu_count()} CPUs) wall - serial one-process wall of the same stage functions; "
            "both include Python start and imports",
        )
        if args.no_resume:
            return
        frac = random.Random(args.seed).uniform(0.2, 0.8)
        got = run_killed_then_resume(args, tmp_path / "killed", frac * wall)
        waste = got["t_kill"] + got["resume_wall"] - wall
        rerun = sorted(n for n, a in got["attempts"].items() if a > 1)
        emit(
            "resume_waste",
            waste,
            "s",
            wall,
            digits=2,
            seed=args.seed,
            kill_at_fraction=round(frac, 3),
            kill_at_s=round(got["t_kill"], 2),
            resume_wall_s=round(got["resume_wall"], 2),
            uninterrupted_wall_s=round(wall, 2),
            rerun_stages=rerun,
            states_at_kill=got["at_kill"],
            pretrain_resumed_from_epoch=got["pretrain_resumed_from_epoch"],
            run_finished_before_kill=got["finished_before_kill"],
            resume_succeeded=got["all_succeeded"],
            note="waste = time until SIGKILL + resume wall - uninterrupted wall; rerun_stages = "
            "stages with attempts > 1 (a training stage continues from its last checkpoint)",
        )


if __name__ == "__main__":
    main()
