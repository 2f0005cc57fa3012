#!/usr/bin/env bash
# End to end on one GPU, in one job: CIFAR-10 from its JPEG archive through airbench94 (its own code), prism's
# +experiment=cifar10_airbench94, prism's CIFAR ResNet-18 against plain PyTorch, and prism's synthetic step.
#
#   bash benchmarks/e2e_gpu.sh OUT
#   E2E_STAGES=prepare,airbench,prism94 bash benchmarks/e2e_gpu.sh OUT     # a subset (one device call each)
#   python benchmarks/e2e_summary.py OUT_CALL1 OUT_CALL2 --out MERGED     # here: merge several calls' OUTs
#
# Inputs (the GPU machine has no network and no /work/shared; carry these as git-ignored files):
#   E2E_DIR            .e2e (in the repo root)              the folder holding the three below
#   E2E_CIFAR_TAR      $E2E_DIR/cifar10.tar.xz             shared/data/cifar10_jpeg/cifar10.tar.xz
#   E2E_AIRBENCH_SDIST $E2E_DIR/airbench-0.1.8.tar.gz      `pip download airbench==0.1.8 --no-deps` (or its
#                                                           unpacked folder holding airbench/)
#   E2E_WHEELS         $E2E_DIR/whl                         shared/tools/gpu-wheels output (hydra, tfds, grain,
#                                                           tensorboardX); installed only if they don't import
# Settings:
#   E2E_STAGES   prepare,airbench,prism94,resnet18,torch,synthetic  (always run in this order; data is
#                extracted on demand by any stage that needs it, so each works alone on a fresh machine)
#   E2E_WORK     /tmp/prism-e2e   raw outputs, extracted data, prism's prepared dataset and compilation cache;
#                kept between calls on a warm machine; a stage clears only its own folder
#   E2E_SEEDS "0 1 2 3 4"  E2E_AIRBENCH_RUNS 5  E2E_RESNET_EPOCHS 10  E2E_TORCH_ARGS "" (e.g. --compile)
#   E2E_DATASET_KEY dataset.path (the image_folder key the airbench94 preset reads; it also reads $PRISM_CIFAR10)
#   E2E_PRISM_PREPARE 1: before the seeds, one `prism bench data` process prepares the JPEG folder as prism's
#                TFDS dataset, so seed 0's process time does not include that one-off step (0: skip it)
#   E2E_DEADLINE_S 550: the whole job; a stage's limit is cut to what is left (20 s kept for the summary),
#                stages and seeds with < 30 s left are skipped (noted in summary.md)
#   Per-stage limits (s): E2E_LIMIT_PREPARE 120, E2E_LIMIT_AIRBENCH 150, E2E_LIMIT_PRISM94 360 (the stage) with
#                E2E_LIMIT_PRISM94_RUN 150 (one seed), E2E_LIMIT_RESNET18 200, E2E_LIMIT_TORCH 180,
#                E2E_LIMIT_SYNTHETIC 150
# Writes OUT/summary.json, OUT/summary.md, OUT/stages.json (all parsed figures) and OUT/logs.tgz (every log and
# result file of the work folder); 4 files, within the device tool's 8.
set -uo pipefail
out=${1:?usage: e2e_gpu.sh OUT}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
e2e=${E2E_DIR:-$here/.e2e}
tarball=${E2E_CIFAR_TAR:-$e2e/cifar10.tar.xz}
sdist=${E2E_AIRBENCH_SDIST:-$e2e/airbench-0.1.8.tar.gz}
wheels=${E2E_WHEELS:-$e2e/whl}
work=${E2E_WORK:-/tmp/prism-e2e}
stages=",${E2E_STAGES:-prepare,airbench,prism94,resnet18,torch,synthetic},"
seeds=${E2E_SEEDS:-0 1 2 3 4}
airbench_runs=${E2E_AIRBENCH_RUNS:-5}
epochs=${E2E_RESNET_EPOCHS:-10}
dataset_key=${E2E_DATASET_KEY:-dataset.path}
deadline=${E2E_DEADLINE_S:-550}
reserve=20
data=$work/cifar10           # train/<class>/*.jpg, test/<class>/*.jpg
abdir=$work/ab               # airbench's working directory: ab/cifar10/{train,test}.pt
t_start=$(date +%s)
mkdir -p "$work/env" && : > "$work/notes.txt"   # notes are per call

