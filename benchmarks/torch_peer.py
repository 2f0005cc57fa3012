"""PyTorch peers of ``prism bench train``: the same model, batch, precision and optimizer, on the same GPU.

    python benchmarks/torch_peer.py --model resnet50 --batch 256 --mode compile --out torch_r50.json

Models: torchvision ``resnet50`` and ``vit_b_16`` (parameter counts equal prism's ``resnet50``/``vit_b16``,
tested in tests/test_models.py), and ``simclr_resnet50`` (ResNet-50 trunk + Linear-BN-ReLU-Linear projector
2048-2048-128, NT-Xent at temperature 0.5 over two horizontally flipped views, like prism's
``objective=simclr`` with ``augment.views`` of one flip each). Step: forward + backward + SGD (momentum
0.9, weight decay 1e-4) on one synthetic batch kept on the GPU; ``channels_last`` memory format, bf16
autocast (``--precision bf16``), eager or ``torch.compile``. Reports the median of synced step times
after warm-up and images/s over an unsynced window, as ``prism bench train`` does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


class SimCLR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet50()
        self.backbone.fc = nn.Identity()
        self.projector = nn.Sequential(nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
                                       nn.Linear(2048, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -1e9)
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)


def build(name: str) -> tuple[nn.Module, callable]:
    if name == "resnet50":
        model = torchvision.models.resnet50()
        return model, lambda m, x, y: F.cross_entropy(m(x), y)
    if name == "vit_b16":
        model = torchvision.models.vit_b_16()
        return model, lambda m, x, y: F.cross_entropy(m(x), y)
    if name == "simclr_resnet50":
        def loss(m, x, y):
            views = torch.cat([x, torch.flip(x, dims=[3])])
            z = m(views)
            return nt_xent(*z.chunk(2))
        return SimCLR(), loss
    raise SystemExit(f"unknown model {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "vit_b16", "simclr_resnet50"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--mode", default="compile", choices=["eager", "compile"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda")
    model, loss_fn = build(args.model)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step(m, x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=args.precision == "bf16"):
            loss = loss_fn(m, x, y)
        loss.backward()
        optimizer.step()
        return loss

    run = model
    started = time.perf_counter()
    if args.mode == "compile":
        run = torch.compile(model)
    step(run, x, y)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    for _ in range(args.warmup):
        step(run, x, y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    synced = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step(run, x, y)
        torch.cuda.synchronize()
        synced.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step(run, x, y)
    torch.cuda.synchronize()
    window = time.perf_counter() - started
    median = statistics.median(synced)
    result = {
        "framework": "torch", "model": args.model, "mode": args.mode, "batch_size": args.batch,
        "image_size": args.size, "precision": args.precision, "steps": args.steps, "warmup": args.warmup,
        "first_step_s": round(compile_s, 3), "step_ms_median": median * 1e3, "img_s_median_step": args.batch / median,
        "img_s": args.steps * args.batch / window, "peak_memory_bytes": torch.cuda.max_memory_allocated(),
        "final_loss": float(loss), "device_kind": torch.cuda.get_device_name(), "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(f"torch {args.mode}: {args.model} batch={args.batch} {args.precision}: {result['img_s']:,.0f} img/s "
          f"({result['step_ms_median']:.1f} ms/step median)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
