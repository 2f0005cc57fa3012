"""CPU convolution benchmark: a CIFAR ResNet-18 train step with XLA's convolutions, with prism's
matmul weight gradient (:mod:`prism.framework.conv`), and in PyTorch on CPU.

The step is prism's ``resnet18`` (``stem=cifar``, 10 classes) at the given batch and image size:
forward in training mode (BatchNorm batch statistics), softmax cross-entropy, gradients, SGD with
momentum 0.9. PyTorch runs the same network (``torch_resnet_cifar.py``) in its own Python environment,
driven step by step over a pipe, so that on a shared machine the three are timed interleaved: each
round times one step of each, and the ratios are taken within rounds. Writes a JSON file and the
``cpu_conv`` section of ``benchmarks/RESULTS.md``.

    python benchmarks/cpu_conv.py --rounds 5 --torch-python /work/venv-torchcpu/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from prism.framework import conv  # noqa: E402
from prism.framework.api import DataInfo  # noqa: E402
from prism.framework.plugins import load_plugins  # noqa: E402
from prism.framework.registry import MODELS  # noqa: E402

SECTION = "cpu_conv"


def build_step(batch: int, image: int, classes: int, mode: str):
    """A compiled train step traced under conv ``mode``, its initial state, and compile seconds/memory."""
    load_plugins()
    entry = MODELS.get("resnet18")
    cfg = entry.config(stem="cifar", num_classes=classes)
    model = entry.builder(cfg, data=DataInfo(classes, (image, image, 3)), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, image, image, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)

    def step(params, rest, opt_state, x, y):
        def loss_fn(p, r):
            m = nnx.merge(graphdef, p, r, copy=True)
            logits = m(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, nnx.split(m, nnx.Param, ...)[2]

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    start = time.perf_counter()
    with conv.forced(mode):
        compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, rest, opt_state, x, y).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    state = [params, rest, opt_state]

    def run() -> float:
        t = time.perf_counter()
        state[0], state[1], state[2], loss = compiled(*state, x, y)
        jax.block_until_ready(loss)
        return time.perf_counter() - t

    return run, {"compile_s": compile_s, "temp_bytes": temp}


class TorchStep:
    """The PyTorch step in its own process; ``run()`` times one step there."""

    def __init__(self, python: str, batch: int, image: int, classes: int, channels_last: bool):
        cmd = [python, str(HERE / "torch_resnet_cifar.py"), "--batch", str(batch), "--image", str(image),
               "--classes", str(classes)] + (["--channels-last"] if channels_last else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def run(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else platform.machine()


def write_section(path: Path, text: str, section: str = SECTION) -> None:
    """Replace (or append) the ``section`` part of the results file."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end) + "\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    path.write_text(new)


def markdown(r: dict) -> str:
    s = r["steps"]
    lines = [
        f"## CPU convolutions: CIFAR ResNet-18 train step (`{r['section']}`)",
        "",
        f"{r['date']}, {r['device']}; jax {r['jax']}, flax {r['flax']}, torch {r['torch']['torch']} "
        f"({r['torch']['threads']} threads); batch {r['batch']}, {r['image']}x{r['image']}, {r['rounds']} "
        f"interleaved rounds after {r['warmup']} warm-up.",
        "",
        f"    {r['command']}",
        "",
        "| path | median step (s) | compile (s) | XLA temp memory (MiB) | PyTorch step / this step |",
        "|---|---|---|---|---|",
    ]
    for name in ("xla", "matmul"):
        temp = s[name]["temp_bytes"]
        lines.append(f"| prism, PRISM_CONV={name} | {s[name]['median_s']:.2f} | {s[name]['compile_s']:.1f} | "
                     f"{'-' if temp is None else f'{temp / 2**20:.0f}'} | {r['speed_vs_torch'][name]:.2f}x |")
    lines.append(f"| PyTorch CPU | {s['torch']['median_s']:.2f} | - | - | 1.00x |")
    lines += ["", f"matmul weight gradient vs XLA's: {r['matmul_speedup_vs_xla']:.2f}x faster per step "
                  "(medians of per-round ratios; the machine's cores are shared, so absolute times vary)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--torch-python", default=os.environ.get("TORCH_PYTHON", "/work/venv-torchcpu/bin/python"),
                        help="a Python with torch installed (a separate environment)")
    parser.add_argument("--torch-channels-last", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "cpu_conv.json"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--label", default="", help="a second result section (e.g. 'repeat') beside the main one")
    args = parser.parse_args()
    section = f"{SECTION}/{args.label}" if args.label else SECTION

    runs, meta = {}, {}
    for mode in ("xla", "matmul"):
        runs[mode], meta[mode] = build_step(args.batch, args.image, args.classes, mode)
        print(f"{mode}: compiled in {meta[mode]['compile_s']:.1f}s", flush=True)
    torch_step = TorchStep(args.torch_python, args.batch, args.image, args.classes, args.torch_channels_last)
    runs["torch"] = torch_step.run
    times = {k: [] for k in runs}
    for r in range(args.warmup + args.rounds):
        for k, run in runs.items():
            t = run()
            if r >= args.warmup:
                times[k].append(t)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v), flush=True)
    torch_step.close()

    def ratio(a: str, b: str) -> float:  # median over rounds of time[a] / time[b]
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    steps = {k: {"median_s": statistics.median(v), "times_s": v, **meta.get(k, {})} for k, v in times.items()}
    result = {
        "benchmark": SECTION,
        "section": section,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{cpu_name()}, {os.cpu_count()} cores "
                  f"({jax.default_backend()} backend, shared machine)",
        "jax": jax.__version__, "flax": flax.__version__, "torch": torch_step.info,
        "batch": args.batch, "image": args.image, "classes": args.classes, "rounds": args.rounds,
        "warmup": args.warmup,
        "command": "python benchmarks/cpu_conv.py " + " ".join(sys.argv[1:]),
        "steps": steps,
        "speed_vs_torch": {m: ratio("torch", m) for m in ("xla", "matmul")},
        "matmul_speedup_vs_xla": ratio("xla", "matmul"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_section(Path(args.results), markdown(result), section)
    print(markdown(result))
    print(f"wrote {out} and {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
