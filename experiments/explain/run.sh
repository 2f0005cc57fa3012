#!/usr/bin/env bash
# Explanations of a CIFAR-10 ResNet-18 and ViT: overlays (Grad-CAM, IG, rollout) and deletion/insertion AUC
# against random maps (prism explain, task=explain_faithfulness). Small models trained on the 2-core CPU:
#   bash experiments/explain/run.sh            # ~40 min of training (both models at once) + ~10 min of explaining
# WORK (default /tmp/explain) holds the extracted JPEGs, the prepared dataset and the runs; nothing lands in git.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/explain
WORK=${WORK:-/tmp/explain}
TAR=${CIFAR10_TAR:-../shared/data/cifar10_jpeg/cifar10.tar.xz}
PRISM=${PRISM:-.venv/bin/prism}
N_EVAL=${N_EVAL:-200}     # test images the AUCs are computed over
mkdir -p "$WORK/runs"
[ -d "$WORK/test" ] || tar -xJf "$TAR" -C "$WORK"

DATA="dataset=image_folder dataset.path=$WORK dataset.data_dir=$WORK/tfds dataset.mean=[0.4914,0.4822,0.4465]
      dataset.std=[0.2470,0.2435,0.2616] dataset.eval_split='test[:1000]' augment=hflip train.steps=400
      train.batch_size=64 train.eval_every=200 train.eval_batch_size=250 logging.progress=false logging.render=0"
train() {  # NAME ARGS...: train once (a finished run is reused)
  local name=$1; shift
  [ -f "$WORK/runs/$name/result.json" ] && grep -q '"completed"' "$WORK/runs/$name/result.json" && return 0
  nice -n 10 $PRISM train "$@" $DATA hydra.run.dir="$WORK/runs/$name" > "$WORK/runs/$name.log" 2>&1
}
train resnet18 model=resnet18 model.stem=cifar model.width=8 optimizer.lr=3e-3 &
train vit model=vit_ti16 model.patch_size=4 model.embed_dim=64 model.depth=4 model.num_heads=4 optimizer.lr=1e-3 &
wait

# A few test images: the first of each of five classes.
PICS="$WORK/pictures"
mkdir -p "$PICS"
for c in airplane automobile bird cat dog; do cp "$(ls "$WORK/test/$c" | head -1 | sed "s|^|$WORK/test/$c/|")" "$PICS/$c.jpg"; done

explain() {  # RUN METHOD [ARGS...]: overlays of the pictures into $WORK/explain/RUN-METHOD
  local run=$1 method=$2; shift 2
  [ -f "$WORK/explain/$run-$method/explanations.json" ] && return 0
  $PRISM explain checkpoint="$WORK/runs/$run" input="$PICS" method="$method" out="$WORK/explain/$run-$method" "$@" \
    > /dev/null
}
explain resnet18 gradcam
explain resnet18 ig
explain vit rollout
explain vit gradcam

faithfulness() {  # RUN METHOD [ARGS...]: deletion/insertion AUC over the first N_EVAL test images
  local run=$1 method=$2; shift 2
  [ -s "$WORK/faith/$run-$method.json" ] && return 0
  $PRISM eval checkpoint="$WORK/runs/$run" task=explain_faithfulness task.method="$method" \
    "dataset.eval_split='test[:$N_EVAL]'" train.eval_batch_size=100 eval.out="$WORK/faith/$run-$method" "$@" \
    | tail -1 > "$WORK/faith/$run-$method.json"
}
mkdir -p "$WORK/faith"
faithfulness resnet18 gradcam
faithfulness resnet18 gradcam_pp
faithfulness resnet18 ig
faithfulness resnet18 smoothgrad
faithfulness vit rollout
faithfulness vit gradcam
faithfulness vit ig

.venv/bin/python $HERE/report.py "$WORK" "$HERE"
