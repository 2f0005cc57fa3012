"""``prism bench data``: throughput of the input pipeline, without a model (``prism bench train``: see
:mod:`prism.framework.bench_train`).

Composes the run config exactly as ``prism train`` does, builds the dataset and the host pipeline
(:func:`prism.framework.data.train_iterator`, with the ``loader`` settings), and times ``--batches``
batches after a warm-up: once for the host pipeline alone, once with the on-device augmentation
(``augment.ops``, and ``augment.views`` when set) jitted on the sharded global batch. Prints one line
and writes a JSON file, so input-bound runs can be told apart from model-bound ones.

    prism bench data --batches 100 dataset=fashion_mnist_local train.batch_size=256 augment=flip_crop
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from prism.framework import parallel
from prism.framework.augment import EPOCH_KEY, Pipeline
from prism.framework.data import train_iterator
from prism.framework.errors import ConfigError
from prism.framework.registry import DATASETS
from prism.framework.steps import batch_epochs

log = logging.getLogger("prism")


def build_dataset(cfg: DictConfig):
    """The configured dataset's DataSource (``cfg.dataset`` as ``prism train`` reads it)."""
    from prism.framework.optim import plugin_config

    entry = DATASETS.get(cfg.dataset.name)
    return entry.builder(plugin_config(cfg.dataset)) if entry.config is not None else entry.builder()


def _timed(batches: Iterator[Any], n: int, step=lambda b: b) -> float:
    """Seconds to take ``n`` batches from ``batches`` through ``step`` (waiting for device results)."""
    start = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(step(next(batches)))
    return time.perf_counter() - start


def bench_data(cfg: DictConfig, *, batches: int = 50, warmup: int = 5) -> dict[str, Any]:
    """Images per second of the host pipeline alone and with on-device augmentation, for ``cfg``."""
    if batches < 1 or warmup < 0:
        raise ConfigError(f"--batches must be >= 1 and --warmup >= 0, got {batches} and {warmup}")
    source = build_dataset(cfg)
    info = source.info
    split_name = cfg.dataset.get("train_split", "train")
    split = source.split(split_name)
    mesh = parallel.make_mesh(cfg.parallel.fsdp)
    global_batch = cfg.train.batch_size
    host = parallel.host_batch_slice(global_batch, mesh)
    loader = cfg.loader

    def host_batches() -> Iterator[dict[str, np.ndarray]]:
        return train_iterator(split, global_batch=global_batch, host=host, seed=cfg.seed, shuffle=loader.shuffle,
                              workers=loader.workers, threads=loader.threads, prefetch=loader.prefetch)

    pipelines = [Pipeline.from_config(cfg.augment.ops, mean=info.mean, std=info.std)]
    pipelines += [Pipeline.from_config(ops, mean=info.mean, std=info.std, where=f"augment.views[{i}]")
                  for i, ops in enumerate(cfg.augment.views)]

    @jax.jit
    def augment(batch: dict[str, jax.Array], key: jax.Array) -> list[jax.Array]:
        batch = {**batch, EPOCH_KEY: batch_epochs(jnp.int32(0), batch["image"].shape[0], len(split))}  # as step 0
        if jnp.issubdtype(batch["image"].dtype, jnp.integer):
            batch["image"] = batch["image"].astype(jnp.float32) / 255.0
        return [p(batch, jax.random.fold_in(key, i))["image"] for i, p in enumerate(pipelines)]

    key = jax.random.key(cfg.seed)

    def device_step(host_batch: dict[str, np.ndarray]) -> list[jax.Array]:
        return augment(parallel.global_batch(mesh, host_batch), key)

    it = host_batches()
    _timed(it, warmup)
    host_s = _timed(it, batches)
    it = host_batches()
    _timed(it, max(warmup, 1), device_step)  # includes compilation
    augment_s = _timed(it, batches, device_step)
    images = batches * host.per_host_batch
    return {
        "dataset": cfg.dataset.name,
        "split": split_name,
        "split_size": len(split),
        "image_shape": list(info.image_shape),
        "batch_size": global_batch,
        "host_batch_size": host.per_host_batch,
        "batches": batches,
        "warmup_batches": warmup,
        "host_s": host_s,
        "host_img_s": images / host_s,
        "host_augment_s": augment_s,
        "host_augment_img_s": images / augment_s,
        "augment_ops": len(pipelines[0].transforms),
        "views": len(pipelines) - 1,
        "loader": {"workers": loader.workers, "threads": loader.threads, "prefetch": loader.prefetch},
        "devices": mesh.devices.size,
        "backend": jax.default_backend(),
        "processes": jax.process_count(),
    }


def summary_line(result: dict[str, Any]) -> str:
    return (f"data: {result['dataset']} batch={result['batch_size']} host {result['host_img_s']:,.0f} img/s, "
            f"host+augment {result['host_augment_img_s']:,.0f} img/s")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prism bench", description="Benchmark a run config (flags before or after the overrides).")
    parser.add_argument("what", choices=["data", "train"],
                        help="'data': dataset + host pipeline + on-device augmentation; 'train': the run's "
                             "train step (forward, backward, update)")
    parser.add_argument("--batches", type=int, default=50, help="data: timed batches (default 50)")
    parser.add_argument("--steps", type=int, default=20, help="train: timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="batches/steps before timing (default 5)")
    parser.add_argument("--data", choices=["synthetic", "pipeline", "device"], default="synthetic",
                        help="train: one batch kept on device (synthetic), the real host pipeline, or the split kept "
                             "on the devices with batches gathered there (device)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="train: peak TFLOP/s per device for MFU (default: known GPUs)")
    parser.add_argument("--profile", default=None, help="train: also write a jax.profiler trace of 5 steps here")
    parser.add_argument("--out", default=None, help="JSON result file (default bench_<what>.json)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for prism train (key=value ...)")
    return parser.parse_intermixed_args(list(argv))


def main(argv: Sequence[str]) -> int:
    """``prism bench data|train [flags] [key=value ...]``, ``prism bench infer checkpoint=... [...]``."""
    from prism.framework.bench_train import bench_train
    from prism.framework.bench_train import summary_line as train_summary
    from prism.framework.config import compose

    if list(argv[:1]) == ["infer"]:  # key=value options of its own, no run config to compose
        from prism.framework.bench_infer import main as infer_main

        return infer_main(list(argv[1:]))
    args = parse_args(argv)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[prism] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    cfg = compose(args.overrides)
    if args.what == "data":
        result = bench_data(cfg, batches=args.batches, warmup=args.warmup)
        line = summary_line(result)
    else:
        result = bench_train(cfg, steps=args.steps, warmup=args.warmup, data=args.data, peak=args.peak_tflops,
                             profile=args.profile)
        line = train_summary(result)
    out = Path(args.out or f"bench_{args.what}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "overrides": list(args.overrides)}, indent=2) + "\n")
    print(line)
    print(f"wrote {out}")
    return 0