now() { date +%s.%N; }
elapsed() { echo $(( $(date +%s) - t_start )); }
say() { echo "[e2e $(elapsed)s] $*" >&2; }
note() { echo "$*" >> "$work/notes.txt"; say "$*"; }
want() { [[ $stages == *",$1,"* ]]; }
# budget LIMIT: LIMIT cut to the time left before the deadline (minus the summary's reserve)
budget() { local left=$(( deadline - $(elapsed) - reserve )); echo $(( $1 < left ? $1 : left )); }

# run_timed DIR LIMIT CWD CMD...: CMD (in CWD) under a time limit; DIR/log.txt, DIR/cmd.txt, DIR/process.json
run_timed() {
  local dir=$1 limit=$2 cwd=$3; shift 3
  mkdir -p "$dir"
  printf '%q ' "$@" > "$dir/cmd.txt"
  local t0 t1 rc timed_out=false
  t0=$(now)
  (cd "$cwd" && timeout --kill-after=10 "$limit" "$@") > "$dir/log.txt" 2>&1
  rc=$?
  t1=$(now)
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && timed_out=true
  printf '{"process_s": %s, "rc": %d, "limit_s": %d, "timed_out": %s}\n' \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b - a}')" "$rc" "$limit" "$timed_out" > "$dir/process.json"
  say "${dir#"$work"/}: rc $rc, $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b - a}') s (limit $limit s)"
  [ "$rc" = 0 ] || tail -n 5 "$dir/log.txt" >&2
  return "$rc"
}

finish() {
  python3 "$here/benchmarks/e2e_summary.py" "$work" --out "$out" > "$work/summary.stdout" 2>&1 \
    || say "e2e_summary.py failed: $(tail -n 3 "$work/summary.stdout")"
  tar -czf "$out/logs.tgz" -C "$work" --exclude=./tfds --exclude=./cache --exclude=./src --exclude=./ab \
    --exclude=./cifar10 --exclude=./airbench-src --exclude='*.pt' --exclude='*.npz' . 2>/dev/null || true
  cat "$out/summary.md" 2>/dev/null
  say "done; OUT: $(ls "$out" | tr '\n' ' ')"
}
trap finish EXIT

# -- environment: wheels the image lacks, prism importable, GPU and library versions ----------------------
export PYTHONUNBUFFERED=1 PRISM_DATA_DIR=$work/tfds PRISM_CACHE_DIR=$work/cache PRISM_CIFAR10=$data
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$work/env/gpu.txt" 2>/dev/null \
  || rm -f "$work/env/gpu.txt"
if ! python3 -c "import hydra, tensorflow_datasets, grain, tensorboardX" 2>/dev/null; then
  if [ -d "$wheels" ]; then
    python3 -m pip install -q --no-index --find-links "$wheels" hydra-core tensorflow-datasets grain tensorboardX \
      > "$work/env/pip.log" 2>&1 || note "pip install from $wheels failed (env/pip.log)"
  else
    note "hydra/tfds/grain/tensorboardX missing and no wheels at $wheels: the prism stages will fail"
  fi
fi
if ! (cd /tmp && python3 -c "import prism.framework") 2>/dev/null; then
  # prism is not installed: its import names (prism.framework, prism.plugins, prism.conf) map onto the
  # checkout's framework/, plugins/, conf/ (pyproject's package-dir) through links in a namespace folder.
  mkdir -p "$work/src/prism"
  for p in framework plugins conf; do ln -sfn "$here/$p" "$work/src/prism/$p"; done
  mkdir -p "$work/src/hydra_plugins" && ln -sfn "$here/framework/hydra_launcher" "$work/src/hydra_plugins/prism_launcher"
  export PYTHONPATH=$work/src${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - > "$work/env/versions.txt" 2>&1 <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "hydra", "tensorflow_datasets", "grain"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "missing:", type(exc).__name__)
