"""Ray Tune search (workflows/tune/) on digits: ASHA, MLflow, best.yaml, resume, results table.

The searches share the session's Ray instance (``ray_local``: 2 CPUs, so two 1-CPU trials at a
time). Trials are deterministic given their sampled values (seeded pretraining, 1 torch thread),
and with ``tune.seed=0`` the learning-rate range [1e-6, 3e-2] puts trials 0 and 3 in its bad
(tiny-lr) corner; trial 3 has the lowest val kNN of all four after epoch 1 and only starts once an
earlier trial has passed that rung, so ASHA stops it whatever the order in which results arrive.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.config import load_config, parse_config
from pipeline.slices import ShardSlice
from pipeline.stages import shard as shard_stage
from workflows import tune as tune_mod
from workflows.cli import main

pytestmark = pytest.mark.slow

FAST = [
    "pretrain.batch_size=64",
    "tune.num_trials=4",
    "tune.epochs=3",
    "tune.grace_period=1",
    "tune.reduction_factor=2",
    "tune.lr=[1.0e-6, 3.0e-2]",
    "tune.seed=0",
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One MLflow store and one digits shard folder for the module (each costs seconds)."""
    root = tmp_path_factory.mktemp("tune-shared")
    dataset = shard_stage.run(ShardSlice.of(load_config("smoke")), root / "dataset").outputs[
        "dataset"
    ]
    return {"uri": f"sqlite:///{root / 'mlflow.db'}", "dataset": dataset}


def _cfg(root: Path, *extra: str, uri: str | None = None):
    tracking = [f"tracking.uri={uri}"] if uri else []
    return load_config("smoke", [*FAST, f"storage.root={root}", *tracking, *extra])


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, search_id: str) -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name("contrastive")
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.tune_search_id = '{search_id}'"
    )


def _rows(search_dir: Path) -> list[dict]:
    return json.loads((search_dir / tune_mod.TRIALS_FILE).read_text())


