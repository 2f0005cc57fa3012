#!/usr/bin/env bash
# Where the multi-GPU step loses time: ResNet-50 bf16, 256 images per GPU, parallel.batch_stats=per_device,
# on 1 GPU and on all GPUs, a jax.profiler trace of the all-GPU step (summarized by trace_summary.py, with
# per-device busy/idle and collective time not hidden behind compute), and the all-GPU step under XLA flag
# variants that change how the gradient all-reduce is scheduled.
#   bash benchmarks/scaling_probe.sh OUT_DIR
set -uo pipefail
out=${1:?usage: scaling_probe.sh OUT_DIR}
out=$(mkdir -p "$out" && cd "$out" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
n=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi topo -m > "$out/topo.txt" 2>&1
common=(model=resnet50 dataset=synthetic dataset.num_classes=1000 precision=bf16 optimizer=sgd optimizer.lr=0.1
        optimizer.weight_decay=1e-4 schedule=constant augment=none logging.progress=false parallel.batch_stats=per_device)
bench() {  # bench NAME GPUS [--profile DIR] [ENV=VALUE...]
  local name=$1 gpus=$2; shift 2
  local args=() envs=()
  for a in "$@"; do case $a in *=*) envs+=("$a") ;; *) args+=("$a") ;; esac; done
  (cd /tmp && env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((gpus - 1)))" "${envs[@]}" python3 -m prism.framework bench train \
     --steps 30 --warmup 10 --out "$out/$name.json" "${args[@]}" "${common[@]}" train.batch_size=$((256 * gpus)) \
     dataset.train_size=$((1024 * gpus))) 2>&1 | grep -E "^train:|rror" || echo "$name failed"
}
bench probe-1gpu 1
bench probe-${n}gpu-profiled "$n" --profile /tmp/prism-profile
python3 "$here/benchmarks/trace_summary.py" /tmp/prism-profile --top 15 > "$out/profile-${n}gpu.md" 2>&1
bench probe-${n}gpu-combine8mb "$n" XLA_FLAGS=--xla_gpu_all_reduce_combine_threshold_bytes=8388608
bench probe-${n}gpu-lhs "$n" XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true
bench probe-${n}gpu-nocombine "$n" XLA_FLAGS=--xla_gpu_all_reduce_combine_threshold_bytes=0
