"""Each training stage on digits, in one process (no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pipeline.config import Config, ConfigError, load_config
from pipeline.data import load_subset
from pipeline.models import count_params, load_model
from pipeline.runtime import LocalContext
from pipeline.slices import (
    DistillSlice,
    EvaluateSlice,
    PretrainSlice,
    ShardSlice,
    SupervisedSlice,
)
from pipeline.stages import distill, evaluate, finetune, pretrain
from pipeline.stages import shard as shard_stage
from pipeline.stages.common import knn_predict, load_data

FAST = [
    "pretrain.epochs=2",
    "pretrain.batch_size=64",
    "pretrain.max_steps_per_epoch=4",
    "pretrain.knn_every=1",
    "pretrain.knn_bank=300",
    "pretrain.knn_queries=100",
    "finetune.epochs=2",
    "finetune.min_steps=4",
    "distill.epochs=1",
    "evaluate.linear_epochs=3",
    "evaluate.embedding_samples=60",
]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    root = tmp_path_factory.mktemp("storage")
    torch.set_num_threads(1)
    return load_config("smoke", [*FAST, f"storage.root={root}"])


@pytest.fixture(scope="module")
def dataset(cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("dataset")
    result = shard_stage.run(ShardSlice.of(cfg), str(out))
    return result.outputs["dataset"]


@pytest.fixture(scope="module")
def pretrained(cfg: Config, dataset: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("pretrain")
    result = pretrain.run(PretrainSlice.of(cfg), {"dataset": dataset}, str(out))
    return result.outputs["model"]


def test_pretrain_writes_model_history_and_metrics(pretrained: str) -> None:
    model = load_model(pretrained)
    hist = json.loads(Path(pretrained).with_name("history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert 0.0 <= hist[-1]["val_knn_top1"] <= 100.0
    h, z = model(torch.zeros(2, 1, 8, 8))
    assert h.shape[0] == 2 and z.shape == (2, 32)


class _Interrupt(Exception):
    pass


class _StopAfter(LocalContext):
    """A LocalContext whose process 'dies' right after the first checkpoint is written."""

    def report(self, metrics, checkpoint=None):
        super().report(metrics, checkpoint)
        raise _Interrupt


def test_pretrain_resumes_from_checkpoint(cfg: Config, dataset: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupt):
        pretrain.run(
            PretrainSlice.of(cfg), {"dataset": dataset}, str(tmp_path / "out"), _StopAfter(ckpt)
        )
    saved = torch.load(ckpt / "latest.pt", weights_only=False)
    assert saved["epoch"] == 0
    ctx = LocalContext(ckpt)
    result = pretrain.run(PretrainSlice.of(cfg), {"dataset": dataset}, str(tmp_path / "out"), ctx)
    # Only the second epoch ran after the restart; the history still holds both.
    assert [m["epoch"] for m in ctx.reports] == [2]
    assert [h["epoch"] for h in result.history] == [1, 2]


def _with_consistency(cfg: Config, baseline: bool = False, align: bool = False) -> Config:
    c = cfg.model_copy(deep=True)
    c.finetune.consistency.epochs = 2
    c.finetune.consistency.batch_size = 128
    c.finetune.consistency.threshold = 0.2  # a two-epoch digits network is rarely sure
    c.finetune.consistency.baseline = baseline
    c.finetune.consistency.distribution_alignment = align
    return c


def test_finetune_consistency_trains_on_the_unlabeled_images(
    cfg: Config, dataset: str, pretrained: str, tmp_path: Path
) -> None:
    frac = cfg.finetune.label_fractions[0]
    inputs = {"dataset": dataset, "pretrain": pretrained}
    c = _with_consistency(cfg)
    result = finetune.run(SupervisedSlice.of(c), inputs, str(tmp_path / "c"), fraction=frac)
    hist = result.history
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert [h.get("consistency_epoch") for h in hist] == [None, None, 1, 2]
    for h in hist[2:]:
        assert 0.0 < h["mask_rate"] <= 100.0
        assert 0.0 <= h["pseudo_label_acc"] <= 100.0
        assert h["unlabeled_loss"] > 0.0
    assert "val_top1" in hist[-1] and "val_top1" not in hist[1]  # evaluated once, at the end
    assert result.metrics["val_top1"] == hist[-1]["val_top1"]
    # The same seed without the phase gives other weights.
    plain = finetune.run(SupervisedSlice.of(cfg), inputs, str(tmp_path / "plain"), fraction=frac)
    a = load_model(result.outputs["model"]).state_dict()
    b = load_model(plain.outputs["model"]).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # The baseline keeps to its labeled subset unless consistency.baseline says otherwise.
    base = finetune.run(
        SupervisedSlice.of(c, baseline=True),
        inputs,
        str(tmp_path / "b"),
        fraction=frac,
        baseline=True,
    )
    assert len(base.history) == 2
    c_base = _with_consistency(cfg, baseline=True)
    base = finetune.run(
        SupervisedSlice.of(c_base, baseline=True),
        inputs,
        str(tmp_path / "cb"),
        fraction=frac,
        baseline=True,
    )
    assert [h.get("consistency_epoch") for h in base.history] == [None, None, 1, 2]


class _StopAtConsistencyEpoch(LocalContext):
    """Dies right after the first consistency epoch's checkpoint is written."""

    def report(self, metrics, checkpoint=None):
        super().report(metrics, checkpoint)
        if metrics.get("consistency_epoch") == 1:
            raise _Interrupt


