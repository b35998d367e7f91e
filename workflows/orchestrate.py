"""The commands behind ``contrastive run / resume / status / lineage``.

``run_pipeline`` checks that the tracking server answers (before any compute), creates the run's
durable record under ``<storage.root>/<run_id>/``, connects to Ray (local, ``auto`` or
``ray://``) and executes the stage graph with :func:`workflows.runner.run_graph`.
``resume_pipeline`` runs the same graph again under the same run id: finished stages are skipped,
interrupted ones continue from their last checkpoint, and the same MLflow parent run receives the
rest. ``status_text`` and ``lineage_text`` read only the durable records, so they work from any
machine that sees the storage.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from typing import Any

from pipeline.config import Config
from pipeline.errors import UserError, first_line
from workflows.dag import Graph, build_graph
from workflows.state import RunInfo, RunStore, StageState, StateError, code_label

__all__ = [
    "PipelineError",
    "best_config_path",
    "compare_text",
    "connect_ray",
    "lineage_text",
    "resume_pipeline",
    "run_pipeline",
    "status_text",
]

log = logging.getLogger("contrastive")


class PipelineError(UserError, RuntimeError):
    """A problem that stops a run before it starts; ``str(err)`` is one line."""


def best_config_path(storage_root: str, search_id: str) -> str:
    """The ``best.yaml`` of Tune search ``search_id`` (see :mod:`workflows.tune`); a missing
    search or one without a best config is a one-line :class:`PipelineError`."""
    from workflows.tune import TuneError
    from workflows.tune import best_config_path as _best

    try:
        return _best(storage_root, search_id)
    except TuneError as err:
        raise PipelineError(str(err)) from None


def ray_token_available() -> bool:
    """Whether this user has a Ray auth token where Ray looks for one: ``$RAY_AUTH_TOKEN``, the
    file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    from workflows.submit import token_headers

    return bool(token_headers())


