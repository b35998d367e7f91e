"""The files in cluster/ and docker/ agree with each other and with the installed Ray.

Docker images cannot be built here (no daemon, no internet); this checks what can be checked: every
YAML parses, the ``ray up`` file passes Ray's own cluster-config schema, the KubeRay manifests are
``ray.io/v1``, every image named in cluster/ is one the Dockerfiles build, and all of them carry the
Ray version this package runs with (``ray.__version__``).
"""

from __future__ import annotations

import copy
import re
from importlib.metadata import version
from pathlib import Path

import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
DOCKER = ROOT / "docker"
IMAGE = re.compile(
    r"^(?:[^/\s]+/)*contrastive-pipeline:(?P<pkg>[^-\s]+)-ray(?P<ray>[\d.]+)-(?P<kind>cpu|gpu)$"
)


def _docs() -> dict[str, list[dict]]:
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert len(files) >= 3
    return {str(f.relative_to(ROOT)): list(yaml.safe_load_all(f.read_text())) for f in files}


def _images(obj: object) -> list[str]:
    """Every value of an ``image``/``head_image``/``worker_image`` key, at any depth."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("image", "head_image", "worker_image") and isinstance(v, str):
                found.append(v)
            else:
                found += _images(v)
    elif isinstance(obj, list):
        for v in obj:
            found += _images(v)
    return found


def test_dockerfiles_build_on_the_installed_ray() -> None:
    for kind in ("cpu", "gpu"):
        text = (DOCKER / f"Dockerfile.{kind}").read_text()
        froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
        assert froms == [f"rayproject/ray:{ray.__version__}-py311-{kind}"], froms
        assert f'"ray[default,train,tune]=={ray.__version__}"' in text  # pip keeps the image's Ray
        assert "pip install --no-cache-dir ." in text and "COPY --chown=ray:users pipeline" in text
        assert 'org.opencontainers.image.title="contrastive-pipeline"' in text
    assert "whl/cpu" in (DOCKER / "Dockerfile.cpu").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"**/.venv", "**/.git", "runs", "data", "mlruns"} <= set(ignored)


def test_cluster_images_are_ours_at_this_ray_version() -> None:
    seen: set[str] = set()
    for name, docs in _docs().items():
        images = [img for d in docs for img in _images(d)]
        assert images, f"{name} names no image"
        for img in images:
            m = IMAGE.match(img)
            assert m, f"{name}: {img} is not an image of docker/"
            assert m["ray"] == ray.__version__, f"{name}: {img} is not Ray {ray.__version__}"
            assert m["pkg"] == version("contrastive-pipeline"), f"{name}: {img}"
            assert (DOCKER / f"Dockerfile.{m['kind']}").is_file()
            seen.add(m["kind"])
    assert seen == {"cpu", "gpu"}


def test_ray_up_file_passes_rays_schema_and_keeps_ports_private() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    (cfg,) = _docs()["cluster/ray-cluster.yaml"]
    validate_config(prepare_config(copy.deepcopy(cfg)))  # Ray's own schema + defaults
    assert cfg["provider"]["type"] == "aws"
    rules = cfg["provider"]["security_group"].get("IpPermissions", [])
    opened = {p for r in rules for p in range(r.get("FromPort", 0), r.get("ToPort", 0) + 1)}
    assert not opened & {6379, 8265, 10001}
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert "GPU" not in head["resources"] and not head["node_config"]["InstanceType"].startswith(
        "g"
    )
    (gpu,) = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert cfg["docker"]["worker_image"].endswith("-gpu")
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    run_opts = " ".join(cfg["docker"]["run_options"])
    assert "CONTRASTIVE_STORAGE=s3://" in run_opts and "MLFLOW_TRACKING_URI=http" in run_opts


def _cluster_spec_checks(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, where
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", where
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, where
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["image"].endswith("-gpu") and worker["resources"]["limits"]["nvidia.com/gpu"]


def _kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d and d.get("kind") == kind]
    return doc


def test_kuberay_manifests() -> None:
    docs = _docs()
    rc = _kind(docs["cluster/kuberay/raycluster.yaml"], "RayCluster")
    job = _kind(docs["cluster/kuberay/rayjob.yaml"], "RayJob")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    _cluster_spec_checks(rc["spec"], "raycluster.yaml")
    _cluster_spec_checks(job["spec"]["rayClusterSpec"], "rayjob.yaml")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["contrastive", "run", "/configs/demo.yaml"]
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    # the entrypoint's --set overrides are valid against the config schema
    from pipeline.config import load_config

    sets = [entry[i + 1] for i, a in enumerate(entry) if a == "--set"]
    cfg = load_config(str(ROOT / "workflows/configs/demo.yaml"), sets)
    assert cfg.storage.root.startswith("s3://") and cfg.tracking.uri and cfg.resources.use_gpu


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_kuberay_dashboard_on_all_interfaces_comes_with_a_network_policy() -> None:
    """A head with ``dashboard-host: 0.0.0.0`` (the Jobs API runs code on the cluster) ships with
    a NetworkPolicy that selects its pods and admits only the cluster's own pods, the KubeRay
    operator and (for a RayJob) its submitter: no rule open to every pod or address."""
    docs = _docs()
    for name, kind in (("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")):
        file_docs = docs[f"cluster/kuberay/{name}"]
        spec = _kind(file_docs, kind)["spec"]
        spec = spec.get("rayClusterSpec", spec)
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        head_labels = head["template"]["metadata"]["labels"]
        worker_labels = [g["template"]["metadata"]["labels"] for g in spec["workerGroupSpecs"]]
        policy = _kind(file_docs, "NetworkPolicy")
        assert policy["apiVersion"] == "networking.k8s.io/v1"
        pspec = policy["spec"]
        assert "Ingress" in pspec["policyTypes"]
        assert pspec["podSelector"].get("matchLabels"), name  # never {} (every pod)
        assert _selects(pspec["podSelector"], head_labels), name
        assert all(_selects(pspec["podSelector"], w) for w in worker_labels), name
        assert pspec["ingress"], name  # an empty list would cut the workers off the head
        for rule in pspec["ingress"]:
            assert rule.get("from"), f"{name}: an ingress rule without 'from' admits everyone"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, name
                assert peer.get("podSelector", {}).get("matchLabels"), name
        # the cluster's own pods reach each other on every port (GCS, object transfer, ...)
        assert any(
            "ports" not in r and any(_selects(p["podSelector"], head_labels) for p in r["from"])
            for r in pspec["ingress"]
        ), name
        # whoever else is admitted reaches only the dashboard port
        for rule in pspec["ingress"]:
            if not any(_selects(p["podSelector"], head_labels) for p in rule["from"]):
                assert [p["port"] for p in rule.get("ports", [])] == [8265], name
