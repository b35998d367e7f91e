"""``contrastive submit``: send a pipeline run to a Ray cluster as a Ray Job, and return at once.

What travels with the job (its runtime environment):

* ``py_modules``: the ``pipeline`` and ``workflows`` packages of *this* checkout (so the cluster runs
  exactly the code that validated the config, even if the image holds an older install);
* ``working_dir``: a small folder holding ``config.yaml``, the **resolved** config (the file plus
  every ``--set``, validated here before anything is sent).

The runtime environment's ``env_vars`` hold ``resources.env`` of the config and every
``--env KEY=VALUE`` (the job's driver, its stages' tasks and Ray Train workers all see them; they
are visible in the dashboard, so pass endpoints there and give nodes credentials through their
role or a secret), the run id, the job's submission id and dashboard address, and the code version
of this checkout (commit, uncommitted changes), which the packaged code cannot find itself.

The entrypoint is ``python -m workflows.cli run config.yaml --run-id RUN_ID --address auto``.
``python -m`` rather than the ``contrastive`` console script: it needs nothing on the cluster's
``PATH`` and always imports the shipped packages (``py_modules`` come first on ``sys.path``); the
images under ``docker/`` install the package as well, so the third-party dependencies are there.
Inside a Ray Job ``RAY_ADDRESS`` points at the cluster, so ``--address auto`` attaches to it.

The run id is chosen here (:func:`workflows.state.new_run_id`); the Ray submission id is
``contrastive-RUN_ID``, so one id leads to the other. When this machine sees the run's storage
(an object store, or a local path with a cluster on this machine) the run record is written here,
``created`` with its job, before the job is sent: ``contrastive status`` lists the run at once and
asks the Jobs API about a run whose driver has not started (a job that failed before it did is
shown as failed, with the job's message). The job's driver takes that record over.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import first_line
from workflows.state import CODE_ENV

if TYPE_CHECKING:
    from pipeline.config import Config
    from workflows.state import RunStore

__all__ = [
    "CONFIG_NAME",
    "JobSpec",
    "build_job_spec",
    "check_reachable",
    "connect",
    "job_status",
    "normalize_address",
    "parse_env",
    "submit_job",
    "token_headers",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
#: Set in a submitted job's runtime environment: its submission id and the dashboard it came in by.
JOB_ID_ENV = "CONTRASTIVE_JOB_ID"
JOB_ADDRESS_ENV = "CONTRASTIVE_JOB_ADDRESS"
# Never shipped: caches and build leftovers inside the package folders (.gitignore is honoured too).
EXCLUDES = ["__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".ruff_cache"]
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


@dataclass(frozen=True)
class JobSpec:
    """The arguments of ``JobSubmissionClient.submit_job`` for one pipeline run."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``JobSubmissionClient.submit_job``."""
        return {
            "submission_id": self.submission_id,
            "entrypoint": self.entrypoint,
            "runtime_env": self.runtime_env,
            "metadata": self.metadata,
        }


def package_dirs() -> list[str]:
    """The folders of the ``pipeline`` and ``workflows`` packages this process imports."""
    import pipeline
    import workflows

    return [str(Path(next(iter(mod.__path__))).resolve()) for mod in (pipeline, workflows)]