def enable_ray_token_auth() -> bool:
    """Before connecting to an existing cluster: with ``RAY_AUTH_MODE`` unset and a token
    available, set ``RAY_AUTH_MODE=token`` for this process (and what it starts).

    ``ray start`` (Ray 2.60) turns token authentication on by default, but a client only sends the
    token when ``RAY_AUTH_MODE=token``; without it the cluster refuses the connection. Returns
    whether token mode is on. An explicit ``RAY_AUTH_MODE`` is respected.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    if not ray_token_available():
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # refresh Ray's cached config, as Ray does when it turns token mode on itself
        from ray._raylet import Config as _RayConfig  # type: ignore[attr-defined]

        _RayConfig.initialize("")
    except Exception:  # noqa: BLE001 - older or newer Ray: the variable alone is read at init
        pass
    return True


def _resolve_address(address: str) -> str:
    """The ``HOST:PORT`` that ``address`` names, as far as it can be known before connecting
    (``auto``: ``$RAY_ADDRESS``, else the cluster this machine's ``ray start`` recorded)."""
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "auto":
        return env
    import tempfile

    path = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
    try:
        with open(path) as f:
            return f.read().strip() or "auto"
    except OSError:
        return "auto"


def _probe_gcs(target: str, timeout_s: float = 3.0) -> str | None:
    """Why nothing can be reached at ``HOST:PORT`` (None when a TCP connection opens, or when the
    address is not of that form, e.g. ``ray://``: then Ray's own error speaks)."""
    import socket

    if "://" in target or target.count(":") != 1:
        return None
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        return f"{target!r} is not HOST:PORT"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__


_AUTH_FIX = (
    "a `ray start` cluster of Ray 2.60 requires its auth token: set RAY_AUTH_MODE=token and "
    "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the token `ray get-auth-token` prints on the head"
)


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to Ray; an existing connection is kept.

    ``None`` starts a private Ray instance for this process (``address="local"``): it never
    attaches to another cluster on the machine, whatever ``RAY_ADDRESS`` says. ``auto``, a
    ``HOST:PORT`` or ``ray://HOST:10001`` connect to a running cluster, with token
    authentication when a token is available (:func:`enable_ray_token_auth`). A failure is a
    one-line :class:`PipelineError` naming the address and the fix.
    """
    import ray

    if ray.is_initialized():
        return
    # Worker output goes to each stage's log file (contrastive logs), not to this terminal;
    # -v forwards it as well.
    kwargs: dict[str, Any] = {
        "configure_logging": False,
        "log_to_driver": logging.getLogger().isEnabledFor(logging.DEBUG),
    }
    if not address:
        try:
            _private_ray_init(address="local", include_dashboard=False, num_cpus=num_cpus, **kwargs)
        except Exception as err:  # noqa: BLE001 - e.g. the node timed out during startup
            if ray.is_initialized():
                ray.shutdown()
            raise PipelineError(f"cannot start a local Ray: {first_line(err)}") from None
        return
    target = _resolve_address(address)
    if target == "auto":
        raise PipelineError(
            "cannot connect to Ray at auto: no running cluster found on this machine "
            "($RAY_ADDRESS is unset); start one with `ray start --head`, or give --address HOST:PORT"
        )
    unreachable = _probe_gcs(target)
    if unreachable is not None:
        raise PipelineError(
            f"cannot connect to Ray at {target} ({unreachable}): is the cluster up, and is this "
            "the head's GCS address (`ray start --head` prints it; default port 6379)?"
        )
    token = enable_ray_token_auth()
    try:
        ray.init(address=address, **kwargs)
    except Exception as err:  # noqa: BLE001 - ConnectionError, AuthenticationError, RuntimeError ...
        if ray.is_initialized():
            ray.shutdown()
        if token:
            fix = "check that RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH hold this cluster's token"
        else:
            fix = _AUTH_FIX
        raise PipelineError(
            f"cannot connect to Ray at {target}: {first_line(err)}; if the cluster uses token "
            f"authentication, {fix}"
        ) from None


def _connect_or_fail(address: str | None, num_cpus: int | None) -> None:
    """:func:`connect_ray`, with any failure (its own one-line errors, or anything Ray raises
    past them, e.g. a node that timed out during startup) as a one-line :class:`PipelineError`."""
    try:
        connect_ray(address, num_cpus)
    except PipelineError:
        raise
    except Exception as err:  # noqa: BLE001 - Ray's start-up errors are not one type
        raise PipelineError(
            f"ray error: cannot start or reach Ray ({address or 'local'}): {first_line(err)}"
        ) from None


def apply_env(cfg: Config) -> dict[str, str]:
    """Put ``resources.env`` into this process's environment (the driver reaches the storage
    with it too) and return it; the runner passes it to every stage's runtime environment."""
    env = {str(k): str(v) for k, v in cfg.resources.env.items()}
    os.environ.update(env)
    return env


