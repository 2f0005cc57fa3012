#!/usr/bin/env bash
# One supervised CIFAR-10 (JPEG copy) training run of a preset on one GPU, its run directory (checkpoint
# included) copied to OUT, e.g. for the models that the CPU-side experiments export, quantize or explain:
#
#   bash benchmarks/train_cifar10_gpu.sh OUT +experiment=mobilenet_v2_cifar10 [key=value ...]
#
# Inputs as for benchmarks/ssl_cifar10_gpu.sh (the git-ignored .e2e/ folder, carried): $E2E_DIR/cifar10.tar.xz
# and $E2E_DIR/whl. Settings: TRAIN_LIMIT_S (540), TRAIN_WORK (/tmp/prism-train).
# Writes OUT/run/ (result.json, metrics.jsonl, checkpoints/, .hydra/), OUT/log.txt, OUT/cmd.txt, OUT/process.json.
set -uo pipefail
out=${1:?usage: train_cifar10_gpu.sh OUT OVERRIDES...}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
e2e=${E2E_DIR:-$here/.e2e}
work=${TRAIN_WORK:-/tmp/prism-train}
limit=${TRAIN_LIMIT_S:-540}
data=$work/cifar10
mkdir -p "$work"
export PYTHONUNBUFFERED=1 PRISM_DATA_DIR=$work/tfds PRISM_CACHE_DIR=$work/cache PRISM_CIFAR10=$data

. "$here/benchmarks/gpu_env.sh" "$e2e/whl" "$work"
if [ ! -f "$work/cifar10.complete" ]; then
  rm -rf "$data" && mkdir -p "$data" && tar -xJf "$e2e/cifar10.tar.xz" -C "$data" && touch "$work/cifar10.complete"
fi

run_dir=$out/run
cmd=(python3 -m prism.framework train "$@" "logging.tensorboard=false" "checkpoint.keep=1" "hydra.run.dir=$run_dir")
printf '%q ' "${cmd[@]}" > "$out/cmd.txt"
t0=$(date +%s.%N)
(cd "$here" && timeout --kill-after=10 "$limit" "${cmd[@]}") > "$out/log.txt" 2>&1
rc=$?
t1=$(date +%s.%N)
printf '{"process_s": %.3f, "rc": %d, "limit_s": %d}\n' "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b - a}')" "$rc" "$limit" \
  > "$out/process.json"
tail -5 "$out/log.txt"
