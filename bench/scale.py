"""Scale: time per sample and peak memory of `iil-dist prepare` and of one training epoch, for increments of
10k, 100k (and, with --samples, 1M) synthetic samples.

Each increment is written as a memory-mapped array source (`data.source=arrays`: 16x16 grayscale images of
10 classes, a class pattern plus noise, generated in chunks), then `prepare` cuts it into a 1-phase scenario
(test 25%, D(0) 10% of the rest, the phase the other 90%) and `iil-dist train` runs one epoch of D(0) and
one epoch of the phase (DBD + KC-EMA, 2 workers, shards streamed, in_memory off) with both evaluations,
as users run them (subprocesses). Peak memory is the resident set of the command's whole process tree
(the command, prepare's writers, Ray's processes and workers), sampled every 50 ms, and of it the private
part (resident minus shared: without the pages of the memory-mapped source, which the page cache holds and
can drop): flat private memory in N shows that nothing holds the increment in memory.

    .venv/bin/python bench/scale.py                                  # 10k and 100k -> bench/results/scale.json
    .venv/bin/python bench/scale.py --samples 1000000 --out bench/results/scale-1m.json   # about 15 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits.yaml"
SIDE, CLASSES = 16, 10


def write_arrays(folder: Path, n: int) -> None:
    """images.npy and labels.npy of `n` samples, written in chunks (never the whole array in memory)."""
    if (folder / "labels.npy").exists() and len(np.load(folder / "labels.npy", mmap_mode="r")) == n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % CLASSES).astype(np.int64)
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    patterns = np.stack([127 + 100 * np.sin((c + 1) * xx / 5 + c * yy / 7) for c in range(CLASSES)])
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, SIDE, SIDE))
    for start in range(0, n, 50_000):
        chunk = labels[start : start + 50_000]
        noisy = patterns[chunk] + rng.normal(0, 40, (len(chunk), SIDE, SIDE))
        images[start : start + len(chunk)] = np.clip(noisy, 0, 255).astype(np.uint8)
    images.flush()
    del images
    np.save(folder / "labels.npy", labels)


def _tree_rss(process: psutil.Process) -> tuple[int, int]:
    """Resident bytes of the process tree, and of them the private ones (resident minus shared: what is
    not file-backed, such as pages of a memory-mapped source, or shared memory)."""
    total = private = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            info = p.memory_info()
        except psutil.Error:
            continue
        total += info.rss
        private += info.rss - info.shared
    return total, private


def run(command: list[str]) -> tuple[float, float, float]:
    """Seconds, peak resident MB and peak private MB of `command`'s process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched, peak, peak_private = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        rss, private = _tree_rss(watched)
        peak, peak_private = max(peak, rss), max(peak_private, private)
        time.sleep(0.05)
    if proc.returncode:
        raise RuntimeError(f"{command[3]} failed: {proc.stderr.read()[-3000:]}")
    return time.perf_counter() - start, peak / 2**20, peak_private / 2**20


def measure(n: int, work: Path, prepare_only: bool = False) -> dict:
    source, scenario = work / f"arrays-{n}", work / f"scenario-{n}"
    write_arrays(source, n)
    shutil.rmtree(scenario, ignore_errors=True)
    common = [
        "data.source=arrays", f"data.source_path={source}", f"data.root={scenario}", f"data.image_size={SIDE}",
        "data.drift=none", "data.num_phases=1", "data.base_fraction=0.1", f"data.samples_per_shard={max(100, n // 50)}",
    ]  # fmt: skip
    prepare_s, prepare_mb, prepare_private = run([sys.executable, "-m", "iil_dist", "prepare", str(CONFIG), *common])
    manifest = json.loads((scenario / "manifest.json").read_text())
    row = {
        "samples": n,
        "prepare_s": round(prepare_s, 1),
        "prepare_us_per_sample": round(1e6 * prepare_s / n, 1),
        "prepare_peak_mb": round(prepare_mb),
        "prepare_peak_private_mb": round(prepare_private),
        "shards": sum(len(e["shards"]) for e in manifest["splits"].values()),
    }
    if prepare_only:
        return row
    runs = work / "runs"
    train = [
        *common, f"run_root={runs}", f"name=scale-{n}", "optim.base_epochs=1", "optim.epochs_per_phase=1",
        "method.freeze_epochs=0", "optim.batch_size=128", "dist.num_workers=2", f"data.shard_url={scenario}/{{file}}",
        "data.in_memory=false", "tracking.wandb_mode=offline", "tracking.log_every=50", "tracking.print_every=1000",
        "checkpoint.every_epochs=0",
    ]  # fmt: skip
    train_s, train_mb, train_private = run([sys.executable, "-m", "iil_dist", "train", str(CONFIG), *train])
    results = json.loads((runs / f"scale-{n}" / "results.json").read_text())
    phase = next(t for t in results["timing"] if t["phase"] == 1)
    phase_samples = manifest["splits"]["phase-01"]["num_samples"]
    return {
        **row,
        "train_s": round(train_s, 1),
        "phase_samples": phase_samples,
        "phase_epoch_s": phase["train_s"],
        "phase_us_per_sample": round(1e6 * phase["train_s"] / phase_samples, 1),
        "train_peak_mb": round(train_mb),
        "train_peak_private_mb": round(train_private),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/iil-bench-scale"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    parser.add_argument("--prepare-only", action="store_true", help="measure prepare only, no training epoch")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    rows = []
    for n in args.samples:
        rows.append(measure(n, args.work, args.prepare_only))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "image_side": SIDE, "rows": rows}, indent=2) + "\n")
    print(f"{'samples':>9} {'prepare us/sample':>18} {'prepare MB (private)':>21} {'epoch us/sample':>16} "
          f"{'train MB (private)':>19}")  # fmt: skip
    for r in rows:
        prepare = f"{r['prepare_peak_mb']} ({r['prepare_peak_private_mb']})"
        train = f"{r['train_peak_mb']} ({r['train_peak_private_mb']})" if "train_peak_mb" in r else "-"
        print(f"{r['samples']:>9} {r['prepare_us_per_sample']:>18} {prepare:>21} "
              f"{r.get('phase_us_per_sample', '-'):>16} {train:>19}")  # fmt: skip
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