class _DropRayAuthNotice(logging.Filter):
    """Ray (>= 2.59) turns token authentication on for a new local instance when RAY_AUTH_MODE
    is unset, and says so on every start. For the private instance of ``contrastive run`` that is
    the intended, secure setting and nothing the user must act on, so the notice is dropped.
    (A cluster that asks for a token it cannot find still fails with Ray's own error.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray")


def _private_ray_init(**kwargs: Any) -> None:
    import ray

    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    drop = _DropRayAuthNotice()
    notice.addFilter(drop)
    try:
        ray.init(**kwargs)
    finally:
        notice.removeFilter(drop)


def _tracker(cfg: Config, uri: str | None = None) -> Any:
    if not cfg.tracking.enabled:
        return None
    from workflows.tracking import Tracker

    return Tracker(uri or cfg.tracking_uri(), cfg.tracking.experiment)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _report_path(store: RunStore, run_id: str) -> str | None:
    m = store.read_manifest(run_id, "evaluate")
    return (m or {}).get("outputs", {}).get("report_md")


def _execute_graph(
    cfg: Config,
    store: RunStore,
    run_id: str,
    tracker: Any,
    reuse: bool,
    started_at: float,
    lease: Any = None,
) -> int:
    from workflows.progress import ProgressDisplay, make_board
    from workflows.runner import run_graph
    from workflows.stages import StageExecutor

    graph = build_graph(cfg)
    board = make_board()
    executor = StageExecutor(cfg, started_at, run_id=run_id, progress=board)
    with lease if lease is not None else store.hold_lease(run_id):
        with ProgressDisplay(board, cfg, {n.name: n.kind for n in graph}):
            summary = run_graph(graph, cfg, store, run_id, executor, tracker=tracker, reuse=reuse)
    _say(summary.message())
    if summary.mlflow_run_id:
        _summarise_in_mlflow(tracker, store, run_id, summary.mlflow_run_id, graph)
    _say(f"logs: contrastive logs {run_id} [STAGE] --storage {store.root}")
    if summary.status == "succeeded":
        _say_results(store, run_id)
    if summary.mlflow_run_id:
        from workflows.tracking import redact

        uri = redact("", tracker.uri)
        _say(f"mlflow: run {cfg.name}-{run_id} ({summary.mlflow_run_id}) at {uri}")
        _say(
            f"        browse: contrastive ui --storage {store.root}, then http://127.0.0.1:5000/{tracker.run_link(summary.mlflow_run_id)}?workflowType=machine_learning"
        )
    if summary.status == "succeeded":
        return 0
    _say(f"resume with: contrastive resume {run_id} --storage {store.root}")
    return 1


def _summarise_in_mlflow(
    tracker: Any, store: RunStore, run_id: str, parent: str, graph: Graph
) -> None:
    from workflows.summary import log_parent_summary

    try:
        log_parent_summary(tracker, store, run_id, parent, graph)
    except Exception as err:  # tracking must not fail a finished run
        from workflows.tracking import error_line  # no URI password in the warning

        log.warning("tracking: summary of run %s not logged: %s", run_id, error_line(err))


def _say_results(store: RunStore, run_id: str) -> None:
    from workflows.summary import label_table, read_report

    report, outputs = read_report(store, run_id)
    if report is not None:
        _say("")
        _say(label_table(report))
        _say("")
    for key in ("report_md", "report_html"):
        if outputs.get(key):
            _say(f"report: {outputs[key]}")


def run_pipeline(
    cfg: Config,
    run_id: str | None = None,
    reuse: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    job: dict[str, str] | None = None,
) -> int:
    """Run the whole pipeline for ``cfg``; returns the exit code (0 = every stage succeeded).

    ``job`` (set inside a submitted Ray Job): the submission's id and the dashboard address it
    came through, recorded in ``run.json`` so that ``status`` can ask the Jobs API about it; a run
    record that ``contrastive submit`` made for this job is taken over.

    Prints the run id, its folder, progress and, at the end, the path of ``report.md``.
    """
    started = time.time()
    build_graph(cfg).validate()
    apply_env(cfg)
    tracker = _tracker(cfg)
    if tracker is not None:
        tracker.check_reachable()  # a clear error before any compute
    store = RunStore(cfg.storage.root)
    _connect_or_fail(address, num_cpus)  # before the run folder: a failed one leaves none
    try:
        run_id = store.create_run(
            cfg, run_id, tracking_uri=tracker.uri if tracker else None, address=address, job=job
        )
    except OSError as err:  # a read-only or full storage root: one line naming it
        raise PipelineError(
            f"storage error: cannot create the run under {store.root}: {first_line(err)}"
        ) from None
    _say(f"run: {run_id}")
    _say(f"folder: {store.uri(store.run_dir(run_id))}")
    lease = store.hold_lease(run_id).__enter__()
    return _execute_graph(cfg, store, run_id, tracker, reuse, started, lease)


def resume_pipeline(
    storage_root: str,
    run_id: str,
    tracking_uri: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    force: bool = False,
) -> int:
    """Continue run ``run_id`` from its durable record; finished stages are not run again.

    A run whose driver is still alive (its lease renewed within ``LEASE_TTL_S``) is refused
    with a one-line error naming that driver, unless ``force``."""
    started = time.time()
    store = RunStore(storage_root)
    info = store.load_run(run_id)
    cfg = store.load_config(run_id)
    if info.status == "succeeded":
        _say(f"run {run_id} already succeeded; nothing to resume")
        report = _report_path(store, run_id)
        if report:
            _say(f"report: {report}")
        return 0
    apply_env(cfg)
    held = store.read_lease(run_id)
    if held is not None and held.alive() and force:
        _say(f"taking run {run_id} over from {held.describe()} (--force)")
    lease = store.hold_lease(run_id, force=force).__enter__()  # refuses a live driver
    try:
        tracker = _tracker(cfg, tracking_uri or info.tracking_uri)
        if tracker is not None:
            tracker.check_reachable()
        _connect_or_fail(address or info.address, num_cpus)
        was = store.run_liveness(info) if held is not None else info.status
        _say(f"resuming run: {run_id} (was {was})")
        _say(f"folder: {info.path}")
    except BaseException:
        lease.__exit__(None, None, None)
        raise
    return _execute_graph(cfg, store, run_id, tracker, False, started, lease)


# -- status and lineage ---------------------------------------------------------------------


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _fmt_duration(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}m"


def job_verdict(info: RunInfo) -> tuple[str, str | None]:
    """The status and error to show for a run: as recorded, except a submitted run whose driver
    has not started (``created``, with a Ray Job): the Jobs API says what became of the job, and
    a job that ended (failed, stopped, or finished without the driver writing the run) shows
    the run as ``failed`` with the job's message."""
    if info.status != "created" or not info.job or not info.job.get("address"):
        return info.status, info.error
    from workflows.submit import job_status

    sid = info.job.get("submission_id", "")
    try:
        status, message = job_status(info.job["address"], sid)
    except (ConnectionError, RuntimeError, ValueError) as err:
        return info.status, f"job {sid}: not known ({first_line(err)})"
    first = message.splitlines()[0] if message else "no message"
    if status in ("FAILED", "STOPPED"):
        return "failed", f"job {sid} {status} before the driver started: {first}"
    if status == "SUCCEEDED":  # e.g. the job wrote its run under another storage root
        return "failed", f"job {sid} SUCCEEDED but its driver never wrote this run: {first}"
    return info.status, f"job {sid} {status}"


