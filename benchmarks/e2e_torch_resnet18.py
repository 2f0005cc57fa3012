"""Plain PyTorch CIFAR ResNet-18 on GPU-resident data: the peer of prism's ResNet-18 run in ``e2e_gpu.sh``.

    python benchmarks/e2e_torch_resnet18.py DATA_DIR --out torch.json [--epochs 10] [--compile]
    python benchmarks/e2e_torch_resnet18.py DATA_DIR --epochs 0.05 --limit 512 --batch 64   # CPU smoke run

DATA_DIR holds ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``. Every JPEG is decoded once (PIL,
``cifar10_prepare.load_split``, worker processes) into one uint8 tensor on the device, padded by 4 zero pixels
on each side. The network is ``torch_resnet_cifar.ResNet18Cifar`` (prism's ``resnet18`` with
``model.stem=cifar``). Recipe, the same as the prism run: batch 512, ``ceil(epochs * N / batch)`` steps of full
batches drawn from a new permutation each epoch (no partial batch); per batch on the device: random crop 32x32
of the padded images (offsets 0..8 per example, i.e. ``RandomCrop(32, padding=4)``), horizontal flip with p=0.5,
normalisation by the CIFAR-10 mean/std; SGD with Nesterov momentum 0.9, weight decay 5e-4 on the weights with
ndim > 1 only (prism's ``train.weight_decay_skip_1d``), a per-step triangle (linear one-cycle) from 0.1x to the
peak rate 0.4 at 25% of the steps, then linearly to 0; cross-entropy with label smoothing 0.1; bf16 autocast;
channels_last. Evaluation once at the end on the whole test split (no TTA).

Timing: ``train_s`` is the wall time of the training loop (all steps, batch assembly and augmentation
included), bracketed by ``torch.cuda.synchronize()``; decoding and the final evaluation are outside it. Before
it, ``--warmup`` steps (default 3) run the same step on the real data to let cuDNN pick its algorithms (and
``torch.compile`` compile, with ``--compile``); the model's initial weights and BatchNorm buffers are then
restored and a fresh optimizer is built, so the timed run starts from the untouched initialisation.
Default: eager. ``torch.compile`` bought ~2% on this step on an H200 (59,952 vs 58,759 img/s, synthetic batch,
shared/design/ENVIRONMENT.md) and costs tens of seconds of compilation, so it is off unless ``--compile``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_prepare import class_names, load_split  # noqa: E402
from torch_resnet_cifar import ResNet18Cifar  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4


def triangle(step: int, total: int, start: float, peak_fraction: float, end: float) -> float:
    """prism's ``schedule=triangle``: the line through (0, start), (peak, 1), (total, end), as a factor."""
    peak = int(peak_fraction * total)
    t = min(max(step, 0), total)
    if t < peak:
        return start + (1.0 - start) * t / peak
    return 1.0 + (end - 1.0) * (t - peak) / (total - peak) if peak < total else 1.0