def test_finetune_consistency_resumes_without_redoing_the_supervised_part(
    cfg: Config, dataset: str, pretrained: str, tmp_path: Path
) -> None:
    frac = cfg.finetune.label_fractions[0]
    inputs = {"dataset": dataset, "pretrain": pretrained}
    c = _with_consistency(cfg, align=True)  # the alignment's running mean is checkpointed too
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupt):
        finetune.run(
            SupervisedSlice.of(c),
            inputs,
            str(tmp_path / "out"),
            _StopAtConsistencyEpoch(ckpt),
            fraction=frac,
        )
    saved = torch.load(ckpt / "latest.pt", weights_only=False)
    assert saved["phase"] == "consistency" and saved["align_running"].shape == (10,)
    ctx = LocalContext(ckpt)
    result = finetune.run(SupervisedSlice.of(c), inputs, str(tmp_path / "out"), ctx, fraction=frac)
    assert [m["epoch"] for m in ctx.reports] == [4]  # only the last consistency epoch re-ran
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    # Bit for bit the run that was never interrupted.
    whole = finetune.run(
        SupervisedSlice.of(c),
        inputs,
        str(tmp_path / "whole"),
        LocalContext(tmp_path / "ck2"),
        fraction=frac,
    )
    a = load_model(result.outputs["model"]).state_dict()
    b = load_model(whole.outputs["model"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_semisup_labels_only_on_the_subset(cfg: Config, dataset: str) -> None:
    semi = cfg.model_copy(deep=True)
    semi.pretrain.method = "semisup"
    train = load_data(dataset, "train")
    labels = pretrain.pretrain_labels(PretrainSlice.of(semi), dataset, train)
    keys, _ = load_subset(dataset, min(cfg.finetune.label_fractions))
    labeled = {k for k, y in zip(train.keys, labels.tolist(), strict=False) if y >= 0}
    assert labeled == set(keys)
    assert pretrain.pretrain_labels(PretrainSlice.of(cfg), dataset, train) is None  # simclr


def test_finetune_starts_from_pretrained_weights(
    cfg: Config, dataset: str, pretrained: str
) -> None:
    net = finetune.build_network(SupervisedSlice.of(cfg), 1, 10, pretrained)
    source = load_model(pretrained)
    src = source.encoder.state_dict()
    got = {
        k.removeprefix("backbone.encoder."): v
        for k, v in net.state_dict().items()
        if k.startswith("backbone.encoder.")
    }
    assert got and all(torch.equal(got[k], src[k]) for k in src)
    scratch = finetune.build_network(SupervisedSlice.of(cfg), 1, 10, None)
    assert count_params(scratch) == count_params(net)


@pytest.mark.parametrize("baseline", [False, True])
def test_finetune_and_baseline_train_a_classifier(
    cfg: Config, dataset: str, pretrained: str, tmp_path: Path, baseline: bool
) -> None:
    frac = cfg.finetune.label_fractions[0]
    result = finetune.run(
        SupervisedSlice.of(cfg, baseline=baseline),
        {"dataset": dataset, "pretrain": pretrained},
        str(tmp_path),
        fraction=frac,
        baseline=baseline,
    )
    model = load_model(result.outputs["model"])
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    keys, _ = load_subset(dataset, frac)
    assert result.metrics["labeled_images"] == len(keys)
    assert 0.0 <= result.metrics["val_top1"] <= 100.0


def test_distill_student_is_smaller_than_teacher(
    cfg: Config, dataset: str, pretrained: str, tmp_path: Path
) -> None:
    frac = cfg.finetune.label_fractions[0]
    teacher = finetune.run(
        SupervisedSlice.of(cfg),
        {"dataset": dataset, "pretrain": pretrained},
        str(tmp_path / "t"),
        fraction=frac,
    )
    result = distill.run(
        DistillSlice.of(cfg),
        {"dataset": dataset, "teacher": teacher.outputs["model"]},
        str(tmp_path / "s"),
        fraction=frac,
    )
    assert result.metrics["student_params"] < result.metrics["teacher_params"]
    student = load_model(result.outputs["model"])
    assert student(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_evaluate_report_has_every_number(
    cfg: Config, dataset: str, pretrained: str, tmp_path: Path
) -> None:
    inputs = {"dataset": dataset, "pretrain": pretrained}
    for p in cfg.finetune.label_fractions:
        name = f"{p:g}"
        ft = finetune.run(
            SupervisedSlice.of(cfg),
            {"dataset": dataset, "pretrain": pretrained},
            str(tmp_path / f"ft{name}"),
            fraction=p,
        )
        bl = finetune.run(
            SupervisedSlice.of(cfg, baseline=True),
            {"dataset": dataset},
            str(tmp_path / f"bl{name}"),
            fraction=p,
            baseline=True,
        )
        st = distill.run(
            DistillSlice.of(cfg),
            {"dataset": dataset, "teacher": ft.outputs["model"]},
            str(tmp_path / f"st{name}"),
            fraction=p,
        )
        inputs |= {
            f"finetune@{name}": ft.outputs["model"],
            f"baseline@{name}": bl.outputs["model"],
            f"distill@{name}": st.outputs["model"],
        }
    result = evaluate.run(EvaluateSlice.of(cfg), inputs, str(tmp_path / "eval"))
    report = json.loads(Path(result.outputs["report_json"]).read_text())
    assert report["dataset"] == "digits"
    for key in ("linear_full_top1", "knn_top1", "wall_seconds"):
        assert isinstance(report[key], float)
    assert set(report["fractions"]) == {f"{p:g}" for p in cfg.finetune.label_fractions}
    for row in report["fractions"].values():
        for key in ("baseline_top1", "finetune_top1", "student_top1", "linear_top1"):
            assert 0.0 <= row[key] <= 100.0
        assert row["student_params"] < row["teacher_params"]
    md = Path(result.outputs["report_md"]).read_text()
    assert "| labels |" in md and "SSL fine-tuned" in md
    for key in ("plot_label_efficiency", "plot_pretrain_loss", "plot_embeddings"):
        assert Path(result.outputs[key]).stat().st_size > 1000


def test_report_header_names_the_pseudo_labels() -> None:
    report = {"dataset": "digits", "fractions": {}, "test_images": 10}
    plain = evaluate.render_markdown(
        report, EvaluateSlice.of(load_config("demo", ["pretrain.pseudo_label_from_epoch=0"]))
    )
    assert "pretrain semisup τ=0.2 for 5 epochs" in plain and "pseudo" not in plain
    md = evaluate.render_markdown(report, EvaluateSlice.of(load_config("demo")))
    assert "pretrain semisup τ=0.2 (pseudo-labels from epoch 2, 60% of the unlabeled images)" in md


def test_report_header_names_the_consistency_phase() -> None:
    report = {"dataset": "digits", "fractions": {}, "test_images": 10}
    md = evaluate.render_markdown(
        report, EvaluateSlice.of(load_config("demo", ["finetune.consistency.epochs=0"]))
    )
    assert "FixMatch" not in md
    md = evaluate.render_markdown(
        report, EvaluateSlice.of(load_config("demo", ["finetune.consistency.epochs=3"]))
    )
    assert "trains 3 epochs on the unlabeled images too (FixMatch, threshold 0.95)" in md
    assert "the baseline sees only its labeled subset" in md


def test_knn_votes_by_weighted_neighbours() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scores = knn_predict(
        bank, labels, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), 2, k=2, temperature=0.1
    )
    assert scores.argmax(1).tolist() == [0, 1]
    # k=1 picks the single nearest neighbour's class with weight exp(sim / T).
    s1 = knn_predict(bank, labels, torch.tensor([[0.0, 1.0]]), 2, k=1, temperature=0.5)
    assert torch.allclose(s1, torch.tensor([[0.0, torch.exp(torch.tensor(2.0)).item()]]))


def test_labeled_images_are_mixed_into_every_pretrain_batch() -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor([3, 50, 70, 90])
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    mixed = pretrain._mix_labeled(idx, pool, 3, g)
    assert len(mixed) == len(idx) and len(set(mixed.tolist())) == len(idx)
    assert int(torch.isin(mixed, pool).sum()) >= 3
    everything = pretrain._mix_labeled(idx, pool, 10, g)  # k > pool: the whole pool
    assert set(pool.tolist()) <= set(everything.tolist()) and len(everything) == len(idx)


def test_pseudo_labels_take_the_nearest_prototype_for_the_confident_rows() -> None:
    # Two labeled rows per class on three directions; unlabeled rows near one of them, and two
    # rows half-way between classes 0 and 1 that no prototype claims with confidence.
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 5.0  # (3, 3)
    truth = torch.arange(3).repeat_interleave(10)  # (30,)
    feats = centres[truth] + 0.3 * torch.randn(30, 3, generator=g)
    feats = torch.cat([feats, torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.1, 0.0]])])  # (32, 3)
    labels = torch.full((32,), -1)
    labels[[0, 1, 10, 11, 20, 21]] = truth[[0, 1, 10, 11, 20, 21]]
    labels[labels == 2] = 7  # class ids are kept, not renumbered

    out = pretrain.pseudo_labels(feats, labels, fraction=0.75)
    unlabeled = labels < 0
    assert torch.equal(out[~unlabeled], labels[~unlabeled])  # labeled rows unchanged
    new = unlabeled & (out >= 0)
    # 26 unlabeled rows x 0.75 / 3 classes = 6 per predicted class: 18 in all, all correct.
    assert int(new.sum()) == 18
    want = torch.where(truth == 2, 7, truth)
    assert torch.equal(out[:30][new[:30]], want[new[:30]])
    assert not new[30:].any()  # the ambiguous rows are the least confident: left unlabeled
    everything = pretrain.pseudo_labels(feats, labels, fraction=1.0)
    assert int((unlabeled & (everything >= 0)).sum()) >= 24
    with pytest.raises(ValueError, match="fraction"):
        pretrain.pseudo_labels(feats, labels, fraction=0.0)
    with pytest.raises(ValueError, match="feature rows"):
        pretrain.pseudo_labels(feats[:5], labels, fraction=0.5)