def _shown_status(store: RunStore, info: RunInfo) -> tuple[str, str | None]:
    """The status and error to show: a submitted run whose driver has not started asks the Jobs
    API (:func:`job_verdict`); any other run tells a live driver from a gone one by its lease."""
    if info.status == "created" and info.job and info.job.get("address"):
        return job_verdict(info)
    return store.run_liveness(info), info.error


def status_text(storage_root: str, run_id: str | None = None) -> str:
    """A table of run ``run_id``'s stages, or of all runs under ``storage_root`` without an id."""
    store = RunStore(storage_root)
    if run_id is None:
        return _runs_table(store)
    info = store.load_run(run_id)
    cfg = store.load_config(run_id)
    states = store.stage_states(run_id)
    order = [n.name for n in build_graph(cfg)]
    order += [n for n in states if n not in order]
    rows = [_stage_row(name, states.get(name)) for name in order]
    lines = [
        _run_head(store, info),
        _table(rows, ["stage", "state", "attempts", "duration", "key metric", "mlflow run"]),
    ]
    for name in order:
        st = states.get(name)
        if st is not None and st.state == "failed" and st.error:
            lines.append(f"{name} failed: {st.error}")
            if st.traceback_file:
                lines.append(f"  traceback: {st.traceback_file}")
    return "\n".join(lines)


