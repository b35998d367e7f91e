"""Evaluation on the test split and the label-efficiency report.

Linear probe on frozen representations h (fit on all train labels and on each label fraction),
weighted kNN (k=200, cosine, temperature-weighted votes; Wu et al. 2018), top-1/top-5 of every
fine-tuned model, baseline and student. Writes ``report.json``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn

from pipeline.atomic import atomic_write_text
from pipeline.data import dataset_info, format_fraction
from pipeline.models import count_params, load_model
from pipeline.runtime import StageResult, TrainContext
from pipeline.slices import EvaluateSlice
from pipeline.stages.common import (
    StreamSplit,
    accuracy,
    encode,
    fit_linear_probe,
    knn_predict,
    load_contrastive,
    load_data,
    seed_everything,
    subset_keys,
    use_memory,
    view_size,
    write_json,
)

log = logging.getLogger(__name__)

__all__ = ["render_markdown", "run"]


#: One label fraction's numbers: ``labeled_images``, ``linear_top1`` and, per model trained on it
#: (``finetune``, ``baseline``, ``student``), ``<role>_top1``, ``<role>_top5``, ``<role>_params``.
FractionRow = dict[str, float]


class Report(TypedDict, total=False):
    """``report.json``: the label-efficiency report (top-1 in %, parameter counts, seconds)."""

    dataset: str
    digest: str | None
    knn_top1: float
    linear_full_top1: float
    encoder_params: int
    fractions: dict[str, FractionRow]  # by formatted fraction, e.g. "0.1"
    test_images: int
    train_images: int
    eval_seconds: float
    wall_seconds: float
    plots: dict[str, str]  # plot name -> file name in the stage's folder


def _top(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"top1": accuracy(logits, labels, 1), "top5": accuracy(logits, labels, 5)}


@dataclass
class _Features:
    """The frozen encoder's features of train and test, and how to run another model on test."""

    train: torch.Tensor  # (N, D)
    train_labels: torch.Tensor
    train_keys: list[str]
    test: torch.Tensor  # (M, D)
    test_labels: torch.Tensor
    outputs_on_test: Callable[[nn.Module], torch.Tensor]


def _features(
    cfg: EvaluateSlice, ds: str, encoder: nn.Module, size: int, streaming: bool
) -> _Features:
    if streaming:  # features batch by batch; no image is held
        train_s, test_s = (
            StreamSplit(cfg.data, cfg.seed, ds, "train"),
            StreamSplit(cfg.data, cfg.seed, ds, "test"),
        )
        f_train, train_labels, train_keys = train_s.features(encoder, size)
        f_test, test_labels, _ = test_s.features(encoder, size)
        return _Features(
            f_train, train_labels, train_keys, f_test, test_labels,
            lambda m: test_s.features(m, size)[0],
        )  # fmt: skip
    train, test = load_data(ds, "train"), load_data(ds, "test")
    return _Features(
        encode(encoder, train.images, size=size),
        train.labels,
        train.keys,
        encode(encoder, test.images, size=size),
        test.labels,
        lambda m: encode(m, test.images, size=size),
    )


def _probe_top1(cfg: EvaluateSlice, feats: _Features, idx: torch.Tensor | None, k: int) -> float:
    """Top-1 (%) on test of a linear probe fit on the train rows ``idx`` (all when None)."""
    e = cfg.evaluate
    x = feats.train if idx is None else feats.train[idx]
    y = feats.train_labels if idx is None else feats.train_labels[idx]
    probe = fit_linear_probe(x, y, k, epochs=e.linear_epochs, lr=e.linear_lr, seed=cfg.seed)
    with torch.no_grad():
        return accuracy(probe(feats.test), feats.test_labels)


def _fraction_row(
    cfg: EvaluateSlice,
    inputs: dict[str, str],
    feats: _Features,
    p: float,
    k: int,
    device: torch.device,
) -> FractionRow:
    """One label fraction's row: the linear probe on its labels and every model trained on them."""
    name = format_fraction(p)
    keys = subset_keys(inputs["dataset"], p)
    pos = {key: i for i, key in enumerate(feats.train_keys)}
    idx = torch.tensor([pos[x] for x in keys])
    row: FractionRow = {
        "labeled_images": len(keys),
        "linear_top1": _probe_top1(cfg, feats, idx, k),
    }
    for role, key in (
        ("finetune", f"finetune@{name}"),
        ("baseline", f"baseline@{name}"),
        ("student", f"distill@{name}"),
    ):
        if key not in inputs:
            continue
        model = load_model(inputs[key], map_location=device)
        top = _top(feats.outputs_on_test(model), feats.test_labels)
        row[f"{role}_top1"], row[f"{role}_top5"] = top["top1"], top["top5"]
        row[f"{role}_params"] = count_params(model)
    if "finetune_params" in row:
        row["teacher_params"] = row["finetune_params"]
    return row


