"""Config validation: every bad value is a one-line error naming the dotted field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_hash,
    load_config,
    parse_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "workflows" / "configs"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("pretrain.temperature=0", "pretrain.temperature"),
        ("pretrain.temperature=-0.5", "pretrain.temperature"),
        ("finetune.label_fractions=[0, 10]", "finetune.label_fractions"),
        ("finetune.label_fractions=[1, 150]", "finetune.label_fractions"),
        ("pretrain.batch_size=1", "pretrain.batch_size"),
        ("pretrain.epochs=0", "pretrain.epochs"),
        ("model.head_depth=0", "model.head_depth"),
        ("model.head_depth=5", "model.head_depth"),
        ("augment.strength=-0.1", "augment.strength"),
        ("pretrain.method=byol", "pretrain.method"),
        ("pretrain.epochs=abc", "pretrain.epochs"),
        ("data.source=imagenet", "data.source"),
        ("pretrain.temprature=0.1", "pretrain.temprature"),
        ("bogus.key=1", "bogus"),
        ("tune.temperature=[2, 1]", "tune.temperature"),
        ("finetune.from_head_layer=4", "finetune.from_head_layer"),
        ("pretrain.pseudo_label_from_epoch=1", "pretrain.pseudo_label_from_epoch"),  # simclr
        ("pretrain.pseudo_label_fraction=0", "pretrain.pseudo_label_fraction"),
        ("finetune.consistency.threshold=0", "finetune.consistency.threshold"),
        ("finetune.consistency.epochs=-1", "finetune.consistency.epochs"),
        ("finetune.consistency.strenght=1", "finetune.consistency.strenght"),
    ],
)
def test_bad_value_is_one_line_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(apply_overrides({}, [override]))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"config error: {field}:"), msg


def test_pseudo_labels_after_the_last_epoch_is_an_error() -> None:
    over = ["pretrain.method=semisup", "pretrain.epochs=3", "pretrain.pseudo_label_from_epoch=4"]
    with pytest.raises(ConfigError, match=r"pseudo_label_from_epoch: 4 is after the last epoch"):
        parse_config(apply_overrides({}, over))
    parse_config(apply_overrides({}, [*over[:2], "pretrain.pseudo_label_from_epoch=3"]))


def test_unknown_key_says_unknown() -> None:
    with pytest.raises(ConfigError, match=r"pretrain\.lrr: unknown key"):
        parse_config({"pretrain": {"lrr": 1}})


def test_overrides_parse_yaml_values() -> None:
    raw = apply_overrides(
        {"pretrain": {"epochs": 3}},
        ["pretrain.epochs=7", "pretrain.bf16=true", "finetune.label_fractions=[0.1, 1]"],
    )
    cfg = parse_config(raw)
    assert cfg.pretrain.epochs == 7 and cfg.pretrain.bf16 is True
    assert cfg.finetune.label_fractions == [0.1, 1.0]


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["pretrain.epochs"])


@pytest.mark.parametrize("name", ["smoke", "demo", "simclrv2"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert Path(cfg.storage.root).is_absolute()


def test_simclrv2_config_is_the_papers_recipe() -> None:
    """The shipped SimCLRv2 config: 3-layer head ending in batch norm, fine-tuning from its first
    layer, LARS with the square-root rule (4.8 at batch 4096, as in the paper)."""
    from pipeline.optim import scale_lr

    cfg = load_config(CONFIGS / "simclrv2.yaml")
    assert cfg.model.head_depth == 3 and cfg.model.head_last_bn
    assert cfg.finetune.from_head_layer == 1
    assert cfg.pretrain.optimizer == "lars" and cfg.pretrain.lr_scaling == "sqrt"
    assert cfg.pretrain.lr is None
    lr = scale_lr(cfg.pretrain.base_lr, cfg.pretrain.batch_size, cfg.pretrain.lr_scaling)
    assert lr == pytest.approx(4.8)


def test_renamed_distill_alpha_names_its_replacement() -> None:
    with pytest.raises(
        ConfigError, match=r"distill\.alpha: unknown key; it is now distill\.label_weight"
    ):
        parse_config({"distill": {"alpha": 0.5}})


def test_shipped_config_by_name_and_missing_file(tmp_path: Path) -> None:
    assert load_config("smoke").name == "smoke"
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_round_trip_and_hash_stability() -> None:
    cfg = load_config("smoke")
    again = parse_config(cfg.to_dict())
    assert again == cfg
    assert config_hash(cfg.section("pretrain")) == config_hash(again.section("pretrain"))
    changed = parse_config(apply_overrides(cfg.to_dict(), ["pretrain.temperature=0.3"]))
    assert config_hash(changed.section("pretrain")) != config_hash(cfg.section("pretrain"))


def test_default_tracking_uri_is_sqlite_under_storage(tmp_path: Path) -> None:
    cfg = load_config(None, [f"storage.root={tmp_path}"])
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"


def test_per_stage_resources_override_only_their_stage() -> None:
    cfg = load_config(
        "demo",
        ["resources.stages={distill: {cpus_per_worker: 1, torch_threads: 1}}"],
    )
    assert cfg.resources.cpus_per_worker == 2
    distill = cfg.resources.for_stage("distill")
    assert (distill.cpus_per_worker, distill.torch_threads) == (1, 1)
    assert distill.num_workers == cfg.resources.num_workers  # unset fields keep the default
    assert cfg.resources.for_stage("pretrain").cpus_per_worker == 2
    with pytest.raises(ConfigError, match=r"^config error: resources\.stages\.distil\b"):
        load_config("demo", ["resources.stages={distil: {torch_threads: 1}}"])


def test_stage_executor_hands_each_stage_its_own_resources(monkeypatch, tmp_path: Path) -> None:
    import workflows.train
    from workflows.dag import build_graph
    from workflows.stages import StageExecutor

    seen: dict[str, tuple[float, int | None]] = {}

    def fake(fn, settings, resources, inputs, out_dir, **kw):  # records what it would run with
        seen[out_dir] = (resources.cpus_per_worker, resources.torch_threads)
        # the stage function's slice holds the same resolved resources
        assert (settings.resources.cpus_per_worker, settings.resources.torch_threads) == seen[
            out_dir
        ]
        raise RuntimeError("stop here")

    monkeypatch.setattr(workflows.train, "run_training_stage", fake)
    cfg = load_config(
        "smoke",
        [
            "resources.cpus_per_worker=2",
            "resources.torch_threads=2",
            "resources.stages={finetune: {cpus_per_worker: 1, torch_threads: 1}}",
        ],
    )
    nodes = {n.kind: n for n in build_graph(cfg)}
    executor = StageExecutor(cfg)
    for kind in ("finetune", "pretrain"):
        with pytest.raises(RuntimeError, match="stop here"):
            executor(nodes[kind], {}, str(tmp_path / kind))
    assert seen[str(tmp_path / "finetune")] == (1, 1)
    assert seen[str(tmp_path / "pretrain")] == (2, 2)


def test_worker_threads_default_to_one_per_whole_cpu() -> None:
    unset = "resources.torch_threads=null"
    assert load_config("smoke", [unset, "resources.cpus_per_worker=2.5"]).resources.threads == 2
    assert load_config("smoke", [unset, "resources.cpus_per_worker=0.5"]).resources.threads == 1
    cfg = load_config("smoke", ["resources.cpus_per_worker=2", "resources.torch_threads=3"])
    assert cfg.resources.threads == 3


@pytest.mark.parametrize("value", ["probe", "random"])
def test_finetune_classifier_init_is_removed(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"finetune": {"classifier_init": value}})
    msg = str(e.value)
    assert msg.startswith("config error: finetune.classifier_init: removed;") and "\n" not in msg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "webdataset", "test_urls": "t.tar"}, "data.train_urls: required"),
        ({"source": "webdataset", "train_urls": "a.tar"}, "data.test_urls: required"),
        ({"source": "webdataset", "train_urls": [], "test_urls": "t"}, "at least one shard URL"),
        ({"train_urls": "a.tar"}, "data.train_urls: only for source webdataset"),
        ({"label_key": "json:"}, "data.label_key: json: needs a field name"),
        ({"image_keys": ["a.b"]}, "data.image_keys: 'a.b' is not a member extension"),
        ({"max_side": 64}, "data.max_side: only for source image-folder"),
        (
            {"source": "webdataset", "train_urls": "a", "test_urls": "b", "max_train": 9},
            "data.max_train: not supported for source webdataset",
        ),
    ],
)
def test_webdataset_config_errors_are_one_line(data, message):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=message) as ei:
        parse_config({"data": data})
    assert "\n" not in str(ei.value)