def test_pretrain_pseudo_labels_from_the_chosen_epoch(dataset: str, tmp_path: Path) -> None:
    semi = load_config(
        "smoke",
        [*FAST, "pretrain.method=semisup", "pretrain.pseudo_label_from_epoch=2"],
    )
    result = pretrain.run(PretrainSlice.of(semi), {"dataset": dataset}, str(tmp_path))
    first, second = result.history
    assert "pseudo_labels" not in first
    train = load_data(dataset, "train")
    n_labeled = int((pretrain.pretrain_labels(PretrainSlice.of(semi), dataset, train) >= 0).sum())
    n_unlabeled = len(train) - n_labeled
    share = semi.pretrain.pseudo_label_fraction
    # Class-balanced: at most share x unlabeled rows, at least half of it (digits' prototypes).
    assert share * n_unlabeled / 2 <= second["pseudo_labels"] <= share * n_unlabeled
    assert 0.0 <= second["pseudo_label_acc"] <= 100.0
    assert result.metrics["pseudo_labels"] == second["pseudo_labels"]


def test_epoch_order_visits_every_row_once_per_pass() -> None:
    from pipeline.stages.supervised import epoch_order

    one = epoch_order(10, 10, seed=1)
    assert sorted(one.tolist()) == list(range(10))
    longer = epoch_order(10, 25, seed=1)  # min_steps longer than the data: cycles
    assert torch.equal(longer[:10], one)
    assert sorted(longer[10:20].tolist()) == list(range(10))
    assert not torch.equal(longer[10:20], one)  # a fresh shuffle each pass