def to_device_uint8(images, device: torch.device, pad: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 NumPy -> (N, H + 2 pad, W + 2 pad, 3) uint8 on ``device`` (zero border)."""
    x = torch.from_numpy(images).to(device)
    return F.pad(x, (0, 0, pad, pad, pad, pad)) if pad else x


class Batches:
    """Full batches of augmented images from the padded uint8 tensor, all on the device."""

    def __init__(self, padded: torch.Tensor, labels: torch.Tensor, batch: int, size: int, generator=None):
        self.padded, self.labels, self.batch, self.size = padded, labels, batch, size
        self.n, self.device, self.generator = len(labels), labels.device, generator
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1) * 255
        self.base = torch.arange(size, device=self.device)
        self.order = torch.empty(0, dtype=torch.long, device=self.device)
        self.epochs_started = 0

    def _indices(self) -> torch.Tensor:
        while len(self.order) < self.batch:  # a new permutation each epoch; batches run across epoch ends
            perm = torch.randperm(self.n, device=self.device, generator=self.generator)
            self.order = torch.cat([self.order, perm])
            self.epochs_started += 1
        idx, self.order = self.order[: self.batch], self.order[self.batch:]
        return idx

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._indices()
        b, room = len(idx), self.padded.shape[1] - self.size
        offsets = torch.randint(0, room + 1, (b, 2), device=self.device, generator=self.generator)
        rows = (offsets[:, 0:1] + self.base)[:, :, None]  # (B, S, 1)
        cols = (offsets[:, 1:2] + self.base)[:, None, :]  # (B, 1, S)
        crops = self.padded[idx[:, None, None], rows, cols]  # (B, S, S, 3) uint8
        flip = torch.rand(b, device=self.device, generator=self.generator) < 0.5
        crops = torch.where(flip[:, None, None, None], crops.flip(2), crops)
        x = crops.permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory: channels_last
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]


def evaluate(model, images: torch.Tensor, labels: torch.Tensor, dtype, batch: int = 1000) -> float:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for i in range(0, len(labels), batch):
            x = ((images[i:i + batch].permute(0, 3, 1, 2).float() - mean) / std)
            logits = model(x.contiguous(memory_format=torch.channels_last))
            correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    model.train()
    return correct / len(labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="folder with train/<class>/*.jpg and test/<class>/*.jpg")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.4, help="peak learning rate")
    parser.add_argument("--start-fraction", type=float, default=0.1)
    parser.add_argument("--peak-fraction", type=float, default=0.25)
    parser.add_argument("--end-fraction", type=float, default=0.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (default: eager)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the run (then reset)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N train and test images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="JPEG decoding processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    started = time.perf_counter()
    classes = class_names(args.data / "train")
    splits = {}
    for split in ("train", "test"):
        images, labels, _ = load_split(args.data / split, classes, workers=args.workers,
                                       seed=args.seed if split == "train" else None)
        if args.limit:
            images, labels = images[: args.limit], labels[: args.limit]
        splits[split] = (images, labels)
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    train_x = to_device_uint8(splits["train"][0], device, PAD)
    train_y = torch.from_numpy(splits["train"][1]).to(device)
    test_x = to_device_uint8(splits["test"][0], device, 0)
    test_y = torch.from_numpy(splits["test"][1]).to(device)
    sync()
    upload_s = time.perf_counter() - started
    n, size = len(train_y), splits["train"][0].shape[1]
    batch = min(args.batch, n)
    total_steps = max(1, math.ceil(args.epochs * n / batch))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    model = ResNet18Cifar(len(classes)).to(device, memory_format=torch.channels_last)
    initial = copy.deepcopy(model.state_dict())
    run = torch.compile(model) if args.compile else model
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def make_optimizer():
        decay = [p for p in model.parameters() if p.ndim > 1]
        other = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": other, "weight_decay": 0.0}],
                              lr=args.lr, momentum=args.momentum, nesterov=True)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: triangle(s, total_steps, args.start_fraction, args.peak_fraction, args.end_fraction))
        return opt, sched

    def step(opt, sched, x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    started = time.perf_counter()
    if args.warmup:
        opt, sched = make_optimizer()
        warm = Batches(train_x, train_y, batch, size, generator)
        for _ in range(args.warmup):
            step(opt, sched, *warm.take())
        sync()
        model.load_state_dict(initial)  # in place: a compiled graph stays valid
    warmup_s = time.perf_counter() - started

    opt, sched = make_optimizer()
    generator.manual_seed(args.seed)
    batches = Batches(train_x, train_y, batch, size, generator)
    sync()
    started = time.perf_counter()
    for _ in range(total_steps):
        loss = step(opt, sched, *batches.take())
    sync()
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    acc = evaluate(model, test_x, test_y, dtype)
    eval_s = time.perf_counter() - started

    result = {
        "framework": "torch", "model": "resnet18_cifar", "acc": acc, "train_s": round(train_s, 3),
        "img_s": round(total_steps * batch / train_s, 1), "steps": total_steps, "epochs": args.epochs,
        "batch_size": batch, "train_images": n, "test_images": len(test_y), "final_loss": float(loss),
        "compile": args.compile, "precision": args.precision, "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 3), "decode_s": round(decode_s, 3), "upload_s": round(upload_s, 3),
        "eval_s": round(eval_s, 3), "lr": args.lr, "weight_decay": args.weight_decay,
        "label_smoothing": args.label_smoothing, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    print(f"torch resnet18 ({'compile' if args.compile else 'eager'}): acc {acc:.4f}, train {train_s:.2f} s "
          f"({result['img_s']:,.0f} img/s, {total_steps} steps), decode {decode_s:.1f} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
