"""Memory does not grow with the data: peak resident memory, summed over the process tree
(the driver and its DataLoader workers), of a streaming ``contrastive local`` run (the demo's
stages; pretraining one full epoch, the other stages one short epoch) on an external WebDataset
of variable-size JPEGs (``make_wds_jpegs.py``) with N and 4N train images. Goal: the 4N run's
peak at most 50 MiB above the N run's.

    python benchmarks/stream_memory.py [--n 2000] [--size 32] [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _common import REPO, emit


def make_data(n: int, out: Path) -> tuple[str, str]:
    if not (out / "wds").is_dir():
        subprocess.run(
            [sys.executable, str(REPO / "benchmarks/make_wds_jpegs.py"), "--out", str(out),
             "--n-train", str(n), "--shard-size", "500"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    train = sorted(str(p) for p in (out / "wds").glob("train-*.tar"))
    test = sorted(str(p) for p in (out / "wds").glob("test-*.tar"))
    return "[" + ",".join(train) + "]", "[" + ",".join(test) + "]"


def peak_rss(cmd: list[str], interval: float = 0.1) -> tuple[float, float, int]:
    """(peak MiB of the process tree, seconds, return code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(interval)
    err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return peak / 2**20, time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=32, help="augment.image_size (view size)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="stream-memory-")
    work = args.work or Path(tmp.name)
    runs = {}
    for n in (args.n, 4 * args.n):
        train, test = make_data(n, work / f"wds{n}")
        out = work / f"run{n}-{int(time.time())}"
        cmd = [
            sys.executable, "-m", "workflows.cli", "local", "demo", "--out", str(out),
            "--set", "data.source=webdataset", "--set", f"data.train_urls={train}",
            "--set", f"data.test_urls={test}", "--set", "data.in_memory=false",
            "--set", "data.val_fraction=0.05", "--set", f"augment.image_size={args.size}",
            "--set", "pretrain.epochs=1", "--set", "pretrain.knn_every=0",
            "--set", "pretrain.pseudo_label_from_epoch=0",
            "--set", "finetune.label_fractions=[1]", "--set", "finetune.epochs=1",
            "--set", "finetune.min_steps=1", "--set", "finetune.consistency.epochs=1",
            "--set", "distill.epochs=1", "--set", "evaluate.linear_epochs=2",
            "--set", "evaluate.embedding_samples=200",
        ]  # fmt: skip
        peak, secs, rc = peak_rss(cmd)
        if rc:
            raise SystemExit(f"contrastive local failed for N={n} (rc {rc})")
        runs[n] = (peak, secs)
        print(f"N={n}: peak {peak:.1f} MiB, {secs:.0f} s", file=sys.stderr, flush=True)
    (p1, s1), (p4, s4) = runs[args.n], runs[4 * args.n]
    emit(
        "stream_memory_growth_mib",
        p4 - p1,
        "MiB",
        50.0,
        digits=1,
        goal="<= 50 MiB growth from N to 4N train images",
        n=args.n,
        peak_mib={str(args.n): round(p1, 1), str(4 * args.n): round(p4, 1)},
        seconds={str(args.n): round(s1, 1), str(4 * args.n): round(s4, 1)},
        view_size=args.size,
        in_memory_equivalent_mib=round(3 * args.n * 3 * args.size**2 / 2**20, 1),
    )


if __name__ == "__main__":
    main()