@pytest.fixture
def fail_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``fail_once(i, e)``: trial ``i`` raises once, right after it reports epoch ``e``.

    The search's trainable is swapped for one that wraps the real trial in its worker process;
    the spec file is claimed (renamed) by the attempt that fails, so a retry runs normally."""
    from workflows.tune import trial as trial_mod

    def inject(trial_index: int, after_epoch: int) -> None:
        spec = tmp_path / "fail-once.json"
        spec.write_text(json.dumps({"trial_index": trial_index, "after_epoch": after_epoch}))
        spec_path = str(spec)

        def _trial(params, **kwargs):  # pickled by value: runs in the trial's worker process
            import json
            import os

            from ray import tune

            from workflows.tune import trial as t
            from workflows.tune.rows import trial_index as index_of

            real_report = t.TuneTrialContext.report

            def report(self, metrics, checkpoint=None):
                real_report(self, metrics, checkpoint)
                if not os.path.isfile(spec_path):
                    return
                with open(spec_path) as f:
                    want = json.load(f)
                index = index_of(tune.get_context().get_trial_id())
                epoch = int(metrics.get("epoch", 0))
                if (want["trial_index"], want["after_epoch"]) != (index, epoch):
                    return
                try:
                    os.rename(spec_path, f"{spec_path}.claimed")  # only one attempt wins
                except OSError:
                    return
                raise RuntimeError(f"injected failure in trial {index} after epoch {epoch}")

            t.TuneTrialContext.report = report
            try:
                t._trial(params, **kwargs)
            finally:
                t.TuneTrialContext.report = real_report

        monkeypatch.setattr(trial_mod, "_trial", _trial)

    return inject


def test_four_trial_search_asha_mlflow_best_yaml_and_table(
    ray_local, shared: dict[str, str], tmp_path: Path
) -> None:
    uri = shared["uri"]
    cfg = _cfg(tmp_path, uri=uri)
    busy = os.getloadavg()[0] > (os.cpu_count() or 2)  # other work on the box: don't time
    t0 = time.perf_counter()
    assert tune_mod.search(cfg) == 0
    elapsed = time.perf_counter() - t0
    print(f"4-trial search: {elapsed:.1f}s")
    if not busy:
        assert elapsed < 120, f"4-trial search took {elapsed:.0f}s"

    (search_dir,) = (tmp_path / "tune").iterdir()
    search_id = search_dir.name
    info = json.loads((search_dir / tune_mod.SEARCH_FILE).read_text())
    assert info["state"] == "finished" and info["num_trials"] == 4
    assert (Path(info["dataset"]) / "dataset.json").is_file()

    # ASHA stopped the tiny-lr trial 3 after one epoch; the others ran or were stopped at a rung
    rows = _rows(search_dir)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert {r["state"] for r in rows} <= {"completed", "stopped_early"}
    stopped = [r for r in rows if r["state"] == "stopped_early"]
    assert stopped and all(r["epochs_run"] < 3 for r in stopped)
    assert rows[3]["state"] == "stopped_early" and rows[3]["epochs_run"] == 1
    assert rows[3]["params"]["lr"] < 1e-5
    assert all(r["epochs_run"] == 3 for r in rows if r["state"] == "completed")
    for r in rows:
        p = r["params"]
        assert 0.05 <= p["temperature"] <= 1.0 and 1 <= p["head_depth"] <= 4
        assert 0.25 <= p["strength"] <= 1.5 and 1e-6 <= p["lr"] <= 3e-2
        assert [h["training_iteration"] for h in r["history"]] == list(
            range(1, r["epochs_run"] + 1)
        )

    # best.yaml: a full config load_config accepts, with the best trial's values
    best_path = Path(tune_mod.best_config_path(str(tmp_path), search_id))
    assert best_path == search_dir / "best.yaml"
    best_cfg = load_config(str(best_path))
    best = max(rows, key=lambda r: (r["best_knn"], r["epochs_run"], -r["index"]))
    assert info["best"]["trial_id"] == best["trial_id"]
    assert best_cfg.pretrain.temperature == best["params"]["temperature"]
    assert best_cfg.model.head_depth == best["params"]["head_depth"]
    assert best_cfg.augment.strength == best["params"]["strength"]
    assert best_cfg.pretrain.lr == best["params"]["lr"]
    assert best_cfg.tune.enabled is False
    assert best_cfg.pretrain.epochs == cfg.pretrain.epochs  # the pipeline's, not the trials'
    assert best_cfg.data == cfg.data and best_cfg.finetune == cfg.finetune

    # MLflow: the parent and 4 nested children with params, per-epoch metrics and final state
    runs = _runs(uri, search_id)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["tune_state"] == "finished"
    assert parent.data.metrics["best_val_knn_top1"] == pytest.approx(best["best_knn"])
    client = _client(uri)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/knn_vs_temperature.png", "plots/knn_vs_head_depth.png"}
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    assert set(by_trial) == {r["trial_id"] for r in rows}
    for r in rows:
        child = by_trial[r["trial_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["trial_state"] == r["state"]
        assert float(child.data.params["pretrain.temperature"]) == r["params"]["temperature"]
        assert int(child.data.params["model.head_depth"]) == r["params"]["head_depth"]
        assert float(child.data.params["augment.strength"]) == r["params"]["strength"]
        hist = client.get_metric_history(child.info.run_id, "val_knn_top1")
        assert sorted(m.step for m in hist) == list(range(1, r["epochs_run"] + 1))
        assert (child.data.tags.get("best") == "true") == (r["trial_id"] == best["trial_id"])
    assert parent.data.tags["tune_best_run_id"] == by_trial[best["trial_id"]].info.run_id

    # the results table, through the CLI
    res = CliRunner().invoke(main, ["tune", "--show", search_id, "--storage", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trial"))
    for col in ("temperature", "head_depth", "strength", "lr", "best kNN", "epochs", "state"):
        assert col in lines[header]
    body = lines[header + 1 : header + 5]
    assert [line.split()[0].rstrip("*") for line in body] == ["0", "1", "2", "3"]
    assert body[3].split()[-3:] == ["1/3", "stopped", "early"]
    assert f"{best['best_knn']:.2f}" in body[best["index"]] and body[best["index"]].split()[
        0
    ].endswith("*")

    # a finished search is not run again
    res = CliRunner().invoke(main, ["tune", "--resume", search_id, "--storage", str(tmp_path)])
    assert res.exit_code == 0 and "nothing to resume" in res.output
    assert _rows(search_dir) == rows


def test_interrupted_search_resumes_without_rerunning_finished_trials(
    ray_local, shared: dict[str, str], tmp_path: Path, fail_once
) -> None:
    uri, dataset = shared["uri"], shared["dataset"]
    cfg = _cfg(
        tmp_path,
        "tune.num_trials=2",
        "tune.epochs=2",
        "tune.grace_period=2",
        "resources.max_failures=0",
        "pretrain.max_steps_per_epoch=6",
        uri=uri,
    )
    search_dir = tmp_path / "tune" / "interrupted"
    search_dir.mkdir(parents=True)
    fail_once(1, 1)  # trial 1 dies once, right after its epoch-1 checkpoint
    with pytest.raises(tune_mod.TuneError, match="incomplete: 1 of 2 trials failed"):
        tune_mod.run_search(cfg, dataset, search_dir)

    info = json.loads((search_dir / tune_mod.SEARCH_FILE).read_text())
    assert info["state"] == "failed" and "--resume interrupted" in info["error"]
    before = _rows(search_dir)
    assert [(r["state"], r["epochs_run"]) for r in before] == [("completed", 2), ("error", 1)]
    with pytest.raises(tune_mod.TuneError, match="no best.yaml"):
        tune_mod.best_config_path(str(tmp_path), "interrupted")
    done = before[0]
    progress = {
        p: p.read_text()
        for p in (search_dir / "experiment").glob(f"*{done['trial_id']}*/progress.csv")
    }
    assert len(progress) == 1
    client = _client(uri)
    done_hist = client.get_metric_history(done["mlflow_run_id"], "val_knn_top1")

    assert tune_mod.resume(str(tmp_path), "interrupted") == 0

    after = _rows(search_dir)
    assert [r["trial_id"] for r in after] == [r["trial_id"] for r in before]  # no new trials
    assert after[0] == done  # the finished trial was not run again ...
    assert {p: p.read_text() for p in progress} == progress  # ... nor did Tune append to it
    assert len(client.get_metric_history(done["mlflow_run_id"], "val_knn_top1")) == len(done_hist)
    # the failed trial continued from its epoch-1 checkpoint (pretrain epoch 2 at iteration 2)
    resumed = after[1]
    assert resumed["state"] == "completed" and resumed["epochs_run"] == 2
    assert [(h["training_iteration"], h["epoch"]) for h in resumed["history"]] == [(1, 1), (2, 2)]
    steps = [m.step for m in client.get_metric_history(resumed["mlflow_run_id"], "val_knn_top1")]
    assert steps == [1, 2]
    assert client.get_run(resumed["mlflow_run_id"]).info.status == "FINISHED"
    info = json.loads((search_dir / tune_mod.SEARCH_FILE).read_text())
    assert info["state"] == "finished"
    assert (
        load_config(tune_mod.best_config_path(str(tmp_path), "interrupted")).tune.enabled is False
    )

    # run_search on the same folder and config returns the finished result without running
    again = tune_mod.run_search(cfg, dataset, search_dir)
    assert again["best"] == info["best"] and _rows(search_dir) == after
    assert again["best_config"] == str(search_dir / "best.yaml")


def test_search_stopped_by_a_signal_resumes_from_checkpoints(
    ray_local, shared: dict[str, str], tmp_path: Path
) -> None:
    """SIGUSR1 (what Ctrl-C does, without racing pytest's own SIGINT handler) stops the Tune loop
    with the trial unfinished; ``resume`` finishes it from its last registered checkpoint.

    Tune registers a checkpoint one step after the result it came with, so a stop right after
    epoch k's result may resume from epoch k-1's checkpoint: the signal comes after epoch 2, so
    the trial must not start again from scratch (epoch 1 is never repeated)."""
    uri, dataset = shared["uri"], shared["dataset"]
    cfg = _cfg(
        tmp_path,
        "tune.num_trials=1",
        "tune.epochs=5",
        "tune.grace_period=5",
        "pretrain.max_steps_per_epoch=8",
        uri=uri,
    )
    search_dir = tmp_path / "tune" / "stopped"

    def interrupt_after_second_epoch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                rows = _rows(search_dir)
            except (OSError, ValueError):
                rows = []
            if any(r["epochs_run"] >= 2 for r in rows):
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.1)

    th = threading.Thread(target=interrupt_after_second_epoch, daemon=True)
    th.start()
    with pytest.raises(tune_mod.TuneError, match="incomplete: interrupted with"):
        tune_mod.run_search(cfg, dataset, search_dir)
    th.join()
    info = json.loads((search_dir / tune_mod.SEARCH_FILE).read_text())
    assert info["state"] == "interrupted"
    before = {r["trial_id"]: r for r in _rows(search_dir)}
    assert any(r["state"] == "interrupted" for r in before.values())
    client = _client(uri)
    parent = _runs(uri, "stopped")
    assert {r.info.status for r in parent if "mlflow.parentRunId" not in r.data.tags} == {"KILLED"}

    assert tune_mod.resume(str(tmp_path), "stopped") == 0
    after = _rows(search_dir)
    assert [r["trial_id"] for r in after] == list(before)
    for r in after:
        assert r["state"] == "completed" and r["epochs_run"] == 5
        # continued from a checkpoint: pretrain's own epoch counter follows Tune's iterations
        assert [(h["training_iteration"], h["epoch"]) for h in r["history"]] == [
            (i, i) for i in range(1, 6)
        ]
        (progress,) = (search_dir / "experiment").glob(f"*{r['trial_id']}*/progress.csv")
        iters = [int(x) for x in pd.read_csv(progress)["training_iteration"]]
        assert iters.count(1) == 1 and sorted(set(iters)) == [1, 2, 3, 4, 5]
        assert iters[-1] == 5 and len(iters) <= 6  # at most epoch 2 came again
        steps = [m.step for m in client.get_metric_history(r["mlflow_run_id"], "val_knn_top1")]
        assert steps.count(1) == 1 and sorted(set(steps)) == [1, 2, 3, 4, 5]
        assert client.get_run(r["mlflow_run_id"]).info.status == "FINISHED"
    runs = _runs(uri, "stopped")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def test_a_trial_larger_than_any_node_is_an_error_not_a_hang(ray_local, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "resources.cpus_per_worker=64")
    t0 = time.perf_counter()
    assert tune_mod.search(cfg) == 2
    with pytest.raises(tune_mod.TuneError, match=r"asks 64 CPUs but no Ray node has that"):
        tune_mod.check_resources(cfg)
    gpu = _cfg(tmp_path, "resources.use_gpu=true")
    if not any(n["Resources"].get("GPU") for n in ray_local.nodes()):
        with pytest.raises(tune_mod.TuneError, match="1 GPU"):
            tune_mod.check_resources(gpu)
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "tune").exists() or not any((tmp_path / "tune").iterdir())


def test_bad_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(tune_mod.TuneError, match="no search nope"):
        tune_mod.show(str(tmp_path), "nope")
    with pytest.raises(tune_mod.TuneError, match="not a search id"):
        tune_mod.best_config_path(str(tmp_path), "../etc")
    res = CliRunner().invoke(main, ["tune", "--show", "nope", "--storage", str(tmp_path)])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0
    assert res.output.startswith("error: tune: no search nope")
    assert tune_mod.resume(str(tmp_path), "nope") == 2
    res = CliRunner().invoke(  # `run --from-tune` with no such search: the same one line
        main, ["run", "smoke", "--from-tune", "nope", "--set", f"storage.root={tmp_path}"]
    )
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0
    assert res.output.startswith("error: tune: no search nope")

    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset.json").write_text("{}")
    with pytest.raises(tune_mod.TuneError, match="grace_period 5 exceeds tune.epochs 3"):
        tune_mod.run_search(_cfg(tmp_path, "tune.grace_period=5"), str(ds), tmp_path / "s")
    # The base config is valid (pseudo-labels from its epoch 3 of 10); a 3-epoch trial's is too,
    # a 2-epoch trial's is not: said before anything runs, not inside a trial.
    semi = ["pretrain.method=semisup", "pretrain.pseudo_label_from_epoch=3"]
    with pytest.raises(tune_mod.TuneError, match=r"tune.epochs 2 a trial's .*after the last epoch"):
        tune_mod.run_search(_cfg(tmp_path, *semi, "tune.epochs=2"), str(ds), tmp_path / "s")
    with pytest.raises(tune_mod.TuneError, match="holds no shards"):
        tune_mod.run_search(_cfg(tmp_path), str(tmp_path / "none"), tmp_path / "s")

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(tune_mod.TuneError, match="pip install optuna"):
        tune_mod.run_search(_cfg(tmp_path, "tune.search_alg=optuna"), str(ds), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_space_and_configs() -> None:
    from ray.tune.search.sample import Float, Integer

    cfg = load_config("smoke", ["finetune.from_head_layer=2", "model.head_depth=3"])
    space = tune_mod.param_space(cfg)
    assert set(space) == {"temperature", "head_depth", "strength"}  # no lr range by default
    assert isinstance(space["temperature"], Float) and isinstance(space["head_depth"], Integer)
    assert (space["head_depth"].lower, space["head_depth"].upper) == (1, 5)  # randint: 1..4
    fixed = tune_mod.param_space(
        load_config("smoke", ["tune.head_depth=[2, 2]", "tune.lr=[0.1, 0.1]"])
    )
    assert fixed["head_depth"] == 2 and fixed["lr"] == 0.1

    raw = tune_mod.apply_params(cfg.to_dict(), {"head_depth": 1, "temperature": 0.3, "x": 9})
    assert raw["model"]["head_depth"] == 1 and raw["finetune"]["from_head_layer"] == 1
    assert raw["pretrain"]["temperature"] == 0.3 and raw["tune"]["enabled"] is False
    trial = tune_mod.trial_config(cfg.to_dict(), {"strength": 0.7, "lr": 0.01})
    assert trial.pretrain.epochs == cfg.tune.epochs and trial.pretrain.knn_every == 1
    assert trial.augment.strength == 0.7 and trial.pretrain.lr == 0.01
    assert tune_mod.format_table([]).split() == ["trial", "best", "kNN", "epochs", "state"]


def test_the_pipeline_applies_tuned_values_as_contrastive_tune_does(tmp_path: Path) -> None:
    """A trial that chose head depth 1 under ``finetune.from_head_layer: 2``: ``contrastive tune``
    lowers the layer to the depth, and so must the pipeline's tune node (it used to fail the
    config's ``from_head_layer <= head_depth`` check there)."""
    from workflows.stages import tuned_config

    cfg = load_config(
        "smoke", ["model.head_depth=3", "finetune.from_head_layer=2", "tune.enabled=true"]
    )
    best = tmp_path / "best_params.json"
    best.write_text(json.dumps({"model.head_depth": 1, "pretrain.temperature": 0.3}))
    piped = tuned_config(cfg, {"dataset": {"dataset": "x"}, "tune": {"best_params": str(best)}})
    assert piped.model.head_depth == 1 and piped.finetune.from_head_layer == 1
    assert piped.pretrain.temperature == 0.3 and piped.tune.enabled is True

    searched = parse_config(
        tune_mod.apply_params(cfg.to_dict(), {"head_depth": 1, "temperature": 0.3})
    )
    assert searched.tune.enabled is False
    assert piped.model_copy(update={"tune": searched.tune}) == searched  # otherwise the same
    assert tuned_config(cfg, {"dataset": {"dataset": "x"}}) is cfg  # no tune node: unchanged


def test_trial_rows_read_and_write_the_trials_json_format() -> None:
    row = {
        "trial_id": "a1b2c_00002",
        "index": 2,
        "params": {"temperature": 0.2, "head_depth": 2, "strength": 0.5},
        "history": [
            {"epoch": 1.0, "val_knn_top1": 40.0, "training_iteration": 1},
            {"epoch": 2.0, "val_knn_top1": 35.5, "training_iteration": 2},
        ],
        "state": "stopped_early",
        "mlflow_run_id": None,
        "epochs_run": 2,
        "best_knn": 40.0,
        "last_knn": 35.5,
        "epochs_total": 3,
    }
    r = tune_mod.TrialRow.from_dict({**row, "unknown": 1})
    assert r.to_dict() == row and list(r.to_dict()) == list(row)  # same keys, same order
    r.add_epochs([{"epoch": 2.0, "val_knn_top1": 45.0, "training_iteration": 2}])  # a repeat
    r.summarise(3)
    assert (r.epochs_run, r.best_knn, r.last_knn, r.finished_state()) == (2, 45.0, 45.0,
                                                                         "stopped_early")  # fmt: skip
    done = tune_mod.TrialRow.from_dict({**row, "trial_id": "x_00000", "index": 0, "best_knn": 40.0,
                                         "epochs_run": 3, "state": "completed"})  # fmt: skip
    failed = tune_mod.TrialRow.from_dict({**row, "trial_id": "x_00001", "best_knn": 99.0,
                                           "state": "error"})  # fmt: skip
    assert tune_mod.best_row([r, done, failed]) is r  # highest kNN; errors never count
    r.best_knn = 40.0
    assert tune_mod.best_row([r, done, failed]) is done  # a tie goes to more epochs
    assert tune_mod.best_row([failed]) is None


def test_optuna_searcher_samples_the_space() -> None:
    pytest.importorskip("optuna")
    cfg = load_config("smoke", ["tune.search_alg=optuna", "tune.lr=[1e-4, 1e-2]"])
    searcher = tune_mod.searcher(cfg)
    assert searcher.set_search_properties(tune_mod.METRIC, "max", tune_mod.param_space(cfg))
    s = searcher.suggest("t1")
    assert 0.05 <= s["temperature"] <= 1.0 and s["head_depth"] in (1, 2, 3, 4)
    assert 0.25 <= s["strength"] <= 1.5 and 1e-4 <= s["lr"] <= 1e-2
