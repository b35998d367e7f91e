"""Memory does not grow with the data: peak memory of the process tree (the driver and its
DataLoader workers) of a streaming ``contrastive local`` run (the demo's stages; pretraining one
full epoch, the other stages one short epoch) on an external WebDataset of variable-size JPEGs
(``make_wds_jpegs.py``) with N and 4N train images. Goal: the 4N run's peak at most 50 MiB above
the N run's.

What is summed. Every 0.1 s the benchmark reads ``/proc/<pid>/smaps_rollup`` of each process of
the tree and adds up ``Pss_Anon + Pss_Shmem``: the heap, tensors and DataLoader shared-memory
batches, each page counted once however many processes map it (a page that a forked worker still
shares with the driver is split between them, so the sum is the tree's real total). That is the
value. Two other sums are reported beside it, and neither measures data growth: the sum of RSS
counts every page shared between the driver and its forked workers once per process (so it moves
with how many workers happen to be alive at a sample), and the sum of PSS includes the share of the
libraries' file pages (torch alone is hundreds of MiB) that other processes on the machine map
too, so it moves with unrelated work.

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
from _common import REPO, emit, wds_jpegs

_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_Shmem")


def _rollup(pid: int) -> dict[str, int]:
    """The fields of ``/proc/<pid>/smaps_rollup`` this benchmark sums, in KiB."""
    out = dict.fromkeys(_FIELDS, 0)
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in out:
                out[name] = int(rest.split()[0])
    return out


def peak_memory(cmd: list[str], interval: float = 0.1) -> tuple[dict[str, float], float, int]:
    """Peaks (MiB) of the tree's summed anon+shmem PSS, RSS and PSS; seconds; return code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    root = psutil.Process(proc.pid)
    peak = {"anon_shmem": 0, "rss": 0, "pss": 0}
    while proc.poll() is None:
        total = {"anon_shmem": 0, "rss": 0, "pss": 0}
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                r = _rollup(p.pid)
            except OSError:  # gone between the listing and the read
                continue
            total["anon_shmem"] += r["Pss_Anon"] + r["Pss_Shmem"]
            total["rss"] += r["Rss"]
            total["pss"] += r["Pss"]
        for k, v in total.items():
            peak[k] = max(peak[k], v)
        time.sleep(interval)
    err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    mib = {k: v / 1024 for k, v in peak.items()}
    return mib, time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=32, help="augment.image_size (view size)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    if not Path("/proc/self/smaps_rollup").is_file():
        raise SystemExit("stream_memory: needs Linux's /proc/<pid>/smaps_rollup")
    tmp = tempfile.TemporaryDirectory(prefix="stream-memory-")
    work = args.work or Path(tmp.name)
    runs = {}
    for n in (args.n, 4 * args.n):
        train, test = wds_jpegs(n, work / f"wds{n}")
        out = work / f"run{n}-{int(time.time())}"
        cmd = [
            sys.executable, "-m", "workflows.cli", "local", "demo", "--out", str(out),
            "--set", "data.source=webdataset", "--set", f"data.train_urls=[{','.join(train)}]",
            "--set", f"data.test_urls=[{','.join(test)}]", "--set", "data.in_memory=false",
            "--set", "data.val_fraction=0.05", "--set", f"augment.image_size={args.size}",
            "--set", "pretrain.epochs=1", "--set", "pretrain.knn_every=0",
            "--set", "pretrain.pseudo_label_from_epoch=0",
            "--set", "finetune.label_fractions=[1]", "--set", "finetune.epochs=1",
            "--set", "finetune.min_steps=1", "--set", "finetune.consistency.epochs=1",
            "--set", "distill.epochs=1", "--set", "evaluate.linear_epochs=2",
            "--set", "evaluate.embedding_samples=200",
        ]  # fmt: skip
        peak, secs, rc = peak_memory(cmd)
        if rc:
            raise SystemExit(f"contrastive local failed for N={n} (rc {rc})")
        runs[n] = (peak, secs)
        print(
            f"N={n}: peak anon+shmem {peak['anon_shmem']:.1f} MiB (RSS sum {peak['rss']:.1f}, "
            f"PSS sum {peak['pss']:.1f}), {secs:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    (p1, s1), (p4, s4) = runs[args.n], runs[4 * args.n]
    emit(
        "stream_memory_growth_mib",
        p4["anon_shmem"] - p1["anon_shmem"],
        "MiB",
        50.0,
        digits=1,
        goal="<= 50 MiB growth from N to 4N train images",
        n=args.n,
        peak_anon_shmem_mib={str(args.n): round(p1["anon_shmem"], 1),
                             str(4 * args.n): round(p4["anon_shmem"], 1)},
        rss_sum_growth_mib=round(p4["rss"] - p1["rss"], 1),
        pss_sum_growth_mib=round(p4["pss"] - p1["pss"], 1),
        seconds={str(args.n): round(s1, 1), str(4 * args.n): round(s4, 1)},
        view_size=args.size,
        in_memory_equivalent_mib=round(3 * args.n * 3 * args.size**2 / 2**20, 1),
    )  # fmt: skip


if __name__ == "__main__":
    main()
