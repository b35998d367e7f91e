"""Helpers the pipeline and orchestration benchmarks share.

* :func:`machine` — the ``machine`` key of every line (cores, CPU model, torch/ray versions, the
  1-minute load average when the line was printed: other work on the machine distorts timings);
* :func:`emit` — one JSON line per result, ``{"benchmark", "value", "unit", "baseline", "ratio",
  ..., "machine"}`` (ratio = value / baseline);
* :func:`bare_simclr_step` — one SimCLR step in plain PyTorch (the modules, the inline NT-Xent of
  ``step_throughput.py``, a ``torch.optim`` optimiser; no pipeline helper): the baseline;
* :func:`kill_tree` — SIGKILL a process and then what it started (its local Ray);
* :func:`wds_jpegs` — the variable-size JPEG WebDataset of ``make_wds_jpegs.py`` (made once per
  folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from step_throughput import measure_peak_flops, nt_xent_inline  # noqa: E402

__all__ = [
    "REPO",
    "bare_simclr_step",
    "emit",
    "kill_tree",
    "machine",
    "measure_peak_flops",
    "nt_xent_inline",
    "timed",
    "wds_jpegs",
]


@cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "device": "cpu",
        "load_1m": round(os.getloadavg()[0], 2),
    }


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def emit(
    name: str,
    value: float | None,
    unit: str,
    baseline: float | None,
    digits: int = 3,
    **extra: Any,
) -> dict[str, Any]:
    """Print one result line and return it."""
    row = {
        "benchmark": name,
        "value": _round(value, digits),
        "unit": unit,
        "baseline": _round(baseline, digits),
        "ratio": round(value / baseline, 4) if value is not None and baseline else None,
        **extra,
        "machine": machine(),
    }
    print(json.dumps(row), flush=True)
    return row


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bare_simclr_step(
    encoder: nn.Module,
    head: nn.Module,
    batch: int,
    *,
    temperature: float = 0.2,
    optimizer: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    channels_last: bool = False,
    bf16: bool = False,
) -> Callable[[Tensor], float]:
    """A plain-PyTorch SimCLR step over ``x`` = both views of ``batch`` images, (2N, C, H, W).

    ``adamw`` -> ``torch.optim.AdamW``; anything else -> ``torch.optim.SGD`` with momentum 0.9.
    """
    params = [*encoder.parameters(), *head.parameters()]
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )
    encoder.train()
    head.train()

    def step(x: Tensor) -> float:
        x = x.contiguous(memory_format=mem)
        with autocast():
            z = head(encoder(x)).float()  # (2N, D)
        loss = nt_xent_inline(z[:batch], z[batch:], temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and, once it is gone, whatever it started (its local Ray): the same as
    ``_kill_tree`` in tests/faults/test_kills.py."""
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(kids, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def wds_jpegs(n_train: int, out: Path) -> tuple[list[str], list[str]]:
    """(train shards, test shards) of ``make_wds_jpegs.py --n-train n_train`` in ``out/wds``
    (500 samples a shard), made unless they are there."""
    if not (out / "wds").is_dir():
        subprocess.run(
            [sys.executable, str(HERE / "make_wds_jpegs.py"), "--out", str(out),
             "--n-train", str(n_train), "--shard-size", "500"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    train = sorted(str(p) for p in (out / "wds").glob("train-*.tar"))
    test = sorted(str(p) for p in (out / "wds").glob("test-*.tar"))
    return train, test
