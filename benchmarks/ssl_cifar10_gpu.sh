#!/usr/bin/env bash
# Self-supervised pre-training on CIFAR-10 (the JPEG copy) on one GPU, end to end: prism's
# +experiment=<method>_cifar10_resnet18 presets (solo-learn's recipes, shortened), with the online linear probe
# every epoch and a weighted kNN (k=200, T=0.1) on frozen features every 10 epochs and at the end.
#
#   bash benchmarks/ssl_cifar10_gpu.sh OUT
#   SSL_METHODS="simclr byol" SSL_EPOCHS=100 bash benchmarks/ssl_cifar10_gpu.sh OUT
#
# Inputs (carry them as the git-ignored .e2e/ folder, as for benchmarks/e2e_gpu.sh): $E2E_DIR/cifar10.tar.xz
# (shared/data/cifar10_jpeg/cifar10.tar.xz) and $E2E_DIR/whl (shared/tools/gpu-wheels output).
# Settings: SSL_METHODS (simclr), SSL_EPOCHS (100), SSL_BATCH (512; the preset's learning rate is scaled
# linearly from its batch 256, as solo-learn scales it), SSL_PRECISION (bf16), SSL_LIMIT_S (540 per method),
# SSL_OVERRIDES (more key=value overrides), SSL_WORK (/tmp/prism-ssl: data, prepared dataset, compilation cache;
# kept between calls on a warm machine).
# Writes OUT/<method>/{result.json,metrics.jsonl,log.txt,cmd.txt,process.json} and OUT/summary.md.
set -uo pipefail
out=${1:?usage: ssl_cifar10_gpu.sh OUT}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
e2e=${E2E_DIR:-$here/.e2e}
work=${SSL_WORK:-/tmp/prism-ssl}
methods=${SSL_METHODS:-simclr}
epochs=${SSL_EPOCHS:-100}
batch=${SSL_BATCH:-512}
precision=${SSL_PRECISION:-bf16}
limit=${SSL_LIMIT_S:-540}
data=$work/cifar10
mkdir -p "$work"
export PYTHONUNBUFFERED=1 PRISM_DATA_DIR=$work/tfds PRISM_CACHE_DIR=$work/cache PRISM_CIFAR10=$data

. "$here/benchmarks/gpu_env.sh" "$e2e/whl" "$work"
if [ ! -f "$work/cifar10.complete" ]; then
  rm -rf "$data" && mkdir -p "$data" && tar -xJf "$e2e/cifar10.tar.xz" -C "$data" && touch "$work/cifar10.complete"
fi

lr_for() {  # the preset's lr (at batch 256) scaled to $batch
  case $1 in simclr) base=0.4 ;; byol) base=1.0 ;; *) base=$(python3 -c "
from prism.framework.config import compose; print(compose(['+experiment=$1_cifar10_resnet18']).optimizer.lr)") ;; esac
  python3 -c "print($base * $batch / 256)"
}

echo "| method | epochs | batch | online probe top-1 | kNN top-1 | train s | process s | img/s (loop) |" > "$out/summary.md"
echo "|---|---|---|---|---|---|---|---|" >> "$out/summary.md"
for method in $methods; do
  dir=$out/$method && mkdir -p "$dir"
  run_dir=$work/runs/$method-$(date +%s)
  cmd=(python3 -m prism.framework train "+experiment=${method}_cifar10_resnet18" "train.epochs=$epochs"
       "train.batch_size=$batch" "optimizer.lr=$(lr_for "$method")" "precision=$precision" "logging.progress=false"
       "logging.tensorboard=false" "hydra.run.dir=$run_dir" ${SSL_OVERRIDES:-})
  printf '%q ' "${cmd[@]}" > "$dir/cmd.txt"
  t0=$(date +%s.%N)
  (cd "$here" && timeout --kill-after=10 "$limit" "${cmd[@]}") > "$dir/log.txt" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  printf '{"process_s": %.3f, "rc": %d, "limit_s": %d}\n' "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b - a}')" "$rc" "$limit" > "$dir/process.json"
  cp "$run_dir/result.json" "$run_dir/metrics.jsonl" "$dir/" 2>/dev/null
  python3 - "$dir" "$method" "$epochs" "$batch" >> "$out/summary.md" <<'EOF'
import json, sys
from pathlib import Path
d, method, epochs, batch = Path(sys.argv[1]), *sys.argv[2:]
proc = json.loads((d / "process.json").read_text())
try:
    r = json.loads((d / "result.json").read_text())
except (OSError, ValueError):
    print(f"| {method} | {epochs} | {batch} | (no result: rc {proc['rc']}) | | | {proc['process_s']:.0f} | |")
    raise SystemExit
m, t = r["metrics"], r.get("timing", {})
pct = lambda k: f"{100 * m[k]:.2f} %" if k in m else "-"  # noqa: E731
print(f"| {method} | {epochs} | {batch} | {pct('eval/online_probe/top1')} | {pct('knn/knn/top1')} | "
      f"{t.get('train_s', 0):.0f} | {proc['process_s']:.0f} | {r.get('loop_images_per_s') or 0:,.0f} |")
EOF
done
cat "$out/summary.md"
