#!/usr/bin/env bash
# Self-supervised pre-training on Fashion-MNIST, evaluated offline, and the table in experiments/README.md.
#
#   1. SimCLR and BYOL pre-training: prism train +experiment=simclr_fashion_mnist / byol_fashion_mnist
#      (ARCH=resnet18: the ..._fashion_mnist_resnet18 presets; runs named simclr_resnet18, byol_resnet18)
#   2. for each run: linear probe and weighted kNN on its frozen backbone at the last step (prism eval
#      eval.step=latest eval.tasks=[linear_probe,knn]; not the checkpoint chosen by the online probe's test accuracy)
#   3. the baseline: the same probe and kNN on the same architecture with the SimCLR run's initial weights,
#      untrained (prism eval eval.step=init; BYOL's run starts from the same backbone weights: same seed)
#   4. experiments/ssl_table.py: copies the runs' small files to experiments/ssl_fashion_mnist/<run>/ and
#      writes the table between the ssl-table markers of experiments/README.md, with the runs recorded there
#      before (other backbones, other sessions) kept as they are
#
# Usage, from anywhere:   bash experiments/ssl_fashion_mnist/run.sh [RUNS_DIR]
#   RUNS_DIR  where the runs (with checkpoints) go; default outputs/ssl_fashion_mnist
#   DATA      folder of the four Fashion-MNIST idx .gz files; default /usr/share/datasets/fashion-mnist
#   PYTHON    interpreter with prism's dependencies; default python3
#   ARCH      '' (default: simple_cnn presets) or resnet18 (CIFAR-stem ResNet-18 presets)
#   METHODS   which pre-trainings to run; default "simclr byol" (the baseline is evaluated on the first)
#   STAGES    default "train eval baseline"; e.g. STAGES=baseline evaluates only the untrained backbone of
#             RUNS_DIR/<first method> (its .hydra/config.yaml suffices: no checkpoints needed)
#   EPOCHS    pre-training epochs instead of the presets' (train.epochs)
#   EXTRA     more pre-training overrides of the presets' keys, space-separated (e.g. "model.widths=[64,128,256]";
#             another model needs its own preset, as ARCH=resnet18 has)
#   SMOKE=1   a CPU-sized check of the whole chain (1000 training images, tiny CNN, a few steps); its records
#             and README go to RUNS_DIR/record and RUNS_DIR/README.md instead of experiments/
#   OUT       when set (device machines), experiments/ssl_fashion_mnist and experiments/README.md are copied there
# Budget: <= 6 minutes on one H100 (estimated ~4-5 min before the first GPU run: ~3.5 s per pre-training epoch,
# ~20 s start-up per process; hw.txt records the measured total). EPOCHS=10 if it runs over.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RUNS=${1:-outputs/ssl_fashion_mnist}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
PY=${PYTHON:-python3}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$RUNS/.jax_cache}
mkdir -p "$RUNS"

SUFFIX=${ARCH:+_$ARCH}
read -r -a METHOD_LIST <<< "${METHODS:-simclr byol}"
TRAIN_EXTRA=() EVAL_EXTRA=() RECORD=experiments/ssl_fashion_mnist README=experiments/README.md
if [ "${SMOKE:-0}" = 1 ]; then
  TRAIN_EXTRA=(train.steps=8 train.batch_size=32 train.eval_batch_size=100
               objective.proj_hidden_dim=32 objective.proj_output_dim=16 "dataset.train_split='train[:1000]'"
               "dataset.eval_split='test[:300]'" dataset.cache=false logging.tensorboard=false logging.plots=false)
  if [ -n "$SUFFIX" ]; then TRAIN_EXTRA+=(model.width=4); else TRAIN_EXTRA+=("model.widths=[8,16]"); fi
  EVAL_EXTRA=(task.epochs=5)
  RECORD=$RUNS/record README=$RUNS/README.md
fi

started=$(date +%s)
read -r -a STAGE_LIST <<< "${STAGES:-train eval baseline}"
stage() { [[ " ${STAGE_LIST[*]} " =~ " $1 " ]]; }
names=()
for method in "${METHOD_LIST[@]}"; do names+=("$method$SUFFIX"); done
for method in "${METHOD_LIST[@]}"; do
  stage train || break
  name=$method$SUFFIX
  extra=("${TRAIN_EXTRA[@]}")
  if [ -n "${EXTRA:-}" ]; then read -r -a more <<< "$EXTRA"; extra+=("${more[@]}"); fi
  if [ "${SMOKE:-0}" = 1 ] && [ $method = byol ]; then extra+=(objective.pred_hidden_dim=32); fi
  $PY -m prism.framework train +experiment=${method}_fashion_mnist$SUFFIX dataset.path="$DATA" logging.progress=false \
      ${EPOCHS:+train.epochs=$EPOCHS} "${extra[@]}" hydra.run.dir="$RUNS/$name"
done
for name in "${names[@]}"; do  # linear probe and kNN in one process: one checkpoint load, one feature pass
  stage eval || break
  $PY -m prism.framework eval checkpoint="$RUNS/$name" eval.step=latest "eval.tasks=[linear_probe,knn]" "${EVAL_EXTRA[@]}" \
      eval.out="$RUNS/$name/eval"
done
if stage baseline; then  # the untrained backbone, on the first run (all start from the same weights)
  $PY -m prism.framework eval checkpoint="$RUNS/${names[0]}" eval.step=init "eval.tasks=[linear_probe,knn]" "${EVAL_EXTRA[@]}" \
      eval.out="$RUNS/${names[0]}/eval/init"
fi

{
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=count,name,driver_version --format=csv,noheader | head -1
  else
    echo "CPU only, $(nproc) cores"
  fi
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  echo "run.sh stages ${STAGE_LIST[*]} of ${names[*]} (start-ups included): $(( $(date +%s) - started )) s"
} > "$RUNS/hw.txt"
# the table: these runs, plus the runs recorded earlier (other backbones or sessions), read in place
runs=()
for recorded in "$RECORD"/*/; do
  recorded=${recorded%/}
  if [ -f "$recorded/result.json" ] && [[ ! " ${names[*]} " =~ " ${recorded##*/} " ]]; then runs+=("$recorded"); fi
done
for name in "${names[@]}"; do runs+=("$RUNS/$name"); done
$PY experiments/ssl_table.py "${runs[@]}" --record "$RECORD" --hardware "$RUNS/hw.txt" --write "$README"
cat "$RUNS/hw.txt"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/experiments" && cp -r "$RECORD" "$README" "$OUT/experiments/"
fi
