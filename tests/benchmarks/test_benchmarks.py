"""The benchmark scripts build valid configs from the shipped ones (no benchmark is run here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_pipeline_throughput_config_is_valid_for_its_defaults_and_one_epoch(tmp_path) -> None:
    # It pretrains the demo model with SimCLR; the demo's semisup-only options must not leak in.
    mod = _load("pipeline_throughput")
    for argv in ([], ["--epochs", "1"]):
        cfg = mod.bench_config(mod.parse_args(argv), str(tmp_path))
        assert cfg.pretrain.method == "simclr"
        assert cfg.pretrain.pseudo_label_from_epoch == 0