def build_job_spec(
    run_id: str,
    working_dir: str,
    *,
    py_modules: list[str] | None = None,
    name: str = "run",
    storage_root: str | None = None,
    overrides: list[str] | None = None,
    entrypoint: str | None = None,
    python: str = "python",
    env: dict[str, str] | None = None,
    address: str | None = None,
    code: dict[str, Any] | None = None,
) -> JobSpec:
    """The job for ``run_id``: entrypoint, runtime environment and metadata (no I/O).

    ``working_dir`` must hold :data:`CONFIG_NAME`, the resolved config. ``entrypoint`` replaces the
    pipeline command (tests use it to check the plumbing without running the pipeline).
    ``overrides`` are only recorded in the metadata: they are already part of the resolved config.
    ``env``: variables for the job's runtime environment; ``address``: the dashboard URL the job
    is sent to (recorded so that the run can be looked up in the Jobs API); ``code``: the
    :func:`workflows.state.code_version` to record for the run.
    """
    if entrypoint is None:
        entrypoint = shlex.join(
            [python, "-m", "workflows.cli", "run", CONFIG_NAME, "--run-id", run_id]
            + ["--address", "auto"]
        )
    runtime_env: dict[str, Any] = {
        "working_dir": working_dir,
        "py_modules": list(py_modules if py_modules is not None else package_dirs()),
        "excludes": list(EXCLUDES),
        "env_vars": {
            **(env or {}),
            "PYTHONUNBUFFERED": "1",
            "CONTRASTIVE_RUN_ID": run_id,
            JOB_ID_ENV: f"contrastive-{run_id}",
        },
    }
    if address:
        runtime_env["env_vars"][JOB_ADDRESS_ENV] = address
    if code and code.get("commit"):
        runtime_env["env_vars"][CODE_ENV] = json.dumps(code, sort_keys=True)
    from workflows.tracking import redact

    metadata = {"run_id": run_id, "name": name, "submitted_by": "contrastive submit"}
    if storage_root:
        metadata["storage_root"] = redact("storage_root", storage_root)
    if overrides:  # shown by the dashboard and `ray job list`: no credentials
        metadata["overrides"] = " ".join(_redact_override(o) for o in overrides)
    if env:  # which variables the job was given, credential-looking values as ***
        metadata["env"] = " ".join(_redact_override(f"{k}={v}") for k, v in env.items())
    return JobSpec(f"contrastive-{run_id}", entrypoint, runtime_env, metadata)


def _redact_override(item: str) -> str:
    """``key=value`` with a credential-looking value (by key name or in a URI) as ``***``."""
    from workflows.tracking import redact

    key, sep, value = item.partition("=")
    return f"{key}{sep}{redact(key, value)}" if sep else redact("", item)


def normalize_address(address: str) -> str:
    """The dashboard URL for ``address`` (``http(s)://HOST:PORT``; a bare ``HOST:PORT`` gets
    ``http://``). ``ray://`` and anything without a host is a one-line :class:`ValueError`."""
    addr = (address or "").strip().rstrip("/")
    if addr.startswith("ray://"):
        raise ValueError(
            f"submit: {address!r} is a Ray Client address; give the dashboard address, "
            "e.g. http://127.0.0.1:8265"
        )
    if "://" not in addr:
        addr = "http://" + addr
    parsed = urllib.parse.urlparse(addr)
    try:
        parsed.port  # noqa: B018 - raises ValueError on a bad port
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname)
    except ValueError:
        ok = False
    if not ok or parsed.netloc.endswith(":"):
        raise ValueError(
            f"submit: address {address!r} is not a Ray dashboard URL like http://HEAD:8265"
        )
    return addr


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """Open (and close) a TCP connection to the dashboard at ``url``; fail in at most
    ``timeout_s`` with a one-line :class:`ConnectionError` naming it. Skipped when a proxy is
    configured for the URL's scheme (then only the proxy knows the way)."""
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname or ""
    if parsed.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise ConnectionError(
            f"submit: cannot reach the Ray dashboard at {url} ({reason}); is the cluster up and "
            "the port forwarded (ray dashboard CLUSTER.yaml, or kubectl port-forward)?"
        ) from None


def token_headers() -> dict[str, str]:
    """An ``Authorization`` header with this user's Ray auth token, if there is one.

    Ray >= 2.5x clusters started where a token exists require it (token authentication); Ray's
    client sends it only when ``RAY_AUTH_MODE=token`` is set. The token is looked up where Ray looks:
    ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
        try:
            token = Path(path).read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(url: str) -> Any:
    """A ``JobSubmissionClient`` for the dashboard at ``url``.

    Without ``RAY_AUTH_MODE`` set, a cluster that answers 401 is retried once with
    :func:`token_headers`. Errors are one line naming ``url``: :class:`ConnectionError` when
    nothing answers, :class:`RuntimeError` when the cluster refuses.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        try:
            return JobSubmissionClient(url)
        except AuthenticationError:
            headers = token_headers()
            if not headers or os.environ.get("RAY_AUTH_MODE"):
                raise
            return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as err:
        raise RuntimeError(
            f"submit: {url} requires a Ray auth token ({first_line(err)}); set RAY_AUTH_TOKEN "
            "or RAY_AUTH_TOKEN_PATH to the cluster's token"
        ) from None
    except ConnectionError as err:
        raise ConnectionError(f"submit: {url}: {first_line(err)}") from None
    except (RuntimeError, ValueError, OSError) as err:
        raise RuntimeError(
            f"submit: {url} did not accept the connection: {first_line(err)}"
        ) from None


