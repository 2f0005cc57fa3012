#!/usr/bin/env bash
# The JPEG input pipeline on a GPU host: host decode + resize (grain workers), on-device random-resized-crop
# 224 + flip, and ResNet-50 training fed by it against the same step on an on-device synthetic batch.
#   bash benchmarks/pipeline_gpu.sh OUT_DIR [WORKERS]
# Wheels for a bare GPU image: $E2E_DIR/whl (default .e2e/whl, shared/tools/gpu-wheels output), as for e2e_gpu.sh.
set -euo pipefail
out=${1:?usage: pipeline_gpu.sh OUT_DIR [WORKERS]}
workers=${2:-$(nproc)}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
. "$here/benchmarks/gpu_env.sh" "${E2E_DIR:-$here/.e2e}/whl" /tmp/prism-pipeline
python3 "$here/benchmarks/make_jpegs.py" /tmp/prism-jpegs --images 8192 --classes 10 --size 320 256
common=(dataset=image_folder dataset.path=/tmp/prism-jpegs "dataset.image_size=[256,256]" dataset.test_fraction=0.05
        train.batch_size=256 loader.placement=host loader.workers=$workers loader.prefetch=4 augment=flip_crop "augment.ops.0.size=[224,224]"
        logging.progress=false)
train=(model=resnet50 precision=bf16 optimizer=sgd optimizer.lr=0.1 optimizer.weight_decay=1e-4 schedule=constant)
cd /tmp
python3 -m prism.framework bench data --batches 40 --warmup 5 --out "$out/pipeline-data.json" "${common[@]}"
python3 -m prism.framework bench train --data synthetic --steps 30 --warmup 10 --out "$out/pipeline-train-synthetic.json" \
  "${common[@]}" "${train[@]}"
python3 -m prism.framework bench train --data pipeline --steps 30 --warmup 10 --out "$out/pipeline-train-jpeg.json" \
  "${common[@]}" "${train[@]}"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
synthetic, jpeg = (json.loads((out / f"pipeline-train-{k}.json").read_text()) for k in ("synthetic", "jpeg"))
key = "img_s"  # whole timed loop, images per second
ratio = jpeg[key] / synthetic[key]
print(f"ResNet-50 step fed by the JPEG host pipeline: {jpeg[key]:,.0f} img/s vs {synthetic[key]:,.0f} synthetic "
      f"({100 * (ratio - 1):+.1f} %, gate >= -5 %)")
(out / "summary.json").write_text(json.dumps({"synthetic_img_s": synthetic[key], "jpeg_img_s": jpeg[key],
                                              "ratio": ratio}, indent=2) + "\n")
PY
