"""``benchmarks/fusion_bandwidth.py`` on a real XLA dump (CPU) and a trace in the profiler's format: bytes per
fusion from its operands' shapes, tuple elements (``%x#1``), kernels shared by deduplicated fusions."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fusion_bandwidth", ROOT / "benchmarks" / "fusion_bandwidth.py")
fusion_bandwidth = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fusion_bandwidth)

HLO = """HloModule jit_train_step
ENTRY %main {
  %p.1 = bf16[4,8]{1,0} parameter(0)
  %p.2 = f32[8]{0} parameter(1)
  %loop_add_fusion.3 = (bf16[4,8]{1,0}, f32[8]{0}) fusion(%p.1, /*index=1*/%p.2), kind=kLoop, calls=%c.1
  %input_reduce_fusion.7 = f32[8]{0} fusion(%loop_add_fusion.3#0), kind=kInput, calls=%c.2, %DEDUP
  %input_reduce_fusion.9 = f32[8]{0} fusion(%p.1), kind=kInput, calls=%c.2, %DEDUP
  ROOT %t = (f32[8]{0}, f32[8]{0}) tuple(%input_reduce_fusion.7, %input_reduce_fusion.9)
}
""".replace("%DEDUP", 'metadata={deduplicated_name="input_reduce_fusion.7"}')


def test_bytes_from_shapes_tuples_and_deduplicated_kernels(tmp_path):
    (tmp_path / "module_0001.jit_train_step.sm_9.0_gpu_after_optimizations.txt").write_text(HLO)
    found = fusion_bandwidth.hlo_fusions(tmp_path)
    assert found["loop_add_fusion_3"] == (4 * 8 * 2 + 8 * 4, 4 * 8 * 2 + 8 * 4, "kLoop", 1)
    # both reductions launch the one kernel: its bytes are theirs together
    assert found["input_reduce_fusion_7"] == (2 * 4 * 8 * 2, 2 * 8 * 4, "kInput", 2)


def test_report_on_a_real_cpu_dump_and_a_profiler_trace(tmp_path):
    hlo = tmp_path / "hlo"
    code = ("import jax, jax.numpy as jnp\n"
            "@jax.jit\n"
            "def train_step(x, s):\n"
            "    m = x.mean((0, 1, 2)); v = (x * x).mean((0, 1, 2)) - m * m\n"
            "    return jax.nn.relu((x - m) * jax.lax.rsqrt(v + 1e-5) * s).astype(jnp.bfloat16)\n"
            "train_step(jnp.ones((8, 16, 16, 32)), jnp.ones(32)).block_until_ready()\n")
    flags = f"--xla_dump_to={hlo} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*"
    env = {**os.environ, "XLA_FLAGS": flags}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    found = fusion_bandwidth.hlo_fusions(hlo)
    out_bytes = 8 * 16 * 16 * 32 * 2
    elementwise = [name for name, (_, written, kind, _) in found.items() if kind == "kLoop" and written == out_bytes]
    assert elementwise, found  # the normalize+ReLU fusion writes the bf16 output
    name = elementwise[0]
    read = found[name][0]
    assert read >= 8 * 16 * 16 * 32 * 4  # it reads the f32 input
    profile = tmp_path / "profile" / "plugins" / "profile" / "run"
    profile.mkdir(parents=True)
    events = [{"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 7, "name": name, "ts": 0, "dur": 10.0},
              {"ph": "X", "pid": 7, "name": "sm90_xmma_fprop", "ts": 10, "dur": 30.0},
              {"ph": "X", "pid": 1, "name": name, "ts": 0, "dur": 99.0}]
    with gzip.open(profile / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    text = fusion_bandwidth.report(tmp_path / "profile", hlo, steps=1, peak_gbs=3350.0, top=5)
    written = 8 * 16 * 16 * 32 * 2
    gbs = (read + written) / 10e-6 / 1e9
    assert text.startswith("0.0 ms of device time per step") and "fusions found in the HLO: 0.0 ms (25%)" in text
    assert f"| `{name}` | kLoop | 1 | 0.010 |" in text and f"{gbs:,.0f}" in text
