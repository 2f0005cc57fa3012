#!/usr/bin/env bash
# One-class anomaly detection on Fashion-MNIST: one prism run per (method, normal class, seed), then the table.
#
#   bash experiments/anomaly_one_class/run.sh [RUNS_DIR]
#   RUNS_DIR  where the runs go; default outputs/anomaly_one_class
#   METHODS   presets to run, default "knn": knn -> +experiment=anomaly_fashion_mnist_knn,
#             svdd -> anomaly_fashion_mnist_svdd, ae -> anomaly_fashion_mnist_ae
#   CLASSES   normal classes, default "0 1 2 3 4 5 6 7 8 9"
#   SEEDS     default "0" (knn on fixed pixels is deterministic: the seed changes nothing), e.g. "0 1 2"
#   DATA      folder of the Fashion-MNIST idx .gz files; default /usr/share/datasets/fashion-mnist
#   EXTRA     more overrides for every run, space-separated
#   PYTHON    interpreter with prism installed; default python3
# Each run's result.json, config and score histogram are copied to experiments/anomaly_one_class/<method>/
# class<K>_seed<S>/ (RECORD=DIR elsewhere); the table in
# experiments/anomaly_one_class/README.md is written by experiments/anomaly_one_class/table.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RUNS=${1:-outputs/anomaly_one_class}
PY=${PYTHON:-python3}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
RECORD=${RECORD:-experiments/anomaly_one_class}
read -r -a METHOD_LIST <<< "${METHODS:-knn}"
read -r -a CLASS_LIST <<< "${CLASSES:-0 1 2 3 4 5 6 7 8 9}"
read -r -a SEED_LIST <<< "${SEEDS:-0}"
extra=()
if [ -n "${EXTRA:-}" ]; then read -r -a extra <<< "$EXTRA"; fi
for method in "${METHOD_LIST[@]}"; do
  for seed in "${SEED_LIST[@]}"; do
    for k in "${CLASS_LIST[@]}"; do
      run=$RUNS/$method/class${k}_seed$seed
      if [ -f "$run/result.json" ] && grep -q '"completed"' "$run/result.json"; then continue; fi
      $PY -m prism.framework train +experiment=anomaly_fashion_mnist_$method dataset.path="$DATA" \
          dataset.one_class=$k seed=$seed logging.progress=false "${extra[@]}" hydra.run.dir="$run"
      mkdir -p "$RECORD/$method/class${k}_seed$seed"
      cp "$run/result.json" "$RECORD/$method/class${k}_seed$seed/"
      cp "$run/.hydra/config.yaml" "$RECORD/$method/class${k}_seed$seed/config.yaml"
      if [ -f "$run/predictions/score_histogram.png" ]; then
        cp "$run/predictions/score_histogram.png" "$RECORD/$method/class${k}_seed$seed/"
      fi
    done
  done
done
{ echo "CPU only, $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"; } > "$RECORD/hw.txt"
$PY "$RECORD/table.py" "$RECORD" --write "$RECORD/README.md"
