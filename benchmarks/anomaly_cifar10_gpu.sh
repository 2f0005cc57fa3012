#!/usr/bin/env bash
# One-class anomaly detection on CIFAR-10 (the JPEG copy) on one GPU: kNN on frozen self-supervised features.
#
#   bash benchmarks/anomaly_cifar10_gpu.sh OUT
#   AN_SEEDS="0 1 2" AN_EPOCHS=100 bash benchmarks/anomaly_cifar10_gpu.sh OUT
#
# Per seed: (1) SimCLR pre-training of a CIFAR-stem ResNet-18 on the 50,000 training images without their labels
# (+experiment=simclr_cifar10_resnet18, AN_EPOCHS epochs; the features see the images of all ten classes, never a
# label, never a test image); (2) for each normal class K: prism eval of that run with task=anomaly (kNN, k=2,
# cosine, the bank = the 5,000 training images of class K) and dataset.one_class=K over the 10,000 test images.
# Once: the nothing-learned baseline +experiment=anomaly_cifar10_knn_pixels for each K.
# Inputs, as for benchmarks/ssl_cifar10_gpu.sh: $E2E_DIR/cifar10.tar.xz (shared/data/cifar10_jpeg/cifar10.tar.xz)
# and $E2E_DIR/whl (shared/tools/gpu-wheels output), E2E_DIR defaulting to .e2e/ in the checkout.
# Settings: AN_SEEDS ("0 1 2"), AN_EPOCHS (100), AN_BATCH (512, lr scaled linearly from the preset's 0.4 at 256),
# AN_PRECISION (bf16), AN_LIMIT_S (540 per pre-training), AN_WORK (/tmp/prism-anomaly), AN_PIXELS (1: run the
# baseline). Writes OUT/cifar10_knn_simclr/class<K>_seed<S>/result.json (+ config.yaml, score_histogram.png),
# OUT/cifar10_knn_pixels/class<K>_seed0/..., OUT/ssl_seed<S>/{result.json,log.txt,cmd.txt}, OUT/hw.txt and
# OUT/README.md (the table of experiments/anomaly_one_class/table.py). Copy OUT/cifar10_* into
# experiments/anomaly_one_class/ and rerun the table there. Budget: 3 x (<= 540 s + ~10 x 25 s) + 10 x 25 s.
set -uo pipefail
out=${1:?usage: anomaly_cifar10_gpu.sh OUT}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
e2e=${E2E_DIR:-$here/.e2e}
work=${AN_WORK:-/tmp/prism-anomaly}
seeds=${AN_SEEDS:-0 1 2}
epochs=${AN_EPOCHS:-100}
batch=${AN_BATCH:-512}
precision=${AN_PRECISION:-bf16}
limit=${AN_LIMIT_S:-540}
data=$work/cifar10
mkdir -p "$work"
export PYTHONUNBUFFERED=1 PRISM_DATA_DIR=$work/tfds PRISM_CACHE_DIR=$work/cache PRISM_CIFAR10=$data

. "$here/benchmarks/gpu_env.sh" "$e2e/whl" "$work"
if [ ! -f "$work/cifar10.complete" ]; then
  rm -rf "$data" && mkdir -p "$data" && tar -xJf "$e2e/cifar10.tar.xz" -C "$data" && touch "$work/cifar10.complete"
fi
lr=$(python3 -c "print(0.4 * $batch / 256)")

record() {  # record DIR RESULT_DIR: the small files of one anomaly evaluation
  mkdir -p "$1" && cp "$2/result.json" "$1/" 2>/dev/null
  cp "$2/config.yaml" "$1/" 2>/dev/null || cp "$2/.hydra/config.yaml" "$1/config.yaml" 2>/dev/null
  cp "$2/predictions/score_histogram.png" "$1/" 2>/dev/null
  return 0
}

for seed in $seeds; do
  run_dir=$work/runs/simclr_seed$seed
  dir=$out/ssl_seed$seed && mkdir -p "$dir"
  cmd=(python3 -m prism.framework train +experiment=simclr_cifar10_resnet18 "seed=$seed" "train.epochs=$epochs"
       "train.batch_size=$batch" "optimizer.lr=$lr" "precision=$precision" "logging.progress=false"
       "logging.tensorboard=false" "~evals" "hydra.run.dir=$run_dir")
  printf '%q ' "${cmd[@]}" > "$dir/cmd.txt"
  if [ ! -f "$run_dir/result.json" ] || ! grep -q '"completed"' "$run_dir/result.json"; then
    (cd "$here" && timeout --kill-after=10 "$limit" "${cmd[@]}") > "$dir/log.txt" 2>&1
  fi
  cp "$run_dir/result.json" "$dir/" 2>/dev/null
  for k in 0 1 2 3 4 5 6 7 8 9; do
    eval_dir=$work/evals/simclr_seed$seed/class$k
    (cd "$here" && python3 -m prism.framework eval checkpoint="$run_dir" eval.step=latest task=anomaly task.scorer=knn \
        task.k=2 task.distance=cosine dataset.one_class=$k logging.render=8 eval.out="$eval_dir") \
        >> "$dir/eval_log.txt" 2>&1
    record "$out/cifar10_knn_simclr/class${k}_seed$seed" "$eval_dir"
  done
done
if [ "${AN_PIXELS:-1}" = 1 ]; then
  for k in 0 1 2 3 4 5 6 7 8 9; do
    run_dir=$work/runs/pixels/class$k
    (cd "$here" && python3 -m prism.framework train +experiment=anomaly_cifar10_knn_pixels dataset.one_class=$k \
        logging.progress=false hydra.run.dir="$run_dir") >> "$out/pixels_log.txt" 2>&1
    record "$out/cifar10_knn_pixels/class${k}_seed0" "$run_dir"
  done
fi
{ nvidia-smi --query-gpu=count,name,driver_version --format=csv,noheader 2>/dev/null | head -1
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } > "$out/hw.txt"
python3 "$here/experiments/anomaly_one_class/table.py" "$out" --write "$out/README.md"
cat "$out/README.md"