def parse_env(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` strings -> a dict; a malformed one is a one-line :class:`ValueError`."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or key.strip() != key or not key.replace("_", "a").isalnum():
            raise ValueError(
                f"submit: --env {_redact_override(item)!r}: expected KEY=VALUE, "
                "e.g. AWS_REGION=eu-west-1"
            )
        env[key] = value
    return env


def job_status(address: str, submission_id: str, timeout_s: float = 3.0) -> tuple[str, str]:
    """``(status, message)`` of a Ray Job (``FAILED``, ``RUNNING``, ...); raises a one-line
    :class:`ConnectionError` / :class:`RuntimeError` when the Jobs API cannot tell."""
    url = normalize_address(address)
    check_reachable(url, timeout_s)
    client = connect(url)
    try:
        info = client.get_job_info(submission_id)
    except Exception as err:  # noqa: BLE001 - e.g. an unknown job id
        raise RuntimeError(f"job {submission_id}: {first_line(err)}") from None
    status = getattr(info.status, "value", str(info.status))
    return str(status), (info.message or "").strip()


def _storage_visible_here(storage_root: str, url: str) -> bool:
    """Whether this machine sees the storage the cluster writes the run to."""
    if "://" in storage_root:
        return True
    return os.path.isabs(storage_root) and urllib.parse.urlparse(url).hostname in _LOOPBACK


def submit_job(
    config: str,
    overrides: list[str],
    address: str,
    storage_root: str,
    *,
    entrypoint: str | None = None,
    timeout_s: float = 5.0,
    env: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Submit the run of ``config`` (+ ``overrides``) to the cluster whose dashboard is at
    ``address``; return ``(job_id, run_id)`` without waiting for the job.

    Errors are one line naming the address: :class:`ValueError` (a bad address or config),
    :class:`ConnectionError` (nothing answers there), :class:`RuntimeError` (the cluster refused).
    """
    from pipeline.config import load_config
    from workflows.state import code_version, new_run_id

    url = normalize_address(address)
    cfg = load_config(config, list(overrides))  # a ConfigError (ValueError) names the field
    check_reachable(url, timeout_s)
    if "://" not in storage_root and urllib.parse.urlparse(url).hostname not in _LOOPBACK:
        log.warning(
            "storage.root %s is a local path: the cluster writes the run on its own disks; use an "
            "object store (s3://...) to follow it from here with `contrastive status`",
            storage_root,
        )
    run_id = new_run_id()
    with tempfile.TemporaryDirectory(prefix="contrastive-submit-") as staging:
        Path(staging, CONFIG_NAME).write_text(cfg.to_yaml())
        spec = build_job_spec(
            run_id,
            staging,
            name=cfg.name,
            storage_root=storage_root,
            overrides=list(overrides),
            entrypoint=entrypoint,
            env={**cfg.resources.env, **(env or {})},
            address=url,
            code=code_version(),
        )
        client = connect(url)
        store = _create_run_record(cfg, run_id, storage_root, url, spec)
        job_id = _send(client, spec, url, store, run_id)
    log.info("submitted job %s (run %s) to %s", job_id, run_id, url)
    return job_id, run_id


def _create_run_record(
    cfg: Config, run_id: str, storage_root: str, url: str, spec: JobSpec
) -> RunStore | None:
    """The run's record, ``created`` with its job, when this machine sees the storage (else, or
    when that fails, None: the job's driver creates it)."""
    from workflows.state import RunStore, StateError

    if not _storage_visible_here(storage_root, url):
        return None
    try:
        store = RunStore(storage_root)
        store.create_run(
            cfg, run_id, address="auto", job={"submission_id": spec.submission_id, "address": url}
        )
    except (StateError, OSError) as err:
        log.warning("submit: the run record is left to the job (%s)", first_line(err))
        return None
    return store


def _send(client: Any, spec: JobSpec, url: str, store: RunStore | None, run_id: str) -> str:
    """Submit ``spec`` through ``client`` (which packs and uploads working_dir and py_modules
    before it returns); on a refusal the run record made for it is removed."""
    try:
        return str(client.submit_job(**spec.as_kwargs()))
    except Exception as err:  # the job server's refusals come as assorted exception types
        if store is not None:
            try:
                store.fs.delete_dir(store.run_dir(run_id))
            except OSError:
                pass
        if isinstance(err, ConnectionError):
            raise ConnectionError(f"submit: {url}: {first_line(err)}") from None
        raise RuntimeError(f"submit: {url} refused the job: {first_line(err)}") from None
