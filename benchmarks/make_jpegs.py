"""Write a folder of JPEG photos-like images for input-pipeline benchmarks (no download).

    python benchmarks/make_jpegs.py OUT_DIR --images 4096 --classes 10 --size 320 256

Each image is smooth random structure (low-resolution noise upsampled bicubically, plus fine noise) saved
as a quality-90 JPEG, so decoding costs about what a natural photo of that size costs (pure noise would
cost more, flat colour far less). Layout ``OUT_DIR/<class>/<i>.jpg`` for ``dataset=image_folder``.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def write(args: tuple[Path, int, int, int]) -> None:
    path, index, width, height = args
    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=(320, 256), metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args()
    jobs = []
    for i in range(args.images):
        folder = args.out / f"class_{i % args.classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:06d}.jpg", i, *args.size))
    with ProcessPoolExecutor() as pool:
        list(pool.map(write, jobs, chunksize=64))
    print(f"wrote {len(jobs)} JPEGs of {args.size[0]}x{args.size[1]} to {args.out}")


if __name__ == "__main__":
    main()