def test_fit_sees_every_image_once_per_epoch(tmp_path) -> None:
    from pipeline.runtime import LocalContext
    from pipeline.stages.supervised import InMemory, SupervisedPlan, fit

    n = 24
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = torch.arange(n) % 3
    seen: list[int] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.extend(x[:, 0, 0, 0].tolist())
        return x.float()

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    plan = SupervisedPlan(epochs=2, batch_size=8, lr=1e-3, weight_decay=0.0)
    history = fit(
        model,
        InMemory(images, (labels,), record),
        torch.nn.functional.cross_entropy,
        plan,
        LocalContext(tmp_path / "ckpt"),
    )
    assert len(history) == 2
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:]) == list(range(n))
    assert seen[:n] != seen[n:]  # each epoch reshuffles


def test_encode_gives_the_same_features_for_a_channels_last_network() -> None:
    from pipeline.config import ModelConfig
    from pipeline.models import build_contrastive_model
    from pipeline.stages.common import encode

    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    section = ModelConfig(arch="resnet18", width=0.125, channels_last=False)
    plain = build_contrastive_model(section, in_channels=1).encoder
    fast = build_contrastive_model(section, in_channels=1).encoder
    fast.load_state_dict(plain.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    a, b = encode(plain, images, size=28, batch_size=16), encode(fast, images, size=28)
    assert a.shape == (40, plain.out_dim)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_baseline_lr_applies_to_the_baseline_only(cfg: Config) -> None:
    from pipeline.stages.finetune import plan_for

    same = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"lr": 1e-3})})
    assert (
        plan_for(SupervisedSlice.of(same, baseline=True), "b", 5.0).lr
        == plan_for(SupervisedSlice.of(same), "f", 5.0).lr
        == 1e-3
    )
    own = load_config("smoke", ["finetune.lr=0.001", "finetune.baseline_lr=0.03"])
    assert plan_for(SupervisedSlice.of(own), "f", 5.0).lr == 1e-3
    assert plan_for(SupervisedSlice.of(own, baseline=True), "b", 5.0).lr == 0.03
    with pytest.raises(ValueError, match="baseline_lr"):
        load_config("smoke", ["finetune.baseline_lr=-1"])


