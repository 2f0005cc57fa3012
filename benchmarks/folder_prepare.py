"""Time the host-side steps of an image-folder run before its first step: scan + fingerprint, TFDS preparation
(first run only), and reading the training split as stacked arrays (first read decodes; later reads load the
decoded copy kept beside the prepared data).

    python benchmarks/folder_prepare.py FOLDER [--data-dir DIR] [--out FILE.json]

FOLDER holds train/<class>/* and test/<class>/* (e.g. the CIFAR-10 JPEG archive unpacked). ``--data-dir``
defaults to a fresh temporary folder, so preparation is timed from scratch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from prism.framework.config import compose
    from prism.framework.optim import plugin_config
    from prism.framework.plugins import load_plugins
    from prism.framework.registry import DATASETS
    from prism.framework.resident import stack_split
    from prism.plugins.datasets._folder_common import fingerprint, image_paths

    load_plugins()
    root = Path(args.folder).resolve()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="prism-folder-bench-")
    timings: dict[str, float] = {}

    started = time.perf_counter()
    files = image_paths(str(root))
    fingerprint(root, files)
    timings["scan_fingerprint_s"] = time.perf_counter() - started

    cfg = compose(["dataset=image_folder", f"dataset.path={root}", f"dataset.data_dir={data_dir}"])
    started = time.perf_counter()
    source = DATASETS.get("image_folder").builder(plugin_config(cfg.dataset))
    timings["build_or_prepare_s"] = time.perf_counter() - started
    split = source.split(cfg.dataset.train_split)
    for name in ("first_stack_s", "second_stack_s"):
        started = time.perf_counter()
        arrays = stack_split(split, threads=cfg.loader.threads)
        timings[name] = time.perf_counter() - started
    result = {"folder": str(root), "files": len(files), "train_examples": len(split), "data_dir": data_dir,
              "image_shape": list(arrays["image"].shape[1:]), **{k: round(v, 3) for k, v in timings.items()}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
