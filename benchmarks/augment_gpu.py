"""On one GPU: the host-to-device copy of a 256-image 256x256 uint8 batch (pageable NumPy memory) against the
on-device random-resized crop 224 + flip of it, the two costs the host path's step pays besides the model.

    python3 benchmarks/augment_gpu.py OUT.json      (with benchmarks/gpu_env.sh sourced on a bare GPU image)
"""

import json
import sys
import time

import jax
import numpy as np

from prism.framework.augment import Pipeline


def timed_ms(f, *args, n: int = 20) -> float:
    jax.block_until_ready(f(*args))
    start = time.perf_counter()
    for _ in range(n):
        result = f(*args)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / n * 1e3


def main(out_path: str) -> None:
    batch = np.random.default_rng(0).integers(0, 256, (256, 256, 256, 3), dtype=np.uint8)
    pipe = Pipeline.from_config([{"name": "random_resized_crop", "size": [224, 224]}, "hflip"], mean=[0.5] * 3,
                                std=[0.25] * 3)
    crop = jax.jit(lambda images, key: pipe({"image": images}, key)["image"])
    out = {"device": jax.devices()[0].device_kind, "h2d_ms": timed_ms(jax.device_put, batch),
           "random_resized_crop_flip_ms": timed_ms(crop, jax.device_put(batch), jax.random.key(0))}
    print(json.dumps(out))
    with open(out_path, "w") as f:
        f.write(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