def _runs_table(store: RunStore) -> str:
    runs = store.list_runs()
    if not runs:
        return f"no runs under {store.root}"
    rows = []
    for r in runs:
        shown, error = _shown_status(store, r)
        rows.append([r.run_id, r.name, shown, r.created[:19], r.mlflow_run_id or "-", error or ""])
    return _table(rows, ["run", "name", "status", "created", "mlflow run", "error"])


def _stage_row(name: str, st: StageState | None) -> list[str]:
    if st is None:
        return [name, "pending", "0", "-", "-", "-"]
    metric = "-"
    if st.key_metric and st.key_metric in st.metrics:
        metric = f"{st.key_metric}={st.metrics[st.key_metric]:.4g}"
    state = st.state + (" (reused)" if st.reused_from else "")
    duration = _fmt_duration(st.duration_s)
    return [name, state, str(st.attempts), duration, metric, st.mlflow_run_id or "-"]


def _run_head(store: RunStore, info: RunInfo) -> str:
    """The first line(s) of a run's status: its state (with its driver or how to resume), MLflow
    parent run, error and tracking gap."""
    live, error = _shown_status(store, info)
    head = f"run {info.run_id} ({info.name}): {live}"
    lease = store.read_lease(info.run_id)
    if live == "running" and lease is not None:
        head += f" ({lease.describe()})"
    elif live == "interrupted":
        head += (
            f" (its driver is gone), resume with `contrastive resume {info.run_id}"
            f" --storage {store.root}`"
        )
    if info.mlflow_run_id:
        head += f"; mlflow parent {info.mlflow_run_id} at {info.tracking_uri}"
    if error and live != "succeeded":
        head += f"\nerror: {error}"
    if info.tracking_gap:
        head += f"\ntracking gap: {info.tracking_gap}"
    return head


def lineage_text(storage_root: str, run_id: str) -> str:
    """The stage graph of ``run_id``: each stage's inputs (upstream stage and its MLflow run),
    outputs, output digest, cache key and MLflow run."""
    store = RunStore(storage_root)
    info = store.load_run(run_id)
    cfg = store.load_config(run_id)
    graph = build_graph(cfg)
    manifests = {n.name: store.read_manifest(run_id, n.name) for n in graph}
    states = store.stage_states(run_id)
    lines = [f"run {run_id} ({info.name}): {info.status}"]
    if info.mlflow_run_id:
        lines.append(f"mlflow parent run {info.mlflow_run_id} at {info.tracking_uri}")
    for node in graph:
        m = manifests[node.name]
        st = states.get(node.name)
        lines.append("")
        state = st.state if st else "pending"
        mlflow_id = (m or {}).get("mlflow_run_id") or (st.mlflow_run_id if st else None)
        lines.append(f"{node.name} [{node.kind}] {state}  mlflow={mlflow_id or '-'}")
        if m and m.get("cache_key"):
            lines.append(f"  cache key: {m['cache_key'][:16]}")
        if m and m.get("reused_from"):
            src = m["reused_from"]
            code = f" (code {src['code']})" if src.get("code") else ""
            lines.append(f"  reused from: run {src.get('run_id')} stage {src.get('stage')}{code}")
        for dep, up in node.deps.items():
            um = manifests.get(up) or {}
            lines.append(
                f"  in  {dep} <- {up} (digest {str(um.get('digest', '-'))[:16]}, "
                f"mlflow {um.get('mlflow_run_id') or '-'})"
            )
        if m:
            lines.append(f"  digest: {m.get('digest', '-')}")
            for name, path in m.get("outputs", {}).items():
                lines.append(f"  out {name}: {path}")
    return "\n".join(lines)


# -- comparing runs ---------------------------------------------------------------------------

