"""What a running pipeline shows: live progress on a terminal, one line per stage event off it,
and a log file per stage.

* :class:`ProgressBoard` is a small Ray actor (no CPUs) that holds the latest per-epoch metrics of
  every stage. Training workers reach it through :class:`ProgressSink`, which wraps the MLflow
  metrics sink the stage already calls once per epoch, so progress travels from any node of the
  cluster to the driver without a second reporting path in ``pipeline/``.
* :class:`ProgressDisplay` runs in the driver. On a terminal it draws one tqdm bar per running
  stage (epoch/total, images/s, the key metric, tqdm's elapsed time and ETA) and prints the
  runner's stage start/end lines above the bars. Off a terminal (CI, ``ray job logs``) it draws
  nothing: the runner's log lines (one per stage start and end) are the output.
* :class:`StageLog` sends everything a process writes to its stdout/stderr (Python, C++ and
  child-process output alike) into ``<run>/stages/<stage>/stage.log`` while a stage runs, and
  :class:`LoggedStageFn` does the same around a stage function inside its Ray worker.
  ``contrastive logs RUN_ID [STAGE]`` prints these files.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "LOG_FILE",
    "LoggedStageFn",
    "ProgressBoard",
    "ProgressDisplay",
    "ProgressSink",
    "StageLog",
    "make_board",
    "stage_epochs",
]

log = logging.getLogger(__name__)

#: The per-stage log file, in the stage's folder.
LOG_FILE = "stage.log"
_RATE_KEYS = ("images_per_s", "views_per_s")
_METRIC_KEYS = ("val_top1", "val_knn_top1", "mask_rate", "loss")


# -- per-stage log files --------------------------------------------------------------------


class StageLog:
    """Redirect this process's file descriptors 1 and 2 into ``path`` (appending) while open.

    Works at the descriptor level so that output of C extensions and child processes lands in the
    file too; Python's buffered streams are flushed before each switch. A Ray worker runs one task
    at a time, so redirecting the process for the duration of a stage is safe there.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._saved: list[int] = []
        self._fd: int | None = None
        self._streams: tuple[Any, Any] = (sys.stdout, sys.stderr)
        self._text: Any = None

    def __enter__(self) -> StageLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(self._fd, 1)
        os.dup2(self._fd, 2)
        # Python-level streams too, for when sys.stdout is not fd 1 (a captured or wrapped stream)
        self._streams = (sys.stdout, sys.stderr)
        self._text = open(os.dup(self._fd), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        sys.stdout = sys.stderr = self._text
        return self

    def __exit__(self, *exc: Any) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = self._streams
        self._text.close()
        for fd, saved in zip((1, 2), self._saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        if self._fd is not None:
            os.close(self._fd)
        self._saved, self._fd = [], None


class LoggedStageFn:
    """A picklable stage function whose worker output goes to the stage's log file."""

    def __init__(self, fn: Callable[..., Any], log_path: str) -> None:
        self.fn = fn
        self.log_path = log_path
        # what Ray Train and the task runner use to name things
        self.__name__ = getattr(fn, "__name__", "stage")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with StageLog(self.log_path):
            return self.fn(*args, **kwargs)


# -- progress from the workers to the driver ------------------------------------------------


class ProgressBoard:
    """The actor behind :func:`make_board`: the latest metrics and report time of each stage."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, Any]] = {}

    def update(self, stage: str, metrics: dict[str, float], step: int) -> None:
        self.latest[stage] = {"metrics": dict(metrics), "epoch": int(step), "time": time.time()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.latest


def make_board() -> Any:
    """A fresh :class:`ProgressBoard` actor on the driver's node (or None if Ray cannot)."""
    import ray

    try:
        return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()
    except Exception as err:  # progress is a convenience; never the end of a run
        log.debug("no progress board: %s", err)
        return None


class ProgressSink:
    """``sink(metrics, step)``: forward a stage's epoch metrics to the board, then to ``inner``
    (the MLflow sink, or None). Picklable; a failure to reach the board is ignored."""

    def __init__(self, board: Any, stage: str, inner: Callable[..., Any] | None = None) -> None:
        self.board = board
        self.stage = stage
        self.inner = inner

    def __call__(self, metrics: Mapping[str, Any], step: int) -> None:
        try:
            self.board.update.remote(self.stage, dict(metrics), int(step))
        except Exception:
            pass
        if self.inner is not None:
            self.inner(metrics, step)


def stage_epochs(cfg: Any, kind: str) -> int | None:
    """How many epochs a stage of ``kind`` reports (None: it reports none, e.g. shard)."""
    c = cfg.finetune.consistency
    if kind == "pretrain":
        return int(cfg.pretrain.epochs)
    if kind == "finetune":
        return int(cfg.finetune.epochs) + int(c.epochs)
    if kind == "baseline":
        return int(cfg.finetune.epochs) + (int(c.epochs) if c.baseline else 0)
    if kind == "distill":
        return int(cfg.distill.epochs)
    return None


# -- the driver's display -------------------------------------------------------------------


def _fmt_metric(metrics: Mapping[str, Any]) -> str:
    parts = []
    for k in _RATE_KEYS:
        if isinstance(metrics.get(k), (int, float)):
            parts.append(f"{metrics[k]:,.0f} img/s")
            break
    for k in _METRIC_KEYS:
        if isinstance(metrics.get(k), (int, float)):
            parts.append(f"{k}={metrics[k]:.4g}")
            break
    return ", ".join(parts)


def _has_width() -> bool:
    """Whether the terminal reports a width (a pty without a size reports 0 columns, and tqdm
    would then draw nothing)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):
        return False


class _TqdmHandler(logging.Handler):
    """Log records printed above the bars (``tqdm.write``), in the root handler's format."""

    def __init__(self, fmt: logging.Formatter | None) -> None:
        super().__init__()
        if fmt is not None:
            self.setFormatter(fmt)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class ProgressDisplay:
    """Live bars for the stages of one run (terminal only); use as a context manager.

    ``kinds`` maps stage names to their kinds (for the epoch totals). Bars appear when a stage
    first reports and close when the runner logs its end.
    """

    def __init__(
        self,
        board: Any,
        cfg: Any,
        kinds: Mapping[str, str],
        interval: float = 0.5,
        enabled: bool | None = None,
    ) -> None:
        self.board = board
        self.cfg = cfg
        self.kinds = dict(kinds)
        self.interval = interval
        if enabled is None:  # a terminal, unless tqdm is switched off there
            enabled = sys.stderr.isatty() and not os.environ.get("TQDM_DISABLE")
        self.enabled = enabled and board is not None
        self._bars: dict[str, Any] = {}
        self._done: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []
        self._lock = threading.Lock()

    # the runner announces stage ends through logging; close their bars then
    def _watch(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith("stage %s") and isinstance(record.args, tuple) and record.args:
            name = str(record.args[0])
            if " finished" in msg or " failed" in msg or " skipped" in msg or " reused" in msg:
                self._close(name)
        return True

    def _close(self, name: str) -> None:
        with self._lock:
            self._done.add(name)
            bar = self._bars.pop(name, None)
        if bar is not None:
            bar.close()

    def __enter__(self) -> ProgressDisplay:
        if not self.enabled:
            return self
        root = logging.getLogger()
        for h in list(root.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                new = _TqdmHandler(h.formatter)
                new.setLevel(h.level)
                root.removeHandler(h)
                root.addHandler(new)
                self._swapped.append((h, new))
        logging.getLogger("workflows.runner").addFilter(self._watch)
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for name in list(self._bars):
            self._close(name)
        logging.getLogger("workflows.runner").removeFilter(self._watch)
        root = logging.getLogger()
        for old, new in self._swapped:
            root.removeHandler(new)
            root.addHandler(old)

    def _loop(self) -> None:
        import ray

        while not self._stop.wait(self.interval):
            try:
                snap = ray.get(self.board.snapshot.remote(), timeout=5)
            except Exception:
                continue
            self.render(snap)

    def render(self, snap: Mapping[str, Mapping[str, Any]]) -> None:
        """Update the bars from a board snapshot (one bar per stage that reported)."""
        from tqdm import tqdm

        for name, entry in snap.items():
            with self._lock:
                if name in self._done:
                    continue
                bar = self._bars.get(name)
                if bar is None:
                    total = stage_epochs(self.cfg, self.kinds.get(name, ""))
                    bar = tqdm(
                        total=total,
                        desc=f"{name:<12}",
                        unit="ep",
                        file=sys.stderr,
                        leave=False,
                        disable=False,  # the display itself decides (self.enabled)
                        dynamic_ncols=_has_width(),
                        ncols=None if _has_width() else 120,
                        nrows=None if _has_width() else 40,
                        bar_format="{desc} {n_fmt}/{total_fmt} ep [{elapsed}<{remaining}]{postfix}",
                    )
                    self._bars[name] = bar
            epoch = int(entry.get("epoch", 0))
            if bar.total is not None and epoch > bar.total:
                bar.total = epoch
            if epoch > bar.n:
                bar.update(epoch - bar.n)
            bar.set_postfix_str(_fmt_metric(entry.get("metrics", {})), refresh=True)