def run(
    cfg: EvaluateSlice,
    inputs: dict[str, str],
    out_dir: str,
    ctx: TrainContext | None = None,
    *,
    started_at: float | None = None,
) -> StageResult:
    """``inputs``: 'dataset', 'pretrain' and, per fraction p (formatted), 'finetune@p',
    'baseline@p', 'distill@p' (each a model file; any may be absent)."""
    t0 = time.perf_counter()
    ds = inputs["dataset"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    e = cfg.evaluate
    info = dataset_info(ds)
    size, classes = view_size(cfg.image_size, info), list(info["classes"])
    k = len(classes)
    streaming = not use_memory(cfg.data, info)
    report: Report = {
        "dataset": info.get("name", cfg.header.source),
        "digest": info.get("digest"),
    }
    device = ctx.device if ctx is not None else torch.device("cpu")  # where the models run
    encoder = load_contrastive(inputs["pretrain"], map_location=device).encoder
    feats = _features(cfg, ds, encoder, size, streaming)
    knn = knn_predict(
        feats.train, feats.train_labels, feats.test, k, k=e.knn_k, temperature=e.knn_temperature
    )
    report["knn_top1"] = accuracy(knn, feats.test_labels)
    report["linear_full_top1"] = _probe_top1(cfg, feats, None, k)
    report["encoder_params"] = count_params(encoder)
    fractions = {
        format_fraction(p): _fraction_row(cfg, inputs, feats, p, k, device)
        for p in cfg.label_fractions
    }
    report["fractions"] = fractions
    report["test_images"] = len(feats.test_labels)
    report["train_images"] = len(feats.train_labels)
    report["eval_seconds"] = time.perf_counter() - t0
    report["wall_seconds"] = (time.time() - started_at) if started_at else report["eval_seconds"]
    outputs = _write(cfg, inputs, report, feats, classes, out)
    metrics = {"knn_top1": report["knn_top1"], "linear_full_top1": report["linear_full_top1"]}
    metrics["data_streaming"] = float(streaming)
    for name, row in fractions.items():
        for key_, v in row.items():
            if key_.endswith("top1"):
                metrics[f"{key_}@{name}"] = v
    return StageResult(outputs=outputs, metrics=metrics, history=[])


def _write(
    cfg: EvaluateSlice,
    inputs: dict[str, str],
    report: Report,
    feats: _Features,
    classes: list[str],
    out: Path,
) -> dict[str, str]:
    """Plots, ``report.json``, ``report.md`` and ``report.html``; returns their paths."""
    outputs = {
        "report_json": str(out / "report.json"),
        "report_md": str(out / "report.md"),
        "report_html": str(out / "report.html"),
    }
    plots = _plots(cfg, inputs, report, feats.test, feats.test_labels, classes, out)
    outputs.update(plots)
    report["plots"] = {k_: Path(v).name for k_, v in plots.items()}
    write_json(outputs["report_json"], report)
    atomic_write_text(outputs["report_md"], render_markdown(report, cfg))
    atomic_write_text(outputs["report_html"], render_html(report, cfg, out))
    return outputs


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _header_lines(cfg: EvaluateSlice) -> list[str]:
    """The report's lines on the encoder, its pretraining and the consistency phase."""
    h = cfg.header
    lines = [
        f"Encoder {h.arch} ×{h.width:g}"
        + (f" (stem stride {h.stem_stride})" if h.stem_stride != 1 else "")
        + f", head depth {h.head_depth}, pretrain {h.method} τ={h.temperature:g}"
        + (
            f" (pseudo-labels from epoch {h.pseudo_label_from_epoch}, "
            f"{h.pseudo_label_fraction:.0%} of the unlabeled images)"
            if h.pseudo_label_from_epoch
            else ""
        )
        + f" for {h.epochs} epochs, batch {h.batch_size}; seed {cfg.seed}.",
    ]
    if h.consistency_epochs:
        lines.append(
            f"Fine-tuning then trains {h.consistency_epochs} epochs on the unlabeled images too "
            f"(FixMatch, threshold {h.consistency_threshold:g}); the baseline "
            + ("does the same." if h.consistency_baseline else "sees only its labeled subset.")
        )
    return [*lines, ""]


def render_markdown(report: Report, cfg: EvaluateSlice | None = None) -> str:
    """The label-efficiency table: rows = label fraction, columns = baseline, SSL fine-tuned,
    student, linear probe, kNN, parameter counts."""
    lines = [f"# Label-efficiency report — {report['dataset']}", ""]
    if cfg is not None:
        lines += _header_lines(cfg)
    lines += [
        f"Top-1 accuracy (%) on the test split ({report.get('test_images', '?')} images).",
        "",
        "| labels | labeled images | baseline (scratch) | SSL fine-tuned | Δ vs baseline "
        "| student | linear probe | kNN | teacher params | student params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["fractions"].items():
        delta = None
        if row.get("finetune_top1") is not None and row.get("baseline_top1") is not None:
            delta = row["finetune_top1"] - row["baseline_top1"]
        lines.append(
            f"| {name}% | {row.get('labeled_images')} | {_fmt(row.get('baseline_top1'))} | "
            f"{_fmt(row.get('finetune_top1'))} | "
            f"{'–' if delta is None else f'{delta:+.1f}'} | {_fmt(row.get('student_top1'))} | "
            f"{_fmt(row.get('linear_top1'))} | {_fmt(report.get('knn_top1'))} | "
            f"{_fmt(row.get('teacher_params'))} | {_fmt(row.get('student_params'))} |"
        )
    lines += [
        f"| 100% (linear probe) | {report.get('train_images')} | | | | | "
        f"{_fmt(report.get('linear_full_top1'))} | | | |",
        "",
        f"kNN: k={cfg.evaluate.knn_k if cfg else 200}, cosine, temperature-weighted. "
        f"Wall time of the run: {report.get('wall_seconds', 0):.0f} s.",
        "",
    ]
    for key, fname in report.get("plots", {}).items():
        lines.append(f"![{key}]({fname})")
    return "\n".join(lines) + "\n"


def render_html(report: Report, cfg: EvaluateSlice | None, folder: Path) -> str:
    """The report as one self-contained HTML page (plots embedded), which MLflow's artifact
    viewer and any browser show as it is."""
    import base64
    import html

    md = render_markdown(report, cfg)
    body: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if not table:
            return
        head, *rows = table
        body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>")
        body.extend("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
        body.append("</table>")
        table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        flush_table()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("![") and "](" in line:
            alt, src = line[2:].split("](", 1)
            path = folder / src.rstrip(")")
            if path.is_file():
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = (
        "body{font-family:sans-serif;margin:1.5em;max-width:70em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:right}img{max-width:32em;margin:.5em 1em .5em 0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report['dataset'])}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def plot_label_efficiency(report: Report, path: Path) -> str:
    """Top-1 against the labeled fraction (log axis, ticks in %) for every network, the kNN line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["fractions"]
    xs = [float(n) for n in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for role, label in (
        ("baseline", "supervised from scratch"),
        ("finetune", "SSL fine-tuned"),
        ("student", "distilled student"),
        ("linear", "linear probe"),
    ):
        ys = [rows[n].get(f"{role}_top1") for n in rows]
        if any(y is not None for y in ys):
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=label)
    ax.axhline(report["knn_top1"], ls="--", color="grey", label="kNN (all labels)")
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g} %"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labeled fraction of train")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Label efficiency — {report['dataset']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _plots(
    cfg: EvaluateSlice,
    inputs: dict[str, str],
    report: Report,
    f_test: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    out: Path,
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths: dict[str, str] = {}
    paths["plot_label_efficiency"] = plot_label_efficiency(report, out / "label_efficiency.png")

    hist_path = Path(inputs["pretrain"]).with_name("history.json")
    if hist_path.is_file():
        hist = json.loads(hist_path.read_text())
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.plot([h["epoch"] for h in hist], [h["loss"] for h in hist], marker=".")
        ax.set_xlabel("epoch")
        ax.set_ylabel("contrastive loss")
        ax.set_title("Pretraining loss")
        fig.tight_layout()
        paths["plot_pretrain_loss"] = str(out / "pretrain_loss.png")
        fig.savefig(paths["plot_pretrain_loss"], dpi=120)
        plt.close(fig)

    n = min(cfg.evaluate.embedding_samples, len(f_test))
    if n >= 10:
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(f_test), generator=g)[:n]
        emb = _embed_2d(f_test[idx].numpy(), cfg.seed)
        fig, ax = plt.subplots(figsize=(5.5, 5))
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=labels[idx].numpy(), cmap="tab10", s=4)
        handles = sc.legend_elements()[0]
        ax.legend(
            handles,
            [classes[i] for i in sorted(set(labels[idx].tolist()))],
            fontsize=6,
            markerscale=0.8,
            loc="best",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("Test embeddings (t-SNE of h)")
        fig.tight_layout()
        paths["plot_embeddings"] = str(out / "embeddings.png")
        fig.savefig(paths["plot_embeddings"], dpi=120)
        plt.close(fig)
    return paths


def _embed_2d(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = PCA(n_components=min(32, x.shape[1], x.shape[0])).fit_transform(x)
    perplexity = float(min(30, max(5, (x.shape[0] - 1) // 3)))
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(
        x
    )
