#!/usr/bin/env bash
# prism's train step against its PyTorch peers, interleaved on the same GPU in the same job.
#   [STEPS=30] [TORCH_MODES="eager compile"] bash benchmarks/run_gpu.sh OUT_DIR [resnet50 vit_b16 simclr_resnet50]
# Each model: torch eager, torch.compile, prism (bench train, synthetic on-device batch), batch 256, 224x224,
# bf16, SGD momentum 0.9 + weight decay 1e-4. Writes OUT_DIR/<model>-<impl>.json; then
# `python benchmarks/results_table.py OUT_DIR` prints the Markdown table for benchmarks/RESULTS.md.
set -euo pipefail
out=${1:?usage: run_gpu.sh OUT_DIR [models...]}
shift
models=${*:-resnet50 vit_b16 simclr_resnet50}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
batch=${BATCH:-256}
steps=${STEPS:-30}
torch_modes=${TORCH_MODES:-eager compile}
common=(dataset=synthetic dataset.train_size=$((batch * 8)) dataset.num_classes=1000 train.batch_size=$batch
        precision=bf16 optimizer=sgd optimizer.lr=0.1 optimizer.weight_decay=1e-4 schedule=constant
        augment=none logging.progress=false)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)" \
  > "$out/versions.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  >> "$out/versions.txt" 2>/dev/null || true
for model in $models; do
  case $model in
    resnet50) prism=(model=resnet50) ;;
    vit_b16) prism=(model=vit_b16) ;;
    simclr_resnet50) prism=(model=resnet50 objective=simclr task=ssl objective.online_probe=false
                            "augment.views=[[{name:hflip,p:0.5}],[{name:hflip,p:0.5}]]") ;;
    *) echo "unknown model $model" >&2; exit 2 ;;
  esac
  for mode in $torch_modes; do
    python3 "$here/benchmarks/torch_peer.py" --model "$model" --batch "$batch" --mode "$mode" --steps "$steps" \
      --out "$out/$model-torch_$mode.json" || echo "torch $mode $model failed" >&2
  done
  (cd /tmp && python3 -m prism.framework bench train --steps "$steps" --warmup 10 --out "$out/$model-prism.json" \
     "${common[@]}" "${prism[@]}") || echo "prism $model failed" >&2
done
python3 "$here/benchmarks/results_table.py" "$out"