EOF

# -- data ------------------------------------------------------------------------------------------------
ensure_data() {  # extract the JPEG archive once (timed into prepare/extract.json)
  [ -f "$work/cifar10.complete" ] && return 0
  if [ ! -f "$tarball" ]; then note "no CIFAR-10 archive at $tarball (set E2E_CIFAR_TAR)"; return 1; fi
  rm -rf "$data"; mkdir -p "$data" "$work/prepare"
  local t0 t1 rc
  t0=$(now); tar -xJf "$tarball" -C "$data"; rc=$?; t1=$(now)
  printf '{"extract_s": %s, "rc": %d, "train_images": %d, "test_images": %d, "archive": "%s"}\n' \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b - a}')" "$rc" \
    "$(find "$data/train" -name '*.jpg' 2>/dev/null | wc -l)" "$(find "$data/test" -name '*.jpg' 2>/dev/null | wc -l)" \
    "$tarball" > "$work/prepare/extract.json"
  say "extracted $tarball: $(cat "$work/prepare/extract.json")"
  [ "$rc" = 0 ] && touch "$work/cifar10.complete"
  return "$rc"
}
ensure_pt() {  # airbench's cifar10/{train,test}.pt from the JPEGs
  [ -f "$abdir/cifar10/test.pt" ] && [ -f "$abdir/cifar10/train.pt" ] && return 0
  ensure_data || return 1
  run_timed "$work/prepare" "$(budget "${E2E_LIMIT_PREPARE:-120}")" "$here" \
    python3 "$here/benchmarks/cifar10_prepare.py" "$data" "$abdir/cifar10" --report "$work/prepare/pt_report.json"
}
ensure_airbench_src() {  # the sdist unpacked; prints the folder to put on PYTHONPATH
  if [ -d "$sdist/airbench" ]; then echo "$sdist"; return 0; fi
  if [ ! -f "$sdist" ]; then note "no airbench sdist at $sdist (set E2E_AIRBENCH_SDIST)"; return 1; fi
  mkdir -p "$work/airbench-src" && tar -xzf "$sdist" -C "$work/airbench-src" || return 1
  dirname "$(find "$work/airbench-src" -path '*/airbench/__init__.py' | head -n 1)" | xargs dirname
}
stage_ok() {  # stage_ok NAME: true when the stage has >= 30 s left, else noted as skipped
  if [ "$(budget 100000)" -lt 30 ]; then note "$1 skipped: E2E_DEADLINE_S=$deadline reached"; return 1; fi
}

# -- 1. prepare: extract (timed), then airbench's tensors ------------------------------------------------
if want prepare && stage_ok prepare; then
  rm -rf "$work/prepare" "$work/cifar10.complete" "$abdir"
  ensure_data && ensure_pt
fi

# -- 2. airbench94, its own code and timing --------------------------------------------------------------
if want airbench && stage_ok airbench; then
  rm -rf "$work/airbench"; mkdir -p "$work/airbench"
  if ensure_pt && absrc=$(ensure_airbench_src) && [ -n "$absrc" ]; then
    run_timed "$work/airbench" "$(budget "${E2E_LIMIT_AIRBENCH:-150}")" "$abdir" \
      env PYTHONPATH="$absrc${PYTHONPATH:+:$PYTHONPATH}" \
      python3 "$here/benchmarks/e2e_airbench.py" --runs "$airbench_runs" --out "$work/airbench/runs.jsonl"
  else
    note "airbench: inputs missing, not run"
  fi
fi