_NOT_COMPARED = ("storage.", "tracking.")  # where a run was kept, not what it computed


def _mean_sd(values: list[float], signed: bool = False) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    mean = f"{0.0 if round(m, 1) == 0 else m:{'+' if signed else ''}.1f}"  # no "-0.0"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.1f}"


def _standard_error(values: list[float]) -> str:
    """sd / sqrt(n) of ``values``: how far their mean may sit from the recipe's (needs 2 runs)."""
    if len(values) < 2:
        return "-"
    return f"{statistics.stdev(values) / math.sqrt(len(values)):.1f}"


def _fraction_key(name: str) -> float:
    try:
        return float(name)
    except ValueError:
        return math.inf


def compare_text(storage_root: str, run_ids: list[str], last: int | None = None) -> str:
    """The label-efficiency numbers of several finished runs side by side: per label fraction the
    mean ± sample standard deviation over the runs of baseline, fine-tuned, their difference (per
    run, then averaged, with the standard error of that mean), student, student − teacher and
    linear probe; then kNN and the all-label linear probe; which config fields differ between the
    runs (e.g. ``seed``); and the code each run was made with (commit, ``+changes-<hash>`` for
    uncommitted edits; ``unknown`` for runs recorded without it), since the same config at two
    commits is not a repeat of one recipe.

    Read from each run's ``evaluate`` manifest (so a run whose evaluation was reused from an
    earlier run counts). At few labels one run is one draw (README, "What this shows"): compare
    seeds, not single runs. ``last=N`` adds the N newest runs with a finished evaluation. An
    unknown run or one without a finished evaluation is a one-line error naming it.
    """
    store = RunStore(storage_root)
    ids, manifests = _compared_ids(store, run_ids, last)
    metrics, flat, codes = _read_compared(store, ids, manifests)
    knn = [m["knn_top1"] for m in metrics if "knn_top1" in m]
    lin = [m["linear_full_top1"] for m in metrics if "linear_full_top1" in m]
    if len(set(codes)) == 1:
        code = f"code: {codes[0]}"
    else:  # runs of different commits with one config are not repeats of one recipe
        code = f"code differs: {', '.join(codes)}"
    header = ["labels", "runs", "baseline", "SSL fine-tuned", "Δ", "Δ s.e.", "student",
              "student − teacher", "linear probe"]  # fmt: skip
    lines = [
        f"{len(ids)} run(s): {' '.join(ids)}",
        _what_differs(flat),
        code,
        "top-1 % on the test split; mean ± sample standard deviation over the runs "
        "(Δ and student − teacher per run, then averaged; Δ s.e.: standard error of Δ's mean)",
        _table(_fraction_rows(metrics), header),
        f"kNN (all labels): {_mean_sd(knn)}; linear probe (all labels): {_mean_sd(lin)}",
    ]
    return "\n".join(lines)


Manifest = dict[str, Any]


def _compared_ids(
    store: RunStore, run_ids: list[str], last: int | None
) -> tuple[list[str], dict[str, Manifest | None]]:
    """The runs to compare (``run_ids``, then the ``last`` newest with a finished evaluation,
    once each) and the evaluate manifests read while finding them."""
    manifests: dict[str, Manifest | None] = {}  # evaluate manifests, each read once
    if last is not None:
        if last < 1:
            raise StateError(f"state error: --last must be >= 1 (got {last})")
        for r in store.list_runs():
            manifests[r.run_id] = store.read_manifest(r.run_id, "evaluate")
        done = [rid for rid, m in manifests.items() if m]
        run_ids = [*run_ids, *done[-last:]]
    ids = list(dict.fromkeys(run_ids))
    if not ids:
        raise StateError(f"state error: no run ids given and no finished runs under {store.root}")
    return ids, manifests


