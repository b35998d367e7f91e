"""The runner's scheduling steps one by one, without Ray: the launch order (critical path), skip,
reuse, launch, record success or failure, blocking of dependants, and the stage and run states as
enums that read and write the same strings as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import parse_config
from workflows.dag import Graph, StageNode, build_graph, compute_keys
from workflows.digests import DigestMismatch, output_digest
from workflows.runtypes import OutcomeStatus
from workflows.scheduler import (
    DROPPED_METRIC,
    STAGE_COST,
    RunContext,
    RunState,
    Scheduler,
    launch_priorities,
    stage_cost,
)
from workflows.stagetask import TaskResult
from workflows.state import RunStatus, RunStore, StageState, StageStatus


class _Ref:
    """Stands for a Ray ObjectRef (only a dict key to the scheduler)."""


class _Scheduler(Scheduler):
    """Records what it would start instead of starting a Ray task."""

    def __init__(self, ctx: RunContext, state: RunState) -> None:
        super().__init__(ctx, state)
        self.submitted: list[tuple[str, dict]] = []

    def submit(self, node, inputs, out_dir, tracking_info):
        self.submitted.append((node.name, inputs))
        return _Ref()


def _never(*args):
    raise AssertionError("the scheduler steps never execute a stage themselves")


def _chain_graph() -> Graph:
    return Graph(
        [
            StageNode("lone", "y"),  # another kind: another cache key than a's
            StageNode("a", "x"),
            StageNode("b", "x", deps={"in": "a"}),
            StageNode("c", "x", deps={"in": "b"}),
        ]
    )


def _scheduler(tmp_path: Path, graph: Graph, run_id: str | None = None, **kw) -> _Scheduler:
    cfg = parse_config({"storage": {"root": str(tmp_path / "store")}})
    store = RunStore(tmp_path / "store")
    rid = run_id or store.create_run(cfg)
    keys = compute_keys(graph, cfg)
    ctx = RunContext(graph, cfg, store, rid, _never, keys, "abc1234", **kw)
    states = {n.name: store.read_state(rid, n.name) for n in graph}
    return _Scheduler(ctx, RunState(states))


def _finished(sched: Scheduler, name: str, tmp_path: Path) -> dict:
    """Write a finished manifest of ``name`` with one real output file, as the runner would."""
    ctx = sched.ctx
    out = Path(ctx.store.out_dir(ctx.run_id, name))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"stage": name}))
    outputs = {"result": str(out / "result.json")}
    manifest = {
        "stage": name,
        "run_id": ctx.run_id,
        "cache_key": ctx.keys[name],
        "outputs": outputs,
        "digest": output_digest(outputs),
        "metrics": {"score": 0.5},
        "mlflow_run_id": None,
    }
    ctx.store.write_manifest(ctx.run_id, name, manifest)
    return manifest


# -- the critical path ---------------------------------------------------------------------------


def test_cost_model_weights_pretraining_heavy_and_evaluation_light():
    assert STAGE_COST["pretrain"] > STAGE_COST["finetune"] > STAGE_COST["evaluate"]
    assert STAGE_COST["finetune"] == STAGE_COST["baseline"] == STAGE_COST["distill"]
    assert STAGE_COST["shard"] == STAGE_COST["evaluate"]
    assert stage_cost(StageNode("q", "an-unknown-kind")) == 1.0


def test_pretraining_goes_before_the_baselines():
    cfg = parse_config({"finetune": {"label_fractions": [1, 10], "baseline": True}})
    prio = launch_priorities(build_graph(cfg))
    assert prio["pretrain"] > prio["baseline@1"] == prio["baseline@10"]
    assert prio["finetune@1"] > prio["baseline@1"]  # distillation follows fine-tuning
    assert prio["shard"] == max(prio.values())


def test_waiting_stages_come_highest_priority_first(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    assert [n.name for n in sched.waiting()] == ["a", "lone"]


def test_launch_ready_fills_the_slots_in_priority_order(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph(), max_concurrency=1)
    sched.settle()
    sched.launch_ready()
    assert [name for name, _ in sched.submitted] == ["a"]
    sched.launch_ready()  # the one slot is taken
    assert len(sched.submitted) == 1 and len(sched.state.running) == 1


class _Cpus:
    """An execute that declares the CPUs each stage holds (as StageExecutor.cpus does)."""

    def __init__(self, cpus: dict[str, float]) -> None:
        self.table = cpus

    def __call__(self, *args):
        raise AssertionError("never executed here")

    def cpus(self, node):
        return self.table.get(node.name, 0.0)


def test_the_cpu_budget_gives_the_critical_path_the_cpus_first(tmp_path, monkeypatch):
    """On 2 CPUs, pretraining (2) goes before two baselines (1 each) that are ready with it; once
    it ends, both baselines run side by side."""
    import workflows.scheduler as scheduler

    graph = Graph(
        [
            StageNode("baseline@1", "baseline"),
            StageNode("baseline@10", "baseline", params={"fraction": 10.0}),
            StageNode("pretrain", "pretrain"),
            StageNode("finetune", "finetune", deps={"pretrain": "pretrain"}),
        ]
    )
    sched = _scheduler(tmp_path, graph)
    sched.ctx.execute = _Cpus({"pretrain": 2.0, "baseline@1": 1.0, "baseline@10": 1.0})
    monkeypatch.setattr(scheduler, "cluster_cpus", lambda: 2.0)
    sched.settle()
    sched.launch_ready()
    assert [name for name, _ in sched.submitted] == ["pretrain"]
    (ref,) = sched.state.running
    del sched.state.running[ref]
    sched.record_success(graph["pretrain"], TaskResult(ok=True, duration_s=1.0))
    sched.settle()
    sched.launch_ready()  # both baselines and finetune (no CPUs declared); equal costs
    assert [name for name, _ in sched.submitted][1:] == ["baseline@1", "baseline@10", "finetune"]


def test_a_stage_larger_than_the_cluster_starts_alone(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    sched.ctx.execute = _Cpus({"a": 8.0, "lone": 1.0})
    assert sched.fits(sched.ctx.graph["a"], 2.0)  # nothing runs: Ray decides
    sched.launch(sched.ctx.graph["lone"])
    assert not sched.fits(sched.ctx.graph["a"], 2.0)
    assert sched.fits(sched.ctx.graph["a"], None)  # capacity unknown: no budget


def test_the_stage_executor_declares_its_workers_cpus():
    from pipeline.config import load_config
    from workflows.stages import StageExecutor

    cfg = load_config("demo")  # cpus_per_worker 2; finetune, baseline, distill 1 each
    ex = StageExecutor(cfg)
    cpus = {n.name: ex.cpus(n) for n in build_graph(cfg)}
    assert cpus["shard"] == 0.0
    assert cpus["pretrain"] == 2.0 and cpus["evaluate"] == 2.0
    assert {cpus[n] for n in cpus if n.startswith(("finetune@", "baseline@", "distill@"))} == {1.0}


# -- skip ----------------------------------------------------------------------------------------


def test_skip_a_stage_finished_with_the_same_key(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    manifest = _finished(sched, "a", tmp_path)
    assert sched.try_skip(sched.ctx.graph["a"]) is True
    assert sched.state.done == {"a"} and sched.state.manifests["a"] == manifest
    assert sched.state.outcomes["a"].status == OutcomeStatus.SKIPPED == "skipped"
    assert sched.try_skip(sched.ctx.graph["lone"]) is False  # never finished


def test_skip_deletes_a_manifest_of_another_key(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    _finished(sched, "a", tmp_path)
    sched.ctx.keys["a"] = "another-key"
    assert sched.try_skip(sched.ctx.graph["a"]) is False
    assert sched.ctx.store.read_manifest(sched.ctx.run_id, "a") is None


def test_skip_refuses_changed_outputs_and_the_stage_fails(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    manifest = _finished(sched, "a", tmp_path)
    Path(manifest["outputs"]["result"]).write_text("changed")
    with pytest.raises(DigestMismatch, match="output 'result'"):
        sched.try_skip(sched.ctx.graph["a"])
    sched.settle()  # the same check inside the loop: the stage fails, its chain is blocked
    assert sched.state.outcomes["a"].status == "failed"
    assert sched.state.blocked == {"b", "c"}


def test_settle_skips_a_finished_chain_and_checks_the_rest_once(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    _finished(sched, "a", tmp_path)
    _finished(sched, "b", tmp_path)
    sched.settle()
    assert sched.state.done == {"a", "b"}
    assert sched.state.checked == {"lone", "c"}  # nothing cached: to be launched
    assert [n.name for n in sched.waiting()] == ["lone", "c"]  # equal cost: declaration order


# -- reuse ---------------------------------------------------------------------------------------


def test_reuse_links_an_earlier_runs_stage(tmp_path):
    first = _scheduler(tmp_path, _chain_graph())
    src = _finished(first, "a", tmp_path)
    sched = _scheduler(tmp_path, _chain_graph(), reuse=True)
    assert sched.try_reuse(sched.ctx.graph["a"]) is True
    m = sched.ctx.store.read_manifest(sched.ctx.run_id, "a")
    assert m["outputs"] == src["outputs"] and m["run_id"] == sched.ctx.run_id
    assert m["reused_from"]["run_id"] == first.ctx.run_id and m["reused_from"]["stage"] == "a"
    st = sched.ctx.store.read_state(sched.ctx.run_id, "a")
    assert st.state == StageStatus.SKIPPED and st.reused_from == m["reused_from"]
    assert sched.state.outcomes["a"].status == "reused"
    assert sched.try_reuse(sched.ctx.graph["lone"]) is False  # no earlier result


# -- launch, success, failure ----------------------------------------------------------------------


def test_launch_marks_the_stage_running_with_its_inputs(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    manifest = _finished(sched, "a", tmp_path)
    sched.settle()
    sched.launch(sched.ctx.graph["b"])
    assert sched.submitted == [("b", {"in": manifest["outputs"]})]
    st = sched.ctx.store.read_state(sched.ctx.run_id, "b")
    assert st.state == "running" and st.attempts == 1 and st.cache_key == sched.ctx.keys["b"]
    raw = json.loads(
        (Path(sched.ctx.store.stage_dir(sched.ctx.run_id, "b")) / "state.json").read_text()
    )
    assert raw["state"] == "running"
    assert [r.node.name for r in sched.state.running.values()] == ["b"]


def test_record_success_writes_state_then_manifest(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    node = sched.ctx.graph["lone"]
    sched.launch(node)
    out = Path(sched.ctx.store.out_dir(sched.ctx.run_id, "lone"), "result.json")
    out.write_text("{}")
    res = TaskResult(
        ok=True,
        duration_s=1.5,
        outputs={"result": str(out)},
        metrics={"acc": 0.9, DROPPED_METRIC: 4.0},
        digest=output_digest({"result": str(out)}),
    )
    sched.record_success(node, res)
    st = sched.ctx.store.read_state(sched.ctx.run_id, "lone")
    assert st.state == "succeeded" and st.metrics == {"acc": 0.9} and st.key_metric == "acc"
    m = sched.ctx.store.read_manifest(sched.ctx.run_id, "lone")
    assert m["cache_key"] == sched.ctx.keys["lone"] and m["attempts"] == 1
    assert sched.state.sink_dropped == 4 and sched.state.done == {"lone"}
    assert sched.state.outcomes["lone"].status == "succeeded"


def test_record_failure_blocks_the_dependants_and_stops_launches(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    node = sched.ctx.graph["a"]
    sched.launch(node)
    sched.record_failure(node, "ValueError: boom", "Traceback ...", 0.5)
    st = sched.ctx.store.read_state(sched.ctx.run_id, "a")
    assert st.state == "failed" and st.error == "ValueError: boom"
    assert Path(st.traceback_file).read_text() == "Traceback ..."
    assert sched.state.blocked == {"b", "c"}
    assert sched.state.outcomes["a"].status == "failed"
    assert sched.may_launch() is False
    sched.ctx.keep_going = True
    assert sched.may_launch() is True


def test_block_dependants_is_transitive(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    sched.block_dependants("a")
    assert sched.state.blocked == {"b", "c"}
    sched.block_dependants("lone")
    assert sched.state.blocked == {"b", "c"}


def test_mark_not_run_keeps_the_attempts(tmp_path):
    sched = _scheduler(tmp_path, _chain_graph())
    sched.state.stages["c"].attempts = 2
    sched.state.mark_not_run()
    assert {o.status for o in sched.state.outcomes.values()} == {"not_run"}
    assert sched.state.outcomes["c"].attempts == 2


# -- the states as enums ---------------------------------------------------------------------------


def test_states_are_enums_that_read_and_write_as_strings(tmp_path):
    cfg = parse_config({"storage": {"root": str(tmp_path / "store")}})
    store = RunStore(tmp_path / "store")
    rid = store.create_run(cfg)
    store.write_state(rid, StageState("shard", state="succeeded"))
    raw = Path(store.stage_dir(rid, "shard"), "state.json").read_text()
    assert json.loads(raw)["state"] == "succeeded"
    st = store.read_state(rid, "shard")
    assert st.state is StageStatus.SUCCEEDED and st.state == "succeeded"
    assert f"{st.state}" == "succeeded" and str(st.state) == "succeeded"
    info = store.update_run(rid, status="running")
    assert info.status is RunStatus.RUNNING
    assert json.loads(Path(info.path, "run.json").read_text())["status"] == "running"
    assert store.load_run(rid).status is RunStatus.RUNNING
    assert f"{OutcomeStatus.NOT_RUN}" == "not_run"
