#!/usr/bin/env bash
# What each ResNet-50 step change buys: prism's Trainer step (bench train) in several variants, against
# torch.compile, all on the same GPU in the same job (batch 256, 224x224, bf16, SGD, synthetic on-device batch).
#   [STEPS=100] [MODEL=resnet50] [TORCH=1] [VARIANTS="name|prism overrides|extra XLA flags;..."] \
#     bash benchmarks/resnet50_ab.sh OUT_DIR
# MODEL: any registered model (the torch.compile peer runs for resnet50 and vit_b16 only; TORCH=0 skips it).
# Writes OUT_DIR/<variant>.json and torch_compile.json, then prints a table: img/s, median step time, ratio to
# torch.compile and to the first variant. With PROFILE=1 the last variant also writes a jax.profiler trace and
# XLA's optimized HLO (OUT_DIR/profile, OUT_DIR/hlo) for benchmarks/trace_summary.py / fusion_bandwidth.py.
set -euo pipefail
out=${1:?usage: resnet50_ab.sh OUT_DIR}
out=$(mkdir -p "$out" && cd "$out" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
steps=${STEPS:-100}
default_variants="direct|model.stem_conv=direct|;space_to_depth|model.stem_conv=space_to_depth|"
variants=${VARIANTS:-$default_variants}
model=${MODEL:-resnet50}
common=(model=$model dataset=synthetic dataset.train_size=2048 dataset.num_classes=1000 train.batch_size=256
        precision=bf16 optimizer=sgd optimizer.lr=0.1 optimizer.weight_decay=1e-4 schedule=constant augment=none
        logging.progress=false)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)" \
  > "$out/versions.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  >> "$out/versions.txt" 2>/dev/null || true
if [ "${TORCH:-1}" = 1 ] && { [ "$model" = resnet50 ] || [ "$model" = vit_b16 ]; }; then
  python3 "$here/benchmarks/torch_peer.py" --model "$model" --batch 256 --mode compile --steps "$steps" \
    --out "$out/torch_compile.json" || echo "torch.compile peer failed" >&2
fi
IFS=';' read -ra specs <<< "$variants"
last=$((${#specs[@]} - 1))
for i in "${!specs[@]}"; do
  IFS='|' read -r name overrides flags <<< "${specs[$i]}"
  extra=()
  if [ "${PROFILE:-0}" = 1 ] && [ "$i" = "$last" ]; then
    extra=(--profile "$out/profile")
    flags="$flags --xla_dump_to=$out/hlo --xla_dump_hlo_module_re=.*train_step.* --xla_dump_hlo_as_text"
  fi
  # shellcheck disable=SC2086  # overrides are space-separated key=value words
  (cd /tmp && XLA_FLAGS="${XLA_FLAGS:-} $flags" python3 -m prism.framework bench train --steps "$steps" --warmup 10 \
     --out "$out/$name.json" "${extra[@]}" "${common[@]}" $overrides) || echo "variant $name failed" >&2
  echo "$name|$overrides|$flags" >> "$out/variants.txt"
done
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
torch = json.loads((out / "torch_compile.json").read_text()) if (out / "torch_compile.json").exists() else None
rows = [line.split("|") for line in (out / "variants.txt").read_text().splitlines()]
print("| variant | prism overrides | XLA flags | img/s | ms/step (median) | vs first | vs torch.compile |")
print("|---|---|---|---|---|---|---|")
if torch:
    print(f"| torch.compile | | | {torch['img_s']:,.0f} | {torch['step_ms_median']:.1f} | | 1.00x |")
first = None
for name, overrides, flags in rows:
    path = out / f"{name}.json"
    if not path.exists():
        print(f"| {name} | {overrides} | {flags.strip()} | failed | | | |")
        continue
    r = json.loads(path.read_text())
    first = first or r["img_s"]
    vs_torch = f"{r['img_s'] / torch['img_s']:.3f}x" if torch else "n/a"
    shown = " ".join(f for f in flags.split() if not f.startswith("--xla_dump"))
    print(f"| {name} | {overrides} | {shown} | {r['img_s']:,.0f} | {r['step_ms_median']:.1f} | "
          f"{r['img_s'] / first:.3f}x | {vs_torch} |")
PY
