#!/usr/bin/env bash
# Data-parallel scaling of the ResNet-50 training step, 1 to N GPUs of one host, in one job: the same
# `prism bench train` step (bf16, 256 images per GPU, on-device synthetic batch) on 1 GPU
# (CUDA_VISIBLE_DEVICES=0) and on 2..N GPUs, each with BatchNorm statistics over the global batch
# (parallel.batch_stats=global, SyncBN) and per device (parallel.batch_stats=per_device, PyTorch DDP's default).
#   [STEPS=100] [REPEATS=1] [MODES="global per_device"] bash benchmarks/scaling_gpu.sh OUT_DIR [GPU counts, default: 2 and all]
# Writes OUT_DIR/scaling-<n>gpu-<mode>[-r<i>].json and prints the table for benchmarks/RESULTS.md (multi-GPU
# throughput varies by a few percent from one process to the next: REPEATS runs each multi-GPU case again).
set -euo pipefail
out=${1:?usage: scaling_gpu.sh OUT_DIR [GPU counts]}
shift
out=$(mkdir -p "$out" && cd "$out" && pwd)
all=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
counts=${*:-$( [ "$all" -gt 2 ] && echo "2 $all" || echo "$all")}
per_gpu=${BATCH:-256}
steps=${STEPS:-100}
repeats=${REPEATS:-1}
modes=${MODES:-global per_device}
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" || true
common=(model=resnet50 dataset=synthetic dataset.num_classes=1000 precision=bf16 optimizer=sgd optimizer.lr=0.1
        optimizer.weight_decay=1e-4 schedule=constant augment=none logging.progress=false)
bench() {  # bench NAME GPUS MODE
  local n=$2 devices
  devices=$(seq -s, 0 $((n - 1)))
  (cd /tmp && CUDA_VISIBLE_DEVICES=$devices python3 -m prism.framework bench train --steps $steps --warmup 10 \
     --out "$out/$1.json" "${common[@]}" train.batch_size=$((per_gpu * n)) dataset.train_size=$((per_gpu * n * 4)) \
     parallel.batch_stats=$3) || echo "scaling run $1 failed" >&2
}
bench scaling-1gpu 1 global
for n in $counts; do
  for r in $(seq "$repeats"); do
    suffix=$([ "$repeats" -gt 1 ] && echo "-r$r" || true)
    for mode in $modes; do bench "scaling-${n}gpu-$mode$suffix" "$n" "$mode"; done
  done
done
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("scaling-*.json"))}
base = runs.get("scaling-1gpu")
print("| GPUs | BatchNorm statistics | global batch | img/s | ms/step (median) | scaling efficiency | file |")
print("|---|---|---|---|---|---|---|")
for name, r in sorted(runs.items(), key=lambda kv: (kv[1]["devices"], kv[0])):
    eff = r["img_s"] / (base["img_s"] * r["devices"]) if base else float("nan")
    mode = "one GPU" if r["devices"] == 1 else r.get("batch_stats", name.split("-")[-1])
    print(f"| {r['devices']} | {mode} | {r['batch_size']} | {r['img_s']:,.0f} | {r['step_ms_median']:.1f} | "
          f"{eff:.3f} | `{name}.json` |")
PY