def test_baseline_lr_per_label_fraction() -> None:
    from pipeline.stages.finetune import plan_for

    c = load_config(
        "smoke",
        ["finetune.label_fractions=[0.1, 1]", "finetune.baseline_lr={0.1: 0.1, 1: 0.03}"],
    )
    assert plan_for(SupervisedSlice.of(c, baseline=True), "b", 0.1).lr == 0.1
    assert plan_for(SupervisedSlice.of(c, baseline=True), "b", 1.0).lr == 0.03
    assert (
        plan_for(SupervisedSlice.of(c), "f", 0.1).lr
        == plan_for(SupervisedSlice.of(c), "f", 1.0).lr
        == c.finetune.lr
    )
    fr = "finetune.label_fractions=[0.1, 1]"
    for bad, words in [
        ("{0.1: 0.1}", "missing [1.0]"),
        ("{0.1: 0.1, 1: 0}", "must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=r"^config error: finetune.*" + re.escape(words)):
            load_config("smoke", [fr, f"finetune.baseline_lr={bad}"])
    # a rate for a fraction that does not run is ignored: the demo with one of its two fractions
    one = load_config("demo", ["finetune.label_fractions=[0.1]"])
    assert plan_for(SupervisedSlice.of(one, baseline=True), "b", 0.1).lr == 0.1
    extra = load_config("smoke", [fr, "finetune.baseline_lr={0.1: 0.1, 1: 0.03, 10: 0.01}"])
    assert plan_for(SupervisedSlice.of(extra, baseline=True), "b", 1.0).lr == 0.03


def test_distill_hard_labels_are_int64_with_minus_one_for_unlabeled() -> None:
    from pipeline.stages.distill import _hard_labels

    got = _hard_labels(["a", "b", "c", "d"], {"b": 3, "d": 0})
    assert got.dtype == torch.int64 and got.tolist() == [-1, 3, -1, 0]


def test_knn_in_bank_blocks_equals_one_block():
    """The bank is scored in blocks with a running top k: the same scores as one block."""
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(1000, 16, generator=g), torch.randn(70, 16, generator=g)
    labels = torch.randint(0, 5, (1000,), generator=g)
    whole = knn_predict(bank, labels, query, 5, k=50, temperature=0.1, bank_chunk=1000)
    for chunk, bank_chunk in ((64, 128), (32, 7), (1024, 999)):
        blocks = knn_predict(
            bank, labels, query, 5, k=50, temperature=0.1, chunk=chunk, bank_chunk=bank_chunk
        )
        torch.testing.assert_close(blocks, whole)
    # fewer bank rows than k in a block, and k larger than the bank
    few = knn_predict(bank[:30], labels[:30], query, 5, k=50, bank_chunk=7)
    torch.testing.assert_close(few, knn_predict(bank[:30], labels[:30], query, 5, k=50))
