"""Shard-writing throughput and memory of `iil-dist prepare` on a JPEG ImageFolder tree of N images.

For each N, a synthetic ImageFolder (100 classes, 96x72 JPEGs of smooth random content, 10% of the
images in val/) is written once under --work, then `iil-dist prepare` runs on it as a subprocess, the
way users run it, in two modes: `keep` (source JPEG bytes copied into the shards) and `reencode`
(decoded, downscaled to --max-side and re-encoded as JPEG). Reported: images per second of the
whole command, and the peak resident memory of its whole process tree (the command and its
writer processes), sampled every 50 ms; memory flat in N shows the writer streams.

    .venv/bin/python bench/prepare.py                     # 10k and 100k images -> bench/results/prepare.json
    .venv/bin/python bench/prepare.py --images 2000 --width 500 --max-side 256 \
        --out bench/results/prepare-500px.json           # ImageNet-sized images
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 100


def make_image_folder(root: Path, num_images: int, width: int) -> None:
    """train/ and val/ of NUM_CLASSES class folders holding `num_images` JPEGs of width x 3/4 width in all
    (written once)."""
    marker = root / ".complete"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : width * 3 // 4, 0:width]
    for i in range(num_images):
        split = "val" if (i // NUM_CLASSES) % 10 == 0 else "train"
        folder = root / split / f"n{i % NUM_CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth colour gradients plus mild noise: compresses like a photo, not like white noise
        a, b, c = rng.uniform(0.2, 1.5, size=3)
        scale = width / 96  # the same content at every size
        base = np.stack(
            [np.sin(a * xx / (10 * scale) + c), np.cos(b * yy / (10 * scale)), np.sin((xx + yy) / (20 * a * scale))], -1
        )
        pixels = np.clip(127 + 100 * base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        (folder / f"img{i:07d}.JPEG").write_bytes(buffer.getvalue())
    marker.touch()


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_prepare(source: Path, out: Path, mode: str, max_side: int, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        "data.source=imagefolder", f"data.source_path={source}", f"data.root={out}", "data.image_size=0",
        "data.drift=none", "data.num_phases=10", "data.shard_size_mb=64", f"data.prepare_workers={workers}",
        "data.train_transform=resized_crop_flip", "data.eval_transform=resize_center_crop", "data.crop_size=64",
        "data.encode=keep" if mode == "keep" else "data.encode=jpeg",
    ]  # fmt: skip
    if mode == "reencode":
        overrides.append(f"data.max_side={max_side}")
    command = [sys.executable, "-m", "iil_dist", "prepare", str(REPO / "configs" / "digits.yaml"), *overrides]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(watched))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"prepare failed: {proc.stderr.read()[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    images = sum(entry["num_samples"] for entry in manifest["splits"].values())
    shard_bytes = sum(s["bytes"] for e in manifest["splits"].values() for s in e["shards"])
    num_shards = sum(len(e["shards"]) for e in manifest["splits"].values())
    return {"mode": mode, "images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1),
            "peak_rss_mb": round(peak / 2**20, 1), "num_shards": num_shards,
            "shard_mb": round(shard_bytes / 2**20, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=0, help="data.prepare_workers (0: every CPU)")
    parser.add_argument("--max-side", type=int, default=64, help="longest side after re-encoding")
    parser.add_argument("--width", type=int, default=96, help="source image width (height 3/4 of it)")
    parser.add_argument("--work", default="/tmp/iil-bench-prepare")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "prepare.json"))
    args = parser.parse_args()
    work = Path(args.work)
    rows = []
    for n in args.images:
        source = work / f"imagefolder-{n}-{args.width}px"
        start = time.perf_counter()
        make_image_folder(source, n, args.width)
        print(f"{n} source images ready ({time.perf_counter() - start:.0f} s)", flush=True)
        for mode in ("keep", "reencode"):
            scenario = work / f"scenario-{n}-{mode}"
            row = {
                "source_images": n,
                "width": args.width,
                **run_prepare(source, scenario, mode, args.max_side, args.workers),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"cpus": os.cpu_count(), "workers": args.workers, "max_side": args.max_side, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'images':>8} {'mode':>9} {'img/s':>8} {'peak MB':>8} {'shards':>7}")
    for r in rows:
        print(
            f"{r['source_images']:>8} {r['mode']:>9} {r['images_per_s']:>8} {r['peak_rss_mb']:>8} {r['num_shards']:>7}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
