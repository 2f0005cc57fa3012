"""airbench94 (the PyPI sdist ``airbench==0.1.8``, its own code) trained N times; one JSON line per run.

    cd DIR_WITH_cifar10 && PYTHONPATH=AIRBENCH_SRC python benchmarks/e2e_airbench.py --runs 5 --out runs.jsonl

airbench reads ``cifar10/train.pt`` and ``cifar10/test.pt`` from the working directory (written by
``benchmarks/cifar10_prepare.py``; without them it tries to download CIFAR-10). Protocol as airbench's
README gives it (``airbench.warmup94(); airbench.train94()``): one warm-up call first (``train94(run=-1)``: one
training step, GPU and cuDNN warm-up, not timed by airbench and not counted), then ``--runs`` calls of
``train94()`` with its defaults. Per run, the figures airbench itself prints on its last table row:
``acc`` = ``tta_val_acc`` (test accuracy with its test-time augmentation, level 2), ``train_s`` =
``total_time_seconds`` (CUDA-event time of the whitening initialisation, the training epochs and the TTA
evaluation; the per-epoch ``val_acc`` evaluations it prints are outside it); ``val_acc`` = the last epoch's
accuracy without TTA; ``call_s`` = host wall time of the whole ``train94()`` call (loading the tensors onto
the GPU and the per-epoch evaluations included). They are read by wrapping ``airbench.utils
.print_training_details``, which ``train`` calls with its local variables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per run (appended)")
    parser.add_argument("--no-warmup", action="store_true", help="skip airbench.warmup94()")
    args = parser.parse_args(argv)

    import airbench
    import airbench.utils as utils
    import torch

    captured: dict = {}
    original = utils.print_training_details

    def capture(variables, is_final_entry):
        captured.clear()
        captured.update({k: variables.get(k) for k in ("tta_val_acc", "val_acc", "total_time_seconds", "epoch")})
        captured["final"] = is_final_entry
        return original(variables, is_final_entry)

    utils.print_training_details = capture
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = {"airbench": getattr(airbench, "__version__", "0.1.8"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name()}
    print(json.dumps(info), flush=True)

    def record(entry: dict) -> None:
        with args.out.open("a") as f:
            f.write(json.dumps({**entry, **info}) + "\n")

    if not args.no_warmup:
        started = time.perf_counter()
        airbench.warmup94()
        torch.cuda.synchronize()
        record({"run": "warmup", "call_s": round(time.perf_counter() - started, 3)})
    for run in range(args.runs):
        captured.clear()
        started = time.perf_counter()
        airbench.train94(run=run)
        torch.cuda.synchronize()
        call_s = time.perf_counter() - started
        if not captured.get("final"):
            record({"run": run, "error": "airbench printed no final row", "call_s": round(call_s, 3)})
            continue
        entry = {"run": run, "acc": captured["tta_val_acc"], "val_acc": captured["val_acc"],
                 "train_s": captured["total_time_seconds"], "call_s": round(call_s, 3)}
        record(entry)
        print(f"airbench94 run {run}: acc {entry['acc']:.4f} train {entry['train_s']:.3f} s "
              f"(call {call_s:.1f} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
