"""The search's plots: best val kNN per trial vs temperature and vs head depth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write
from workflows.tune.rows import TrialRow

__all__ = ["plot_rows"]

_GROUPS = (
    ("completed", "o", "tab:blue"),
    ("stopped_early", "x", "tab:red"),
    ("unfinished", ".", "tab:grey"),
)
_AXES = (
    ("temperature", "temperature (log scale)", True),
    ("head_depth", "projection-head depth", False),
)


def _group(row: TrialRow) -> str:
    return row.state if row.state in ("completed", "stopped_early") else "unfinished"


def _scatter(ax: Any, pts: list[TrialRow], name: str) -> None:
    for label, marker, colour in _GROUPS:
        sel = [r for r in pts if name in r.params and _group(r) == label]
        if sel:
            ax.scatter(
                [r.params[name] for r in sel],
                [r.best_knn for r in sel],
                marker=marker,
                c=colour,
                label=label.replace("_", " "),
            )


def _save(fig: Any, path: Path) -> None:
    """Save the figure atomically (a temporary file in the same folder, then a rename), in the
    format that the suffix of ``path`` names."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png"))


def plot_rows(rows: list[TrialRow], out: Path) -> list[str]:
    """val kNN (best per trial) vs temperature and vs head depth, as PNGs; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter

    pts = [r for r in rows if r.best_knn is not None]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, xlabel, logx in _AXES:
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        _scatter(ax, pts, name)
        if logx:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("best val kNN top-1 (%)")
        ax.set_title(f"val kNN vs {name.replace('_', ' ')}")
        if pts:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"knn_vs_{name}.png"
        _save(fig, path)
        plt.close(fig)
        paths.append(str(path))
    return paths
