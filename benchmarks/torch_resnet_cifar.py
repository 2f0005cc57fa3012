"""PyTorch reference for ``cpu_conv.py``: a plain CIFAR ResNet-18 train step (no torchvision).

Same network as prism's ``resnet18`` with ``model.stem=cifar``: 3x3 stride-1 stem conv, BasicBlocks
(2, 2, 2, 2) at widths 64-512, 1x1 strided downsample shortcuts, BatchNorm, global average pool, linear
head; cross-entropy and SGD with momentum. Runs in a separate Python environment that has torch; it
is driven over stdin/stdout so its steps interleave with prism's on a shared machine: each input line
``step`` runs one train step and prints its wall time in seconds; ``quit`` ends.

    python benchmarks/torch_resnet_cifar.py --batch 128 --image 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.down = None
        if stride != 1 or cin != planes:
            self.down = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (self.down(x) if self.down is not None else x))


class ResNet18Cifar(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for i in range(4):
            planes = width * 2**i
            for j in range(2):
                blocks.append(BasicBlock(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = ResNet18Cifar(args.classes)
    x = torch.randn(args.batch, 3, args.image, args.image)
    y = torch.randint(0, args.classes, (args.batch,))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "mkldnn": torch.backends.mkldnn.is_available()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        float(loss)
        print(json.dumps({"seconds": time.perf_counter() - start, "loss": float(loss)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
