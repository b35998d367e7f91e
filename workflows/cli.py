"""The ``contrastive`` command line.

Every command validates its config before anything starts: a bad value is one line naming the
dotted field, exit code 2. Any :class:`pipeline.errors.UserError` a command raises is printed as
``error: <its first line>`` and exits with its ``exit_code`` (2, bad input, unless it says
otherwise), without a traceback. Heavy imports (torch, ray, mlflow) happen inside the commands so that
``--help`` and ``config show`` are instant.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.config import Config, load_config
from pipeline.errors import UserError, first_line
from pipeline.slices import SLICE_KINDS, slice_for

DEFAULT_STORAGE = "runs"


class _Group(click.Group):
    """The command group: a :class:`UserError` from any command is printed as one line,
    ``error: <message>`` on stderr, and exits with its ``exit_code``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {first_line(err)}", err=True)
            ctx.exit(err.exit_code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # MLflow sets its own loggers' level on import (e.g. its database set-up)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _load(config: str | None, overrides: tuple[str, ...]) -> Config:
    return load_config(config, list(overrides))


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config field, e.g. --set pretrain.epochs=5 (repeatable).",
)
storage_option = click.option(
    "--storage",
    default=None,
    metavar="ROOT",
    help=f"Storage root holding the runs (default: {DEFAULT_STORAGE!r}, or $CONTRASTIVE_STORAGE).",
)
tracking_option = click.option(
    "--tracking-uri",
    default=None,
    metavar="URI",
    help="MLflow tracking URI (default: the one recorded in the run).",
)


def _storage(storage: str | None) -> str:
    root = storage or os.environ.get("CONTRASTIVE_STORAGE") or DEFAULT_STORAGE
    return root if "://" in root else str(Path(root).expanduser().resolve())


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="contrastive-pipeline")
def main(verbose: bool) -> None:
    """Contrastive pretraining -> label-efficient classifiers, as a resumable Ray workflow
    tracked in MLflow.

    \b
    Typical use:
      contrastive run workflows/configs/smoke.yaml
      contrastive status
      contrastive resume RUN_ID
      contrastive lineage RUN_ID
      contrastive logs RUN_ID [STAGE]
      contrastive ui
    """
    _setup_logging(verbose)


@main.group("config")
def config_group() -> None:
    """Inspect configurations."""


