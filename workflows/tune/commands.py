"""What ``contrastive tune`` prints: the results table, ``--show``, and the search and resume
commands (which print their one-line errors and return the exit code)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from pipeline.config import Config
from workflows.tune.errors import TuneError
from workflows.tune.rows import TrialRow, read_rows
from workflows.tune.search import check_resources, continue_search, ensure_ray, run_search, searcher
from workflows.tune.space import PARAMS, check_config
from workflows.tune.store import BEST_FILE, load_search, new_search_id, search_dir

__all__ = ["format_table", "resume", "search", "show"]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[TrialRow], best_id: str | None = None) -> str:
    """The results table: trial, params, best kNN, epochs run, state (best trial marked ``*``)."""
    names = [n for n in PARAMS if any(n in r.params for r in rows)]
    header = ["trial", *names, "best kNN", "epochs", "state"]
    body = []
    for r in rows:
        mark = "*" if best_id and r.trial_id == best_id else ""
        body.append(
            [
                f"{r.index}{mark}",
                *(_fmt(r.params.get(n)) for n in names),
                "-" if r.best_knn is None else f"{r.best_knn:.2f}",
                f"{r.epochs_run}/{r.epochs_total or '?'}",
                str(r.state).replace("_", " "),
            ]
        )
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip() for b in body]
    return "\n".join(lines)


def show(storage_root: str, search_id: str) -> str:
    """``contrastive tune --show SEARCH_ID``: the search's state and its results table."""
    d, info = load_search(storage_root, search_id)
    rows = read_rows(d)
    best = info.get("best") or {}
    head = (
        f"search {search_id}: {info.get('state', '?')}, {len(rows)}/{info.get('num_trials', '?')}"
        f" trials"
    )
    if best:
        head += f", best trial {best.get('trial_index')} (val kNN {best.get('knn_top1', 0):.2f}%)"
    out = [head, format_table(rows, best.get("trial_id")) if rows else "(no trials yet)"]
    if info.get("error"):
        out.append(info["error"])
    if info.get("best_config"):
        out.append(f"best config: {info['best_config']}")
    return "\n".join(out)


def _summary(result: dict[str, Any]) -> str:
    b = result["best"]
    vals = ", ".join(f"{k}={v:.4g}" for k, v in b.items() if "." in k)
    return (
        f"best: trial {b['trial_index']} val kNN {b['knn_top1']:.2f}% ({vals})\n"
        f"next: contrastive run --from-tune {result['search_id']} CONFIG"
    )


def _command(
    storage_root: str, search_id: Callable[[], str], body: Callable[[], dict[str, Any] | None]
) -> int:
    """Run ``body`` (a search, or None when there is nothing to run); print its one-line error,
    or the table and the best values. Returns the exit code (0 ok, 1 failed, 2 bad input, 130
    interrupted)."""
    try:
        result = body()
    except TuneError as err:
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        sid = search_id()
        click.echo(f"interrupted; continue with: contrastive tune --resume {sid}", err=True)
        return 130
    if result is not None:
        click.echo(show(storage_root, result["search_id"]))
        click.echo(_summary(result))
    return 0


def search(cfg: Config) -> int:
    """``contrastive tune CONFIG``: shard the data into a new search folder, run the search,
    print the table and the best config. Returns the exit code (0 ok, 1 failed, 2 bad input)."""
    ids = ["SEARCH_ID"]

    def body() -> dict[str, Any]:
        check_config(cfg)
        searcher(cfg)
        ids[0] = new_search_id()
        d = search_dir(cfg.storage.root, ids[0])
        ensure_ray()
        check_resources(cfg)
        click.echo(f"search: {ids[0]} ({d})")
        from workflows.sharding import shard_with_ray

        try:
            shards = shard_with_ray(cfg, d / "dataset").outputs["dataset"]
        except (FileNotFoundError, ValueError) as err:
            msg = f"tune: sharding failed: {str(err).splitlines()[0]}"
            raise TuneError(msg, exit_code=1) from None
        return run_search(cfg, shards, d)

    return _command(cfg.storage.root, lambda: ids[0], body)


def resume(storage_root: str, search_id: str) -> int:
    """``contrastive tune --resume SEARCH_ID``: continue an interrupted or failed search.

    Finished trials are not run again (Tune restores them from the experiment); unfinished and
    errored ones continue from their last checkpoint. A finished search is left as it is.
    Returns the exit code (0 ok, 1 trials failed again, 2 bad input).
    """

    def body() -> dict[str, Any] | None:
        d, info = load_search(storage_root, search_id)
        if info.get("state") == "finished" and (d / BEST_FILE).is_file():
            click.echo(f"search {search_id} is finished; nothing to resume")
            click.echo(show(storage_root, search_id))
            return None
        click.echo(f"resuming search {search_id} ({d})")
        return continue_search(d, info)

    return _command(storage_root, lambda: search_id, body)
