#!/usr/bin/env bash
# The demo config on one GPU, in one process (`contrastive local`, no Ray or MLflow needed), for
# BENCHMARKS.md's GPU table. Runs the named variants in order until DEADLINE seconds have passed,
# then packs every run's summary.json, report and plots (no model files) into OUT/gpu_demo.tgz and
# prints each report's table and the pretraining views/s.
#
#   benchmarks/gpu_demo.sh OUT DEADLINE VARIANT...
#
# Variants: full (ResNet-18 at width 1, student width 0.5: 0.245x the teacher's parameters),
# full_bf16 (the same with bf16 autocast), full_s1 / full_s2 (seeds 1 and 2), demo (the shipped
# width 0.125). Environment: PYTHON (python3), DEVICE (cuda), CONFIG (demo), FMNIST (a folder
# with the Fashion-MNIST idx files, passed as data.root; default: the usual places), SET (one more
# override for every variant, e.g. SET='finetune.baseline_lr={0.1: 0.03, 1: 0.01}': the
# baseline's learning rates at full width).
set -uo pipefail
out=${1:?usage: gpu_demo.sh OUT DEADLINE VARIANT...}
deadline=${2:?usage: gpu_demo.sh OUT DEADLINE VARIANT...}
shift 2
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
config=${CONFIG:-demo}
here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -gt 0 ] || { echo "gpu_demo.sh: name at least one variant" >&2; exit 2; }
for variant in "$@"; do
    case $variant in
    full | full_bf16 | full_s1 | full_s2 | demo) ;;
    *) echo "gpu_demo.sh: unknown variant $variant (full, full_bf16, full_s1, full_s2, demo)" >&2; exit 2 ;;
    esac
done
[ $# -eq "$(printf '%s\n' "$@" | sort -u | wc -l)" ] || { echo "gpu_demo.sh: a variant is named twice" >&2; exit 2; }
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS

{
    command -v nvidia-smi >/dev/null &&
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    "$py" -c 'import torch, os; print("torch", torch.__version__, "cuda", torch.version.cuda,
"cudnn", torch.backends.cudnn.version(), "cpus", os.cpu_count())'
} >"$work/machine.txt" 2>&1
cat "$work/machine.txt"

base=(--device "$device")
[ -n "${FMNIST:-}" ] && base+=(--set "data.root=$FMNIST")
[ -n "${SET:-}" ] && base+=(--set "$SET")
full=(--set model.width=1 --set distill.student.width=0.5)
for variant in "$@"; do
    case $variant in
    full) extra=("${full[@]}") ;;
    full_bf16) extra=("${full[@]}" --set pretrain.bf16=true) ;;
    full_s1) extra=("${full[@]}" --set seed=1) ;;
    full_s2) extra=("${full[@]}" --set seed=2) ;;
    demo) extra=() ;;
    esac
    left=$((deadline - (SECONDS - start)))
    if [ "$left" -lt 45 ]; then
        echo "$variant: skipped, ${left}s left"
        continue
    fi
    t0=$SECONDS
    timeout "$left" "$py" -m workflows.cli local "$config" "${base[@]}" "${extra[@]}" \
        --out "$work/$variant" >"$work/$variant.log" 2>&1
    rc=$?
    echo "$variant: rc $rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || tail -5 "$work/$variant.log"
    "$py" - "$work/$variant" <<'EOF' || true
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
s = json.loads((run / "summary.json").read_text())
pre = json.loads(Path(s["stages"]["pretrain"]["outputs"]["history"]).read_text())
print("views/s per epoch:", [round(e["views_per_s"]) for e in pre],
      "| stage seconds:", {k: v["seconds"] for k, v in s["stages"].items()})
print((run / "evaluate" / "report.md").read_text().split("![", 1)[0].rstrip())
EOF
done
# Everything but the model files and the shards goes into one small archive.
tar czf "$out/gpu_demo.tgz" -C "$work" --exclude='*.pt' --exclude='*.tar' --exclude='checkpoints' .
echo "packed $(du -h "$out/gpu_demo.tgz" | cut -f1) in $out/gpu_demo.tgz; $((SECONDS - start)) s"