# -- 3. prism +experiment=cifar10_airbench94, one process per seed ---------------------------------------
quiet=(logging.progress=false logging.tensorboard=false logging.plots=false logging.render=0)
if want prism94 && stage_ok prism94; then
  rm -rf "$work/prism94"; mkdir -p "$work/prism94"
  if ensure_data; then
    p94=(+experiment=cifar10_airbench94 "$dataset_key=$data" "${quiet[@]}")
    stage_end=$(( $(elapsed) + $(budget "${E2E_LIMIT_PRISM94:-360}") ))
    if [ "${E2E_PRISM_PREPARE:-1}" = 1 ]; then
      run_timed "$work/prism94/dataset" "$(budget 120)" "$work" \
        python3 -m prism.framework bench data --batches 2 --warmup 1 --out "$work/prism94/dataset/bench_data.json" \
        "${p94[@]}"
    fi
    for seed in $seeds; do
      left=$(( stage_end - $(elapsed) )); limit=${E2E_LIMIT_PRISM94_RUN:-150}
      [ "$left" -lt "$limit" ] && limit=$left
      if [ "$limit" -lt 30 ]; then note "prism94: seeds from $seed on skipped (stage limit reached)"; break; fi
      run_timed "$work/prism94/seed$seed" "$limit" "$work" \
        python3 -m prism.framework train "${p94[@]}" "seed=$seed" "hydra.run.dir=$work/prism94/seed$seed"
    done
  fi
fi

# -- 4. prism CIFAR ResNet-18, 10 epochs ------------------------------------------------------------------
r18=(model=resnet18 model.stem=cifar dataset=image_folder "dataset.path=$data"
     "dataset.mean=[0.4914,0.4822,0.4465]" "dataset.std=[0.2470,0.2435,0.2616]"
     train.batch_size=512 "train.epochs=$epochs" train.eval_batch_size=2000 train.eval_every=1000000
     optimizer=sgd optimizer.lr=0.4 optimizer.momentum=0.9 optimizer.nesterov=true optimizer.weight_decay=5e-4
     schedule=triangle schedule.start_fraction=0.1 schedule.peak_fraction=0.25 schedule.end_fraction=0.0
     objective.label_smoothing=0.1 precision=bf16 augment=none
     "augment.ops=[{name:random_translate,pad:4,mode:zeros},{name:hflip,p:0.5}]"
     loader.placement=device checkpoint.enabled=false seed=0 "${quiet[@]}")
if want resnet18 && stage_ok resnet18; then
  rm -rf "$work/resnet18"; mkdir -p "$work/resnet18"
  ensure_data && run_timed "$work/resnet18/prism" "$(budget "${E2E_LIMIT_RESNET18:-200}")" "$work" \
    python3 -m prism.framework train "${r18[@]}" "hydra.run.dir=$work/resnet18/prism"
fi

# -- 5. plain PyTorch ResNet-18, same recipe, GPU-resident data ------------------------------------------
if want torch && stage_ok torch; then
  rm -rf "$work/torch"; mkdir -p "$work/torch"
  # shellcheck disable=SC2086  # E2E_TORCH_ARGS is a list of flags
  ensure_data && run_timed "$work/torch" "$(budget "${E2E_LIMIT_TORCH:-180}")" "$here" \
    python3 "$here/benchmarks/e2e_torch_resnet18.py" "$data" --out "$work/torch/result.json" --epochs "$epochs" \
    ${E2E_TORCH_ARGS:-}
fi

# -- 6. prism's synthetic step for the same ResNet-18 config ---------------------------------------------
if want synthetic && stage_ok synthetic; then
  rm -rf "$work/synthetic"; mkdir -p "$work/synthetic"
  ensure_data && run_timed "$work/synthetic" "$(budget "${E2E_LIMIT_SYNTHETIC:-150}")" "$work" \
    python3 -m prism.framework bench train --data synthetic --steps "${E2E_SYNTHETIC_STEPS:-100}" --warmup 20 \
    --out "$work/synthetic/bench.json" "${r18[@]}"
fi
exit 0