def _read_compared(
    store: RunStore, ids: list[str], manifests: dict[str, Manifest | None]
) -> tuple[list[dict[str, float]], list[dict[str, Any]], list[str]]:
    """Per run: the evaluate stage's numeric metrics, the flattened config (without where the
    run was kept) and the code label."""
    from workflows.tracking import flatten

    metrics, flat, codes = [], [], []
    for rid in ids:
        info = store.load_run(rid)
        codes.append(code_label(info.code))
        manifest = manifests[rid] if rid in manifests else store.read_manifest(rid, "evaluate")
        if manifest is None:
            raise StateError(
                f"state error: run {rid!r} has no finished evaluate stage (run {info.status})"
            )
        raw = manifest.get("metrics") or {}
        metrics.append({k: float(v) for k, v in raw.items() if isinstance(v, (int, float))})
        cfg = store.load_config(rid).model_dump(mode="json")
        flat.append({k: v for k, v in flatten(cfg).items() if not k.startswith(_NOT_COMPARED)})
    return metrics, flat, codes


def _what_differs(flat: list[dict[str, Any]]) -> str:
    keys = sorted(set().union(*flat))
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    if not differ:
        return "identical configs"
    if len(differ) <= 6:
        return "differing in " + "; ".join(
            f"{k} = {', '.join(str(f.get(k)) for f in flat)}" for k in differ
        )
    return f"differing in {len(differ)} fields: {', '.join(differ)}"


def _fraction_rows(metrics: list[dict[str, float]]) -> list[list[str]]:
    """One row per label fraction: runs, then mean ± sd of each model and of the differences."""
    names = [k.split("@", 1)[1] for m in metrics for k in m if "@" in k]
    fractions = sorted(dict.fromkeys(names), key=_fraction_key)

    def col(metric: str, frac: str) -> list[float]:
        return [m[f"{metric}@{frac}"] for m in metrics if f"{metric}@{frac}" in m]

    def diff(a: str, b: str, frac: str) -> list[float]:
        ka, kb = f"{a}@{frac}", f"{b}@{frac}"
        return [m[ka] - m[kb] for m in metrics if ka in m and kb in m]

    rows = []
    for frac in fractions:
        n = sum(any(k.endswith(f"@{frac}") for k in m) for m in metrics)
        lead = diff("finetune_top1", "baseline_top1", frac)
        rows.append(
            [
                f"{frac}%",
                str(n),
                _mean_sd(col("baseline_top1", frac)),
                _mean_sd(col("finetune_top1", frac)),
                _mean_sd(lead, signed=True),
                _standard_error(lead),
                _mean_sd(col("student_top1", frac)),
                _mean_sd(diff("student_top1", "finetune_top1", frac), signed=True),
                _mean_sd(col("linear_top1", frac)),
            ]
        )
    return rows


def logs_text(
    storage_root: str, run_id: str, stage: str | None = None, tail: int | None = None
) -> str:
    """The worker log of one stage of run ``run_id`` (``stage.log``), or of every stage that has
    one, each under a ``==> stage <==`` header; ``tail``: only the last lines of each."""
    from workflows.progress import LOG_FILE

    store = RunStore(storage_root)
    store.load_run(run_id)  # an unknown run is a one-line error
    names = [stage] if stage else [n.name for n in build_graph(store.load_config(run_id))]
    known = set(store.stage_names(run_id))
    if stage and stage not in known:
        raise StateError(
            f"state error: run {run_id} has no stage {stage!r} (stages: {', '.join(sorted(known))})"
        )
    parts = []
    for name in names:
        text = store._read_text(store.stage_dir(run_id, name) + "/" + LOG_FILE)
        if text is None:
            if stage:
                return f"stage {name} of run {run_id} has no log yet"
            continue
        lines = text.splitlines()
        if tail is not None:
            lines = lines[-tail:]
        body = "\n".join(lines)
        parts.append(body if stage else f"==> {name} <==\n{body}")
    return "\n\n".join(parts) if parts else f"run {run_id} has no stage logs yet"
