"""Engine efficiency: images/s of a DBD + KC-EMA phase through the whole system against a minimal
single-process PyTorch loop doing the same math, measured side by side in one invocation.

The system: `iil-dist train` as users run it (a local Ray cluster, Ray Train workers, DeepSpeed ZeRO-0
over gloo, shards streamed through `data.shard_url`, metrics.jsonl and an offline wandb run), on a
scenario prepared from a synthetic ImageFolder (100 classes); phase 1's training throughput and its
per-step breakdown (`tracking.step_timing`) come from results.json. The plain loop: one process, the
phase's images decoded into memory once, the same model, batch size, optimizer, gradient clipping,
losses (`iil_dist.method.dbd_losses`) and KC-EMA schedule (`torch._foreach_lerp_` after the freezing
period), timed with the same sections. Both use one thread per worker (`dist.torch_threads`); the system
decodes in `--loader-workers` loader processes per worker. The plain loop runs before and after the system
runs, and its mean is the reference. Data: the streaming reader alone (one process, decoding, no model)
against what one worker's steps consume, and the share of step time spent waiting for data.

    .venv/bin/python bench/engine.py                      # writes bench/results/engine.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import make_image_folder  # noqa: E402

from iil_dist.config import load  # noqa: E402
from iil_dist.data.augment import normalize  # noqa: E402
from iil_dist.data.reader import SplitDataset  # noqa: E402
from iil_dist.data.shards import read_manifest  # noqa: E402
from iil_dist.engine.progress import StepTimer, TimedTarget  # noqa: E402
from iil_dist.method.dbd import dbd_losses  # noqa: E402
from iil_dist.method.ema import consolidation_due  # noqa: E402
from iil_dist.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits.yaml"


def overrides(args: argparse.Namespace, scenario: Path) -> list[str]:
    """The experiment both sides run: phase 1 of a 1-phase scenario, DBD + KC-EMA."""
    return [
        "data.source=imagefolder", f"data.source_path={args.work / 'source'}", f"data.root={scenario}",
        f"data.image_size={args.side}", "data.drift=none", "data.num_phases=1", "data.base_fraction=0.1",
        "data.samples_per_shard=250", f"model.name={args.model}", f"optim.batch_size={args.batch}",
        "optim.base_epochs=1", f"optim.epochs_per_phase={args.epochs}", f"method.freeze_epochs={args.epochs // 2}",
        "method.ema_every_epochs=1",
    ]  # fmt: skip


def plain_loop(args: argparse.Namespace, scenario: Path) -> dict:
    """The same phase as a minimal PyTorch loop on in-memory tensors; returns images/s and the breakdown."""
    torch.set_num_threads(1)
    cfg = load(CONFIG, overrides(args, scenario))
    manifest = read_manifest(scenario)
    split = SplitDataset(scenario, "phase-01", manifest)
    images = torch.stack([split[i][0] for i in range(len(split))])
    labels = torch.tensor([split[i][1] for i in range(len(split))])
    norm = manifest["normalization"]
    mean, std = torch.tensor(norm["mean"]), torch.tensor(norm["std"])
    torch.manual_seed(0)
    student = build_model(cfg.model.name, num_classes=manifest["num_classes"], in_channels=manifest["channels"])
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    o = cfg.optim
    optimizer = torch.optim.SGD(student.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    noise = torch.Generator().manual_seed(0)
    timer = StepTimer(torch.device("cpu"))
    target = TimedTarget(teacher, timer)
    teacher_state = [*teacher.parameters(), *(b for b in teacher.buffers() if b.is_floating_point())]
    student_state = [*student.parameters(), *(b for b in student.buffers() if b.is_floating_point())]
    steps_per_epoch = -(-len(labels) // o.batch_size)
    start = time.perf_counter()
    for epoch in range(1, o.epochs_per_phase + 1):
        timer.start()
        order = torch.randperm(len(labels))
        for b in range(steps_per_epoch):
            index = order[b * o.batch_size : (b + 1) * o.batch_size]
            x, y = normalize(images[index], mean, std), labels[index]
            timer.mark("data")
            timer.steps += 1
            losses = dbd_losses(student, target, x, y, cfg.method, noise)
            timer.mark("student_forward")
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            timer.mark("backward")
            torch.nn.utils.clip_grad_norm_(student.parameters(), o.grad_clip)
            optimizer.step()
            timer.mark("optimizer")
        if consolidation_due(epoch, freeze_epochs=cfg.method.freeze_epochs, every_epochs=cfg.method.ema_every_epochs):
            timer.start()
            with torch.no_grad():
                torch._foreach_lerp_(teacher_state, student_state, 1 - cfg.method.ema_alpha)
            timer.mark("consolidation")
    seconds = time.perf_counter() - start
    return {"img_per_s": round(len(labels) * o.epochs_per_phase / seconds, 1), "train_s": round(seconds, 3),
            "step_ms": timer.per_step_ms()}  # fmt: skip


def reader_rate(args: argparse.Namespace, scenario: Path) -> dict:
    """Images/s one process gets from the streaming reader alone (decoding included, no model): what one
    loader process can supply, to compare with what a training step consumes."""
    from iil_dist.data.reader import StreamingSplit, train_batches

    torch.set_num_threads(1)
    split = StreamingSplit(f"{scenario}/{{file}}", "phase-01", read_manifest(scenario))
    start, count = time.perf_counter(), 0
    for epoch in range(2):
        for _, y, _ in train_batches(split, epoch=epoch, seed=0, rank=0, world_size=1, batch_size=args.batch):
            count += len(y)
    return {"img_per_s": round(count / (time.perf_counter() - start), 1)}


def system_run(args: argparse.Namespace, scenario: Path, workers: int) -> dict:
    """`iil-dist train` with `workers` Ray workers; phase 1's timing from results.json."""
    name = f"bench-engine-w{workers}"
    command = [
        sys.executable, "-m", "iil_dist", "train", str(CONFIG), *overrides(args, scenario),
        f"name={name}", f"run_root={args.work / 'runs'}", f"dist.num_workers={workers}",
        f"data.shard_url={scenario}/{{file}}", "data.in_memory=false", "tracking.step_timing=true",
        f"data.loader_workers={args.loader_workers}",
        "tracking.wandb_mode=offline", "tracking.log_every=10", "tracking.print_every=1000",
        "checkpoint.every_epochs=0",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((args.work / "runs" / name / "results.json").read_text())
    phase = next(t for t in results["timing"] if t["phase"] == 1)
    return {"workers": workers, **{k: phase[k] for k in ("img_per_s", "train_s", "step_ms")}}


def _wait(step_ms: dict[str, float]) -> float:
    return step_ms.get("data", 0.0) + step_ms.get("data_epoch_start", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6000, help="synthetic source images (100 classes)")
    parser.add_argument("--side", type=int, default=32, help="image side in the shards")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of phase 1")
    parser.add_argument("--loader-workers", type=int, default=1, help="data.loader_workers of the system runs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/iil-bench-engine"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "engine.json"))
    args = parser.parse_args()
    make_image_folder(args.work / "source", args.images, 40)
    scenario = args.work / f"scenario-{args.images}-{args.side}"
    prepare = [sys.executable, "-m", "iil_dist", "prepare", str(CONFIG), *overrides(args, scenario)]
    subprocess.run(prepare, check=True, capture_output=True)

    reader = reader_rate(args, scenario)
    plain = [plain_loop(args, scenario)]
    systems = [system_run(args, scenario, workers) for workers in (1, 2)]
    plain.append(plain_loop(args, scenario))
    reference = sum(p["img_per_s"] for p in plain) / len(plain)
    one, two = systems
    report = {
        "cpus": os.cpu_count(),
        "model": args.model,
        "image_side": args.side,
        "batch_size": args.batch,
        "phase_images": read_manifest(scenario)["splits"]["phase-01"]["num_samples"],
        "epochs": args.epochs,
        "plain": plain,
        "system": systems,
        "ratio_1_worker_to_plain": round(one["img_per_s"] / reference, 3),
        "ratio_2_workers_to_1": round(two["img_per_s"] / one["img_per_s"], 3),
        # data: what one reader process supplies over what one worker's steps consume, and the steps' wait
        "reader_img_per_s": reader["img_per_s"],
        "ratio_reader_to_consumption": round(reader["img_per_s"] / one["img_per_s"], 3),
        # waiting for batches: in steady state, and for each epoch's first (loader start, shuffle buffer fill)
        "data_wait_share": {f"{r['workers']}w": round(_wait(r["step_ms"]) / sum(r["step_ms"].values()), 4)
                            for r in systems},
        "epoch_start_share": {f"{r['workers']}w": round(r["step_ms"].get("data_epoch_start", 0.0)
                                                         / sum(r["step_ms"].values()), 4) for r in systems},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    sections = sorted({k for r in [*plain, *systems] for k in r["step_ms"]})
    print(f"{'run':>12} {'img/s':>8} " + " ".join(f"{s[:14]:>14}" for s in sections) + "   (ms per step)")
    rows = [("plain", plain[0]), ("system 1w", one), ("system 2w", two), ("plain again", plain[1])]
    for label, r in rows:
        print(f"{label:>12} {r['img_per_s']:>8} " + " ".join(f"{r['step_ms'].get(s, 0):>14.3f}" for s in sections))
    print(f"1 worker / plain loop: {report['ratio_1_worker_to_plain']}   2 workers / 1 worker: "
          f"{report['ratio_2_workers_to_1']}")  # fmt: skip
    print(f"reader alone {reader['img_per_s']} img/s per process = {report['ratio_reader_to_consumption']}x what "
          f"one worker consumes; data wait {report['data_wait_share']} of step time, of which epoch starts "
          f"{report['epoch_start_share']}   -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
