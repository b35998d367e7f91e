"""What a finished run leaves for a reader: the label-efficiency table on the terminal, and the
parent MLflow run's report, plot and lineage.

The parent run receives ``report/`` (``report.html`` with the plots embedded, ``report.md``,
``report.json``, the plots) and ``lineage.md``: each stage, its kind, its inputs (the upstream
stages, linked to the MLflow runs that produced them), its own MLflow run, cache key and output
digest. Its description (Markdown in the MLflow UI) holds the same table and lineage, so both are
on the run's first page.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from workflows.dag import Graph
from workflows.state import RunStore

__all__ = ["label_table", "lineage_markdown", "log_parent_summary", "read_report"]


def read_report(store: RunStore, run_id: str) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The evaluate stage's ``report.json`` (or None) and its output paths."""
    m = store.read_manifest(run_id, "evaluate") or {}
    outputs = dict(m.get("outputs", {}))
    path = outputs.get("report_json")
    if not path:
        return None, outputs
    try:
        fs, p = store.fs, path
        if "://" in path:
            import pyarrow.fs as pafs

            fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(p) as f:
            return json.loads(f.read().decode()), outputs
    except (OSError, ValueError):
        return None, outputs


def _f(v: Any, sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.1f}" if sign else f"{v:.1f}"


def label_table(report: dict[str, Any], markdown: bool = False) -> str:
    """Top-1 per label fraction: baseline, fine-tuned, their difference, student, linear probe."""
    header = ["labels", "images", "baseline", "fine-tuned", "Δ", "student", "linear probe"]
    rows = []
    for name, r in report.get("fractions", {}).items():
        ft, base = r.get("finetune_top1"), r.get("baseline_top1")
        delta = ft - base if ft is not None and base is not None else None
        rows.append(
            [
                f"{name} %",
                str(r.get("labeled_images", "-")),
                _f(base),
                _f(ft),
                _f(delta, sign=True),
                _f(r.get("student_top1")),
                _f(r.get("linear_top1")),
            ]
        )
    foot = (
        f"kNN (all labels) {_f(report.get('knn_top1'))}, linear probe (all labels) "
        f"{_f(report.get('linear_full_top1'))}; top-1 % on {report.get('test_images', '?')} "
        "test images"
    )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + f"\n\n{foot}.\n"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(header), *map(fmt, rows), foot])


def lineage_markdown(store: RunStore, run_id: str, graph: Graph, link: Any = None) -> str:
    """A Markdown table of the run's stages: inputs and MLflow runs as links (``link(run_id)``
    gives a run's address; None: plain ids)."""
    manifests = {n.name: store.read_manifest(run_id, n.name) or {} for n in graph}
    states = store.stage_states(run_id)

    def run_ref(name: str) -> str:
        rid = manifests.get(name, {}).get("mlflow_run_id") or getattr(
            states.get(name), "mlflow_run_id", None
        )
        if not rid:
            return name
        return f"[{name}]({link(rid)})" if link else f"{name} ({rid})"

    lines = [
        f"# Lineage of run {run_id}",
        "",
        "| stage | kind | state | inputs (stage that produced them) | MLflow run "
        "| cache key | output digest |",
        "|---|---|---|---|---|---|---|",
    ]
    for node in graph:
        m, st = manifests[node.name], states.get(node.name)
        inputs = ", ".join(f"{dep}: {run_ref(up)}" for dep, up in node.deps.items()) or "-"
        state = getattr(st, "state", "pending") + (" (reused)" if m.get("reused_from") else "")
        lines.append(
            f"| {node.name} | {node.kind} | {state} | {inputs} | {run_ref(node.name)} "
            f"| `{str(m.get('cache_key', '-'))[:12]}` | `{str(m.get('digest', '-'))[:12]}` |"
        )
    return "\n".join(lines) + "\n"


def log_parent_summary(
    tracker: Any, store: RunStore, run_id: str, parent_id: str, graph: Graph
) -> None:
    """Report, plot and lineage as artifacts and description of the parent run ``parent_id``."""
    report, outputs = read_report(store, run_id)
    lineage = lineage_markdown(store, run_id, graph, tracker.run_link)
    with tempfile.TemporaryDirectory(prefix="contrastive-summary-") as tmp:
        lpath = Path(tmp) / "lineage.md"
        lpath.write_text(lineage)
        tracker.log_artifact(parent_id, str(lpath))
        for key, path in outputs.items():
            if key.startswith(("report_", "plot_")) and store.is_local and os.path.isfile(path):
                tracker.log_artifact(parent_id, path, "report")
    if report is not None:  # the headline numbers as the pipeline run's metrics, comparable
        nums = {
            "knn_top1": report.get("knn_top1"),
            "linear_full_top1": report.get("linear_full_top1"),
        }
        for frac, row in report.get("fractions", {}).items():
            for role in ("baseline", "finetune", "student", "linear"):
                nums[f"{role}_top1@{frac}"] = row.get(f"{role}_top1")
            if row.get("finetune_top1") is not None and row.get("baseline_top1") is not None:
                nums[f"delta@{frac}"] = row["finetune_top1"] - row["baseline_top1"]
        tracker.log_metrics(parent_id, {k: v for k, v in nums.items() if v is not None})
    parts = []
    if report is not None:
        parts += [
            f"## Label efficiency — {report.get('dataset', '')}",
            "",
            label_table(report, True),
        ]
        parts += ["Report and plots: artifacts `report/report.html` and `report/`.", ""]
    parts.append(lineage.replace("# Lineage", "## Lineage", 1))
    tracker.set_tags(parent_id, {"mlflow.note.content": "\n".join(parts)})