@config_group.command("show")
@click.argument("config", required=False)
@click.option(
    "--stage",
    "kind",
    type=click.Choice(sorted(SLICE_KINDS)),
    default=None,
    help="Only what this stage kind reads of the config: the slice its function receives and "
    "its cache key hashes (less the fields listed as not changing its result).",
)
@set_option
def config_show(config: str | None, kind: str | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved CONFIG (a path, or a shipped name like 'smoke') as YAML."""
    cfg = _load(config, overrides)
    if kind is None:
        click.echo(cfg.to_yaml(), nl=False)
        return
    import yaml

    part = slice_for(kind, cfg)
    click.echo(yaml.safe_dump(part.model_dump(mode="json"), sort_keys=False), nl=False)
    for path, why in part.UNKEYED.items():
        click.echo(f"# not in the cache key: {path}: {why}")


@main.command()
@click.option("--config", "config", required=True, help="Config file or shipped config name.")
@click.option(
    "--out", default=None, help="Output folder (default: <storage.root>/datasets/<name>)."
)
@set_option
def shard(config: str, out: str | None, overrides: tuple[str, ...]) -> None:
    """Write WebDataset shards, the Parquet manifest and label subsets (Ray tasks)."""
    cfg = _load(config, overrides)
    import ray

    from workflows.sharding import shard_with_ray

    out_dir = out or str(
        Path(cfg.storage.root) / "datasets" / f"{cfg.data.source}-seed{cfg.data.seed}"
    )
    if not ray.is_initialized():
        ray.init(
            address="local", include_dashboard=False, configure_logging=False, log_to_driver=False
        )
    try:
        result = shard_with_ray(cfg, out_dir)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(first_line(err), exit_code=1) from None
    for k, v in result.metrics.items():
        click.echo(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}")
    click.echo(f"dataset: {result.outputs.get('dataset', out_dir)}")


@main.command()
@click.argument("config")
@set_option
@click.option("--run-id", default=None, help="Use this run id (must be new).")
@click.option("--reuse", is_flag=True, help="Reuse finished stages of earlier runs by cache key.")
@click.option(
    "--address",
    default=None,
    help="Ray cluster to run on: auto (the running one: $RAY_ADDRESS or this machine's "
    "`ray start`), HOST:6379, ray://HOST:10001. Default: a private local Ray.",
)
@click.option(
    "--from-tune",
    "from_tune",
    default=None,
    metavar="SEARCH_ID",
    help="Start from the best config of a Tune search.",
)
def run(
    config: str,
    overrides: tuple[str, ...],
    run_id: str | None,
    reuse: bool,
    address: str | None,
    from_tune: str | None,
) -> None:
    """Run the whole pipeline for CONFIG: shard -> pretrain -> finetune/baseline -> distill ->
    evaluate."""
    from workflows import orchestrate

    if from_tune:
        cfg0 = _load(config, overrides)
        config = orchestrate.best_config_path(cfg0.storage.root, from_tune)
    cfg = _load(config, overrides)
    from workflows.submit import JOB_ADDRESS_ENV, JOB_ID_ENV

    job = None
    if os.environ.get(JOB_ID_ENV):  # the driver of a job that `contrastive submit` sent
        job = {"submission_id": os.environ[JOB_ID_ENV]}
        if os.environ.get(JOB_ADDRESS_ENV):
            job["address"] = os.environ[JOB_ADDRESS_ENV]
    sys.exit(orchestrate.run_pipeline(cfg, run_id=run_id, reuse=reuse, address=address, job=job))


@main.command()
@click.argument("config")
@set_option
@click.option(
    "--out",
    default=None,
    metavar="DIR",
    help="Output folder, new or empty (default: STORAGE_ROOT/local/NAME-TIMESTAMP).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when available), cpu, cuda or cuda:N.",
)
def local(config: str, overrides: tuple[str, ...], out: str | None, device: str) -> None:
    """Run the whole pipeline for CONFIG in this process on one device, without Ray or MLflow
    (no parallel stages, run records, resume or tracking): a quick check, or a GPU machine
    without Ray. Writes each stage's folder, the report and summary.json under --out."""
    import time

    from pipeline.runtime import StageResult
    from workflows.local import resolve_device, run_local

    cfg = _load(config, overrides)
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = str(Path(cfg.storage.root) / "local" / f"{cfg.name}-{stamp}")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder")
    dev = resolve_device(device)

    def on_stage(name: str, seconds: float, result: StageResult) -> None:
        key = next(iter(result.metrics.items()), None)
        shown = f" ({key[0]} {key[1]:.4g})" if key else ""
        click.echo(f"stage {name} done in {seconds:.1f} s{shown}")

    click.echo(f"local run of {cfg.name} on {dev} -> {target}")
    summary = run_local(cfg, target, dev, on_stage)
    report = Path(summary["stages"]["evaluate"]["outputs"]["report_md"])
    click.echo(report.read_text().split("![", 1)[0].rstrip())
    click.echo(f"whole run {summary['wall_seconds']:.0f} s; summary: {target / 'summary.json'}")


@main.command()
@click.argument("run_id")
@storage_option
@tracking_option
@click.option(
    "--address",
    default=None,
    help="Ray cluster (auto, HOST:6379, ray://HOST:10001); default: the run's own, else a "
    "private local Ray.",
)
@click.option(
    "--force", is_flag=True, help="Take the run over even if its driver still looks alive."
)
def resume(
    run_id: str, storage: str | None, tracking_uri: str | None, address: str | None, force: bool
) -> None:
    """Continue a failed or killed run: finished stages are not run again. A run whose driver
    is alive is refused unless --force."""
    from workflows import orchestrate

    sys.exit(
        orchestrate.resume_pipeline(
            _storage(storage),
            run_id,
            tracking_uri=tracking_uri,
            address=address,
            force=force,
        )
    )


@main.command()
@click.argument("run_id", required=False)
@storage_option
def status(run_id: str | None, storage: str | None) -> None:
    """A run's stages (state, attempts, duration, key metric, MLflow run), or the list of runs."""
    from workflows import orchestrate

    click.echo(orchestrate.status_text(_storage(storage), run_id))


@main.command()
@click.argument("run_id")
@storage_option
def lineage(run_id: str, storage: str | None) -> None:
    """The stage graph of RUN_ID with each stage's inputs, outputs, digest and MLflow run."""
    from workflows import orchestrate

    click.echo(orchestrate.lineage_text(_storage(storage), run_id))


@main.command()
@click.argument("run_id")
@click.argument("stage", required=False)
@click.option("--tail", type=int, default=None, metavar="N", help="Only the last N lines.")
@storage_option
def logs(run_id: str, stage: str | None, tail: int | None, storage: str | None) -> None:
    """The worker log of STAGE of RUN_ID (every stage's without STAGE)."""
    from workflows import orchestrate

    click.echo(orchestrate.logs_text(_storage(storage), run_id, stage, tail))


@main.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@click.option("--last", type=int, default=None, metavar="N",
              help="Also the N newest runs with a finished evaluation.")  # fmt: skip
@storage_option
def compare(run_ids: tuple[str, ...], last: int | None, storage: str | None) -> None:
    """Label-efficiency numbers of finished runs (e.g. seeds) as mean ± sd, and what differs."""
    from workflows import orchestrate

    if not run_ids and last is None:
        raise UserError("compare: give run ids, --last N, or both")
    click.echo(orchestrate.compare_text(_storage(storage), list(run_ids), last))


@main.command()
@click.argument("config")
@click.option("--address", required=True, help="Ray dashboard address, http://HEAD:8265.")
@set_option
@click.option(
    "--env",
    "env",
    multiple=True,
    metavar="KEY=VALUE",
    help="A variable for the job's and every stage's runtime environment, e.g. "
    "--env AWS_ENDPOINT_URL=http://minio:9000 (repeatable). Visible in the Ray dashboard: "
    "endpoints, not credentials.",
)
def submit(config: str, address: str, overrides: tuple[str, ...], env: tuple[str, ...]) -> None:
    """Submit CONFIG as a Ray Job to a cluster; prints the job and run ids at once."""
    cfg = _load(config, overrides)
    from workflows.submit import parse_env, submit_job

    try:
        job_id, run_id = submit_job(
            config,
            list(overrides),
            address,
            storage_root=cfg.storage.root,
            env=parse_env(env),
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(first_line(err), exit_code=1) from None
    click.echo(f"job: {job_id}\nrun: {run_id}")


@main.command()
@click.argument("config", required=False)
@set_option
@click.option("--trials", type=int, default=None, help="Number of trials (tune.num_trials).")
@click.option(
    "--resume",
    "resume_id",
    default=None,
    metavar="SEARCH_ID",
    help="Continue an interrupted search.",
)
@click.option("--show", "show_id", default=None, metavar="SEARCH_ID", help="Print a results table.")
@storage_option
@click.option(
    "--address",
    default=None,
    help="Ray cluster (auto, HOST:6379, ray://HOST:10001); default: a private local Ray.",
)
def tune(
    config: str | None,
    overrides: tuple[str, ...],
    trials: int | None,
    resume_id: str | None,
    show_id: str | None,
    storage: str | None,
    address: str | None,
) -> None:
    """Ray Tune search over temperature, head depth and augmentation strength."""
    from workflows import orchestrate
    from workflows import tune as tune_mod

    if show_id:
        click.echo(tune_mod.show(_storage(storage), show_id))
        return
    if address:
        orchestrate.connect_ray(address)
    if resume_id:
        sys.exit(tune_mod.resume(_storage(storage), resume_id))
    if config is None:
        raise UserError("tune: give a CONFIG (or --resume / --show SEARCH_ID)")
    cfg = _load(config, overrides + ((f"tune.num_trials={trials}",) if trials else ()))
    sys.exit(tune_mod.search(cfg))


@main.command()
@storage_option
@click.option(
    "--tracking-uri",
    default=None,
    metavar="URI",
    help="MLflow backend store to browse (default: the SQLite store under the storage root).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address.")
@click.option("--port", default=5000, show_default=True, type=int)
def ui(storage: str | None, tracking_uri: str | None, host: str, port: int) -> None:
    """Start the MLflow UI on a local store: the SQLite store under the storage root, or
    --tracking-uri (bound to 127.0.0.1 by default)."""
    import subprocess

    uri = tracking_uri or "sqlite:///" + str(Path(_storage(storage)) / "mlflow.db")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    click.echo(f"MLflow UI on http://{host}:{port} (store {uri}); Ctrl-C stops it")
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
