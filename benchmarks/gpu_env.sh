# Sourced by the benchmarks/*_gpu.sh scripts: make `python3 -m prism.framework` work on a bare GPU image.
#   . "$here/benchmarks/gpu_env.sh" WHEELS_DIR WORK_DIR
# Installs what the image lacks (hydra-core, tensorflow-datasets, grain, tensorboardX) from WHEELS_DIR
# (shared/tools/gpu-wheels output) and, when prism is not installed, maps its import names (prism.framework,
# prism.plugins, prism.conf, hydra_plugins.prism_launcher: pyproject's package-dir) onto this checkout through
# links in WORK_DIR/src, put on PYTHONPATH. Needs $here (the checkout).
gpu_env_wheels=${1:?gpu_env.sh WHEELS_DIR WORK_DIR}
gpu_env_work=${2:?gpu_env.sh WHEELS_DIR WORK_DIR}
mkdir -p "$gpu_env_work"
if ! python3 -c "import hydra, tensorflow_datasets, grain, tensorboardX" 2>/dev/null; then
  python3 -m pip install -q --no-index --find-links "$gpu_env_wheels" hydra-core tensorflow-datasets grain \
    tensorboardX > "$gpu_env_work/pip.log" 2>&1 || echo "pip install from $gpu_env_wheels failed ($gpu_env_work/pip.log)" >&2
fi
if ! (cd /tmp && python3 -c "import prism.framework") 2>/dev/null; then
  mkdir -p "$gpu_env_work/src/prism" "$gpu_env_work/src/hydra_plugins"
  for p in framework plugins conf; do ln -sfn "$here/$p" "$gpu_env_work/src/prism/$p"; done
  ln -sfn "$here/framework/hydra_launcher" "$gpu_env_work/src/hydra_plugins/prism_launcher"
  export PYTHONPATH=$gpu_env_work/src${PYTHONPATH:+:$PYTHONPATH}
fi
