"""GPU throughput: images/s of ResNet-18 and ResNet-50 at 224 px in bf16 for a plain supervised training step
and for the DBD step (fused labels + dusted-input distillation from a teacher), and the time of one KC-EMA
consolidation (`iil_dist.method.ema.consolidate_`) against a bare `torch._foreach_lerp_` over the same
tensors. One GPU, one process; weights, gradients and optimizer state in fp32, forwards under bf16
autocast, channels_last (as `dist.precision=bf16`, `dist.channels_last=true` train). Sized for a couple
of minutes on one H200 (60 steps of 128 images per model and step kind; not yet timed on one); where no
GPU is present it writes `{"skipped": ...}` and exits 0.

    .venv/bin/python bench/gpu.py                          # writes bench/results/gpu.json
    .venv/bin/python bench/gpu.py --device cpu --side 64 --batch 4 --steps 2 --out /tmp/gpu.json  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from iil_dist.config import MethodConfig
from iil_dist.method.dbd import dbd_losses
from iil_dist.method.ema import consolidate_
from iil_dist.models import build_model

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of `step()` over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    student = build_model(name, num_classes=1000, in_channels=3).to(device, memory_format=memory_format)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.side, args.side, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    noise = torch.Generator(device=device).manual_seed(0)
    method = MethodConfig()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def plain_step() -> None:
        with autocast:
            loss = F.cross_entropy(student(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def dbd_step() -> None:
        with autocast:
            loss = dbd_losses(student, teacher, x, y, method, noise)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    row = {
        "model": name,
        "plain_img_per_s": round(_rate(plain_step, args.batch, args.steps, args.warmup, device), 1),
        "dbd_img_per_s": round(_rate(dbd_step, args.batch, args.steps, args.warmup, device), 1),
    }
    row["dbd_to_plain"] = round(row["dbd_img_per_s"] / row["plain_img_per_s"], 3)

    # consolidation: the method's KC-EMA of the whole model against a bare lerp of the same float tensors
    tensors_t = [*teacher.parameters(), *(b for b in teacher.buffers() if b.is_floating_point())]
    tensors_s = [*student.parameters(), *(b for b in student.buffers() if b.is_floating_point())]

    def timed(fn, repeats: int = 20) -> float:
        fn()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        return 1000 * (time.perf_counter() - start) / repeats

    with torch.no_grad():
        row["consolidation_ms"] = round(timed(lambda: consolidate_(teacher, student, 0.999)), 3)
        row["foreach_lerp_ms"] = round(timed(lambda: torch._foreach_lerp_(tensors_t, tensors_s, 0.001)), 3)
    row["consolidation_to_lerp"] = round(row["consolidation_ms"] / row["foreach_lerp_ms"], 3)
    row["elements"] = sum(t.numel() for t in tensors_t)
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu.json"))
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        out.write_text(json.dumps({"skipped": "no GPU present"}) + "\n")
        print("no GPU present: skipped")
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "image_side": args.side,
        "batch_size": args.batch,
        "precision": "bf16 autocast, fp32 weights",
        "rows": [],
    }
    for name in args.models:
        row = measure(name, args, device)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
