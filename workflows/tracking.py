"""MLflow tracking: one parent run per pipeline run, one nested child run per stage.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids — never the global
"active run" — so it works the same from the driver, from Ray tasks and from Ray Train workers.

* parent run: run name = our run id, tag ``pipeline_run_id``, params = the flattened config
  (dotted keys, e.g. ``pretrain.temperature``);
* child run per stage: tag ``mlflow.parentRunId`` (nesting), tags ``stage``, ``stage_kind``,
  ``cache_key``, ``upstream.<input>`` = the upstream stage's MLflow run id (lineage), params = the
  stage's config slice and its own params;
* datasets are logged as run inputs (``MlflowClient.log_inputs`` with a
  :class:`mlflow.entities.DatasetInput`), the equivalent of ``mlflow.log_input``;
* :class:`MetricsSink` is a picklable ``(metrics, step)`` callable for Ray Train workers.

The default tracking URI is ``cfg.tracking_uri()``: a SQLite file under ``storage.root``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from workflows.dag import StageNode

__all__ = ["MetricsSink", "Tracker", "TrackingError", "TrackingInfo", "flatten"]

_STATUS = {
    "FINISHED": "FINISHED",
    "FAILED": "FAILED",
    "KILLED": "KILLED",
    "RUNNING": "RUNNING",
    "SUCCEEDED": "FINISHED",
    "SKIPPED": "FINISHED",
}
_BAD_KEY = re.compile(r"[^\w\-. /:]")
#: The experiment tag that makes MLflow 3's UI open an experiment on its training runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: Entry point shown as the source of runs and logged models.
SOURCE_NAME = "contrastive run"
_MAX_PARAM = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """A tracking problem; ``str(err)`` is one line."""


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _key(name: str) -> str:
    """A metric / param / tag name MLflow accepts (alphanumerics, ``_ - . / : space``)."""
    return _BAD_KEY.sub("_", str(name))


def _value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= _MAX_PARAM else s[: _MAX_PARAM - 3] + "..."


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def is_count(key: str) -> bool:
    """Numbers a stage reports that are not curves: the epoch counter, parameter and image
    counts. They go to MLflow as params, not as metric charts."""
    return (
        key in ("epoch", "world_size", "resumed_from_epoch")
        or key.endswith(("params", "_images"))
        or key.startswith("num_")
    )


def _log_metrics(client: Any, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    ms = []
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or is_count(str(k)):
            continue
        v = float(v)
        if math.isnan(v) or math.isinf(v):
            continue  # not storable in every backend; the stage logs them itself if it wants
        ms.append(Metric(_key(k), v, ts, int(step)))
    for chunk in _chunks(ms, 1000):
        client.log_batch(run_id, metrics=chunk)


@dataclass(frozen=True)
class TrackingInfo:
    """What a stage (or a Ray Train worker) needs to log into its own MLflow run."""

    uri: str
    run_id: str
    parent_run_id: str | None = None
    experiment: str | None = None

    def sink(self) -> MetricsSink:
        return MetricsSink(self.uri, self.run_id)


class MetricsSink:
    """A picklable ``sink(metrics, step)`` that logs numeric metrics to one MLflow run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.uri, self.run_id, self._client = state["uri"], state["run_id"], None

    def __call__(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._client is None:
            self._client = _client(self.uri)
        _log_metrics(self._client, self.run_id, metrics, step)


class Tracker:
    """MLflow tracking for one experiment at one tracking URI."""

    def __init__(self, uri: str, experiment: str = "contrastive") -> None:
        if not uri:
            raise TrackingError("tracking error: tracking.uri is empty")
        if not experiment:
            raise TrackingError("tracking error: tracking.experiment is empty")
        self.uri = uri
        self.experiment = experiment
        self._experiment_id: str | None = None
        if uri.startswith("sqlite:///"):
            os.makedirs(
                os.path.dirname(os.path.abspath(uri[len("sqlite:///") :])) or ".", exist_ok=True
            )
        self.client = _client(uri)

    @classmethod
    def from_config(cls, cfg: Config, uri: str | None = None) -> Tracker | None:
        """A tracker for ``cfg`` (``uri`` overrides the config's), or None when tracking is off."""
        if not cfg.tracking.enabled:
            return None
        return cls(uri or cfg.tracking_uri(), cfg.tracking.experiment)

    # -- set-up ----------------------------------------------------------------------------
    def check_reachable(self, timeout: float = 3.0) -> None:
        """For an http(s) tracking server, raise a one-line error unless it answers quickly.

        Call it before any compute. Other URIs (sqlite, file, databricks) are not checked.
        """
        if not self.uri.startswith(("http://", "https://")):
            return
        url = self.uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http(s) only
                resp.read(64)
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                return  # reachable; authentication is MLflow's business
            raise TrackingError(
                f"tracking error: MLflow server {self.uri} answered HTTP {err.code} at /health"
            ) from None
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"tracking error: MLflow server {self.uri} is not reachable ({reason}); "
                "start it or set tracking.uri"
            ) from None

    @property
    def experiment_id(self) -> str:
        """The experiment's id, created on first use (tolerating a concurrent creator)."""
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment,
                        artifact_location=self._artifact_location(),
                        tags=dict([EXPERIMENT_KIND]),
                    )
                except Exception:
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                if exp.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"tracking error: experiment {self.experiment!r} is deleted; "
                        "restore it or choose another tracking.experiment"
                    )
                self._experiment_id = exp.experiment_id
                if EXPERIMENT_KIND[0] not in (exp.tags or {}):
                    self.client.set_experiment_tag(self._experiment_id, *EXPERIMENT_KIND)
        return self._experiment_id

    def run_link(self, run_id: str) -> str:
        """The MLflow UI's address of a run, relative to the UI's root (``#/experiments/...``)."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"

    def _artifact_location(self) -> str | None:
        """For a SQLite store, artifacts go next to the database (not into the working dir)."""
        if self.uri.startswith("sqlite:///"):
            db = os.path.abspath(self.uri[len("sqlite:///") :])
            return "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
        return None

    def info(self, run_id: str, parent_run_id: str | None = None) -> TrackingInfo:
        return TrackingInfo(self.uri, run_id, parent_run_id, self.experiment)

    # -- runs ------------------------------------------------------------------------------
    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        ps = [Param(_key(k), _value(v)) for k, v in params.items()]
        for chunk in _chunks(ps, 100):
            self.client.log_batch(run_id, params=chunk)

    def start_parent(self, run_id: str, cfg: Config, code: str | None = None) -> str:
        """Create the parent run for pipeline run ``run_id``; return its MLflow run id. ``code``:
        the run record's code label (tag ``code_commit``); None = this checkout's, read now."""
        import pipeline
        from workflows.state import code_label, code_version

        if code is None:
            code = code_label(code_version())
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{cfg.name}-{run_id}",
            tags={
                "pipeline_run_id": run_id,
                "pipeline_name": cfg.name,
                "pipeline_version": pipeline.__version__,
                "code_commit": code,  # abc1234[+changes-<hash>] or unknown
                "mlflow.source.name": f"{SOURCE_NAME} {cfg.name}",
                "mlflow.source.type": "LOCAL",
            },
        )
        self._log_params(run.info.run_id, flatten(cfg.to_dict()))
        return run.info.run_id

    def start_child(
        self,
        parent_id: str,
        node: StageNode,
        cache_key: str,
        upstream_mlflow_ids: Mapping[str, str],
        *,
        config_slice: Mapping[str, Any] | None = None,
        pipeline_run_id: str | None = None,
    ) -> str:
        """Create the nested run of one stage; return its MLflow run id.

        ``upstream_mlflow_ids`` maps the stage's input names to the upstream stages' MLflow run
        ids (tags ``upstream.<input>``); ``config_slice`` (the stage's config sections) and the
        node's params become the run's params.
        """
        tags = {
            "mlflow.parentRunId": parent_id,
            "stage": node.name,
            "stage_kind": node.kind,
            "cache_key": cache_key,
            "training": str(node.training).lower(),
        }
        if pipeline_run_id:
            tags["pipeline_run_id"] = pipeline_run_id
        tags["mlflow.source.name"] = f"{SOURCE_NAME}: stage {node.name}"
        tags["mlflow.source.type"] = "LOCAL"
        for dep, rid in upstream_mlflow_ids.items():
            tags[f"upstream.{_key(dep)}"] = rid
        if upstream_mlflow_ids:
            # the run's description (Markdown in the UI): its inputs as links to their runs
            links = ", ".join(
                f"[{dep}]({self.run_link(rid)})" for dep, rid in upstream_mlflow_ids.items()
            )
            tags["mlflow.note.content"] = f"Stage `{node.name}` ({node.kind}). Inputs: {links}."
        run = self.client.create_run(self.experiment_id, run_name=node.name, tags=tags)
        params = flatten(dict(config_slice or {}))
        params.update({f"stage.{k}": v for k, v in flatten(node.params).items()})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def resume_run(self, run_id: str) -> bool:
        """Mark an existing run RUNNING again (a resumed stage or pipeline); False if it is gone."""
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return False
        if run.info.lifecycle_stage == "deleted":
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log the numeric entries of ``metrics`` at ``step`` (others are ignored); counts
        (:func:`is_count`) become params ``result.<name>`` instead of charts."""
        _log_metrics(self.client, run_id, metrics, step)
        counts = {
            f"result.{k}": int(v) if float(v).is_integer() else v
            for k, v in metrics.items()
            if is_count(str(k)) and k != "epoch" and isinstance(v, (int, float))
        }
        if counts:
            self._log_params(run_id, counts)

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        """Upload a file or a folder as artifacts of ``run_id``."""
        if os.path.isdir(path):
            self.client.log_artifacts(run_id, path, artifact_path)
        elif os.path.isfile(path):
            self.client.log_artifact(run_id, path, artifact_path)
        else:
            raise TrackingError(f"tracking error: artifact {path} does not exist")

    def log_dataset(
        self,
        run_id: str,
        name: str,
        digest: str,
        source: str,
        num_rows: int | None = None,
        context: str = "training",
    ) -> None:
        """Record a dataset as an input of ``run_id`` (what ``mlflow.log_input`` does)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        source_type = source.split("://", 1)[0] if "://" in source else "local"
        profile = {"digest": digest}
        if num_rows is not None:
            profile["num_rows"] = int(num_rows)
        ds = Dataset(
            name=name,
            digest=digest[:36],  # MLflow stores at most 36 characters
            source_type=source_type,
            source=json.dumps({"uri": source}),
            profile=json.dumps(profile),
        )
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset=ds, tags=tags)])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, _key(k), _value(v))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run: FINISHED, FAILED or KILLED (also accepts succeeded/failed)."""
        s = _STATUS.get(str(status).upper())
        if s is None:
            raise TrackingError(
                f"tracking error: run status {status!r} is not FINISHED, FAILED or KILLED"
            )
        self.client.set_terminated(run_id, status=s)
