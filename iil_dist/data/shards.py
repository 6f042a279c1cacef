"""Write a scenario as WebDataset shards plus a manifest; read and check the manifest.

Layout of a scenario directory:

    manifest.json                 written last, atomically: its presence marks a complete scenario
    base/base-000000.tar ...      WebDataset shards, members <key>.cls (ascii label) and <key>.png|jpg
    base/index.json               wids descriptor of the split (relative shard urls)
    phase-01/ ... test/           the same for every other split
    .prepare-journal.json         while writing: the shards finished so far (a rerun skips them)

Keys are "<split>-<6-digit position in split>": no "." or "/" so that WebDataset and wids both cut
the member name into key and extension the same way. Same arguments give byte-identical files.

Writing scales to ImageNet: every shard is one task for a pool of processes, which receives only
its own samples' labels, drift parameters and image references (array rows or file names) and returns
its checksum, so memory stays flat in the dataset size; at most two tasks per process are in
flight. A shard is written to a temporary name, synced and renamed; the journal records it, and a
rerun with the same arguments skips every shard whose checksum still matches.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from iil_dist.data.scenario import (
    DRIFT_FIELDS,
    IDENTITY,
    Drift,
    build_scenario,
    derived_seed,
    distort,
    drift_params,
    drift_source_positions,
    split_names,
    subgroup_ids,
    thumbnail,
)
from iil_dist.data.sources import EncodedImage, Items, RawImage, load_source

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
WIDS_INDEX = "index.json"
JOURNAL = ".prepare-journal.json"
ENCODINGS = ("png", "jpeg", "keep")
# fixed tar member metadata: the current time or user would make every write differ
_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
_TAR_OWNER = "iil"
# tar header and padding per member, two members per sample: used when shards are cut by size
_TAR_OVERHEAD_PER_SAMPLE = 3 * 512
# normalisation statistics are estimated from at most this many base images, spread evenly
_STATS_SAMPLES = 5000
# images rendered per split to estimate the encoded size when shards are cut by size
_SIZE_PROBE = 16

# the arguments that define a scenario: equal values give byte-identical shards
SCENARIO_ARGS = (
    "source", "class_list", "num_phases", "base_fraction", "test_fraction", "split_seed", "order_seed", "drift",
    "rotation_min_deg", "rotation_max_deg", "blur_min", "blur_max", "contrast_min", "contrast_max", "subgroups",
    "hidden_subgroups", "image_size", "max_side", "encode", "jpeg_quality", "samples_per_shard", "shard_size_mb",
)  # fmt: skip
# drift fields added after format 2 was first written: a manifest without them was written with their
# defaults in effect (rotation and none scenarios do not depend on them), so they are read as those
_LATER_ARGS = {name: getattr(Drift(), name) for name in DRIFT_FIELDS if not name.startswith("rotation_")}
_TOP_FIELDS = (
    "format_version",
    *(name for name in SCENARIO_ARGS if name not in _LATER_ARGS),
    "num_classes",
    "channels",
    "normalization",
    "normalization.mean",
    "normalization.std",
    "splits",
)
_SPLIT_FIELDS = ("num_samples", "class_counts", "shards")
_SHARD_FIELDS = ("file", "num_samples", "sha256")


def sample_key(split: str, position: int) -> str:
    """WebDataset key of the sample at `position` within `split`."""
    return f"{split}-{position:06d}"


def key_position(key: str) -> tuple[str, int] | None:
    """The split and position a `sample_key` names; None for a key of another form."""
    split, _, number = key.rpartition("-")
    return (split, int(number)) if split and number.isdigit() else None


# how a split's samples are laid out in its shards: "shuffled" (written since the field exists) or
# "sequential" (in position order, what a manifest without the field was written with)
STORAGE = ("shuffled", "sequential")


def storage_order(split_seed: int, split: str, num_samples: int) -> np.ndarray:
    """The position of the sample stored at each place of a split (places count shard by shard, member by
    member). A seeded permutation: every shard holds a random mix of the split's classes and drift, so a
    stream through a few shards is already mixed even where the source lists its images class by class
    (an ImageFolder). Positions, and so keys, indexed reads and in-memory splits, keep the split's order."""
    return np.random.default_rng(derived_seed(split_seed, f"storage:{split}")).permutation(num_samples)


@dataclass(frozen=True)
class RenderOptions:
    """How a source image becomes the bytes stored in a shard."""

    mode: str  # "L" or "RGB"
    image_size: int  # square side to resize to; 0 keeps the source size
    max_side: int  # longest side after downscaling (aspect kept); 0 leaves it
    encode: str  # png | jpeg | keep (the source file's bytes where pixels are unchanged, else JPEG)
    jpeg_quality: int


def render(raw: RawImage, params: np.ndarray, opts: RenderOptions) -> tuple[bytes, str]:
    """The stored bytes and extension (`png` or `jpg`) of one sample after resize and drift (`params`: a
    row of `drift_params`)."""
    unchanged = tuple(float(v) for v in params) == IDENTITY
    if isinstance(raw, EncodedImage) and opts.encode == "keep" and raw.ext in ("jpg", "png"):
        if not opts.image_size and unchanged and (not opts.max_side or _longest_side(raw) <= opts.max_side):
            return raw.data, raw.ext
    image = Image.fromarray(raw) if isinstance(raw, np.ndarray) else _open(raw)
    if image.mode != opts.mode:
        image = image.convert(opts.mode)
    if opts.image_size:
        image = image.resize((opts.image_size, opts.image_size), Image.Resampling.BILINEAR)
    if opts.max_side and max(image.size) > opts.max_side:
        scale = opts.max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    if not unchanged:
        image = distort(image, params)
    buffer = io.BytesIO()
    if opts.encode == "png" or (opts.encode == "keep" and isinstance(raw, np.ndarray)):
        # fixed encoder settings: same pixels, same bytes (PNG carries no timestamp unless asked to)
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
        return buffer.getvalue(), "png"
    image.save(buffer, format="JPEG", quality=opts.jpeg_quality)
    return buffer.getvalue(), "jpg"


def _open(raw: EncodedImage) -> Image.Image:
    image = Image.open(io.BytesIO(raw.data))
    image.load()
    return image


def _longest_side(raw: EncodedImage) -> int:
    with Image.open(io.BytesIO(raw.data)) as image:  # reads the header only
        return max(image.size)


@dataclass
class ShardTask:
    """One shard to write: its samples' images, labels and drift parameters, and which count for statistics."""

    path: Path
    split: str
    positions: np.ndarray  # the position in the split of each of the shard's samples, in stored order
    items: Items
    labels: np.ndarray
    params: np.ndarray  # (samples, 3) rows of `drift_params`
    stats_rows: np.ndarray  # rows of this shard whose pixels feed the normalisation statistics
    opts: RenderOptions


@dataclass
class ShardResult:
    file: str
    num_samples: int
    sha256: str
    bytes: int
    # per channel: a 256-bin histogram of the pixel values of `stats_rows` (exact, and cheap to add up)
    stats: list[list[int]] = field(default_factory=list)


def write_shard(task: ShardTask) -> ShardResult:
    """Renders and writes one shard (temporary name, fsync, rename); runs in a pool process."""
    channels = 1 if task.opts.mode == "L" else 3
    histogram = np.zeros((channels, 256), dtype=np.int64)
    stats_rows = set(task.stats_rows.tolist())

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for row in range(len(task.labels)):
            data, ext = render(task.items[row], task.params[row], task.opts)
            if row in stats_rows:
                pixels = np.asarray(Image.open(io.BytesIO(data)).convert(task.opts.mode)).reshape(-1, channels)
                for c in range(channels):
                    histogram[c] += np.bincount(pixels[:, c], minlength=256)
            key = sample_key(task.split, int(task.positions[row]))
            yield key, {"cls": str(int(task.labels[row])).encode("ascii"), ext: data}

    _write_tar(task.path, samples())
    name = f"{task.split}/{task.path.name}"
    size = task.path.stat().st_size
    return ShardResult(name, len(task.labels), file_sha256(task.path), size, histogram.tolist())


def _write_tar(path: Path, samples: Iterator[tuple[str, dict[str, bytes]]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as stream:
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members in samples:
                    if "/" in key or ".." in key or not key:
                        raise ValueError(
                            f"shard {path}: refusing to write a sample key {key!r} that is not a plain name"
                        )
                    for ext, data in members.items():
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o444
                        info.uname = info.gname = _TAR_OWNER
                        tar.addfile(info, io.BytesIO(data))
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed shard leaves nothing behind
        raise
    os.replace(tmp, path)


def write_scenario(
    out_dir: Path,
    *,
    source: str,
    num_phases: int,
    base_fraction: float,
    test_fraction: float,
    split_seed: int,
    order_seed: int,
    drift: str,
    rotation_min_deg: float,
    rotation_max_deg: float,
    image_size: int,
    samples_per_shard: int,
    blur_min: float = 0.06,
    blur_max: float = 0.12,
    contrast_min: float = 0.3,
    contrast_max: float = 0.6,
    subgroups: int = 3,
    hidden_subgroups: int = 1,
    source_path: str = "",
    class_list: str = "",
    max_side: int = 0,
    encode: str = "png",
    jpeg_quality: int = 90,
    shard_size_mb: float = 0.0,
    num_workers: int = 1,
    progress: bool = False,
) -> dict:
    """Build the scenario from `source`, write its shards and manifest under `out_dir`, return the manifest.

    `num_workers` processes write shards in parallel (0: one per CPU). Shards hold `samples_per_shard`
    samples, or, with `shard_size_mb` > 0, as many as make about that many MB. Normalisation statistics
    are computed on up to 5,000 base images as written, on the pixel / 255 scale. An existing manifest is
    removed first, so an interrupted rewrite leaves none; finished shards are reused by a rerun.
    """
    args = {
        "source": source, "class_list": class_list, "num_phases": num_phases, "base_fraction": base_fraction,
        "test_fraction": test_fraction, "split_seed": split_seed, "order_seed": order_seed, "drift": drift,
        "rotation_min_deg": rotation_min_deg, "rotation_max_deg": rotation_max_deg, "blur_min": blur_min,
        "blur_max": blur_max, "contrast_min": contrast_min, "contrast_max": contrast_max, "subgroups": subgroups,
        "hidden_subgroups": hidden_subgroups, "image_size": image_size, "max_side": max_side, "encode": encode,
        "jpeg_quality": jpeg_quality, "samples_per_shard": samples_per_shard, "shard_size_mb": shard_size_mb,
    }  # fmt: skip
    _check_write_args(args)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    shift = Drift(drift, **{name: args[name] for name in DRIFT_FIELDS})
    src = load_source(source, source_path, class_list, cache_dir=out_dir / ".source")
    hidden = _hidden_subgroups(src, shift, split_seed) if shift.kind == "subpopulation" else None
    scenario = build_scenario(
        src.labels, num_phases=num_phases, base_fraction=base_fraction, test_fraction=test_fraction,
        split_seed=split_seed, order_seed=order_seed, num_train=src.num_train if src.has_test_split else None,
        hidden=hidden,
    )  # fmt: skip
    opts = RenderOptions("L" if src.channels == 1 else "RGB", image_size, max_side, encode, jpeg_quality)
    num_classes = len(src.class_names)

    # tasks are made lazily, split by split, as the pool takes them: memory stays flat in the dataset size
    names = split_names(num_phases)
    tasks = (task for split in names for task in _plan_split(out_dir, split, scenario[split], src, args, shift, opts))
    total = sum(len(drift_source_positions(len(scenario[split]), split, shift)) for split in names)
    results = _run_tasks(out_dir, tasks, total, args, num_workers, progress)

    splits: dict[str, dict] = {}
    for split in names:
        positions = drift_source_positions(len(scenario[split]), split, shift)
        labels = src.labels[scenario[split][positions]]
        splits[split] = _split_entry(out_dir, split, results[split], labels, num_classes)
        splits[split]["num_source_samples"] = len(scenario[split])
        if hidden is not None:
            # samples of the hidden sub-groups: none in base, the rest spread over the phases (and the test set)
            splits[split]["num_hidden"] = int(hidden[scenario[split]].sum())
    mean, std = _normalization(results["base"])
    manifest = {
        "format_version": FORMAT_VERSION,
        **args,
        "source_path": str(source_path),
        "num_classes": num_classes,
        "class_names": src.class_names,
        "channels": src.channels,
        "normalization": {"mean": mean, "std": std},
        "phases": split_names(num_phases)[1:-1],
        "storage": "shuffled",
        "splits": splits,
    }
    _write_json_atomic(out_dir / MANIFEST, manifest)
    (out_dir / JOURNAL).unlink(missing_ok=True)
    _remove_tree(out_dir / ".source")
    logger.info(
        "wrote scenario %s: %s", out_dir, ", ".join(f"{name} {entry['num_samples']}" for name, entry in splits.items())
    )
    return manifest


def _check_write_args(args: dict[str, Any]) -> None:
    if not isinstance(args["samples_per_shard"], int) or args["samples_per_shard"] < 1:
        raise ValueError(f"data.samples_per_shard must be a positive integer, got {args['samples_per_shard']!r}")
    if args["encode"] not in ENCODINGS:
        raise ValueError(f"data.encode must be one of {list(ENCODINGS)}, got {args['encode']!r}")
    if not 1 <= args["jpeg_quality"] <= 100:
        raise ValueError(f"data.jpeg_quality must be in 1..100, got {args['jpeg_quality']!r}")
    for name in ("image_size", "max_side"):
        if not isinstance(args[name], int) or args[name] < 0:
            raise ValueError(f"data.{name} must be an integer >= 0, got {args[name]!r}")


def _hidden_subgroups(src: Any, drift: Drift, seed: int) -> np.ndarray:
    """The subpopulation drift's mask of training samples that D(0) may not hold (test samples: False)."""
    train = np.arange(src.num_train if src.has_test_split else len(src.labels))
    thumbs = np.stack([thumbnail(_as_image(src.items[int(i)])) for i in train])
    groups = subgroup_ids(thumbs, src.labels[train], num_groups=drift.subgroups, seed=seed)
    hidden = np.zeros(len(src.labels), dtype=bool)
    hidden[train] = groups >= drift.subgroups - drift.hidden_subgroups
    return hidden


def _as_image(raw: RawImage) -> Image.Image:
    if isinstance(raw, np.ndarray):
        return Image.fromarray(raw)
    image = Image.open(io.BytesIO(raw.data))
    image.draft("L", (64, 64))  # JPEG: decode at a reduced scale, a thumbnail is all that is needed
    return image


def _plan_split(
    out_dir: Path,
    split: str,
    indices: np.ndarray,
    src: Any,
    args: dict[str, Any],
    drift: Drift,
    opts: RenderOptions,
) -> Iterator[ShardTask]:
    """The shard tasks of one split, in order; the same arguments always give the same plan."""
    positions = drift_source_positions(len(indices), split, drift)
    source_rows = indices[positions]
    labels = src.labels[source_rows]
    params = drift_params(len(indices), split, drift, args["split_seed"])
    total = len(source_rows)
    per_shard = args["samples_per_shard"]
    if args["shard_size_mb"] > 0:
        probe = range(min(_SIZE_PROBE, total))
        mean_bytes = np.mean([len(render(src.items[int(source_rows[i])], params[i], opts)[0]) for i in probe])
        per_shard = max(1, int(args["shard_size_mb"] * 2**20 / (mean_bytes + _TAR_OVERHEAD_PER_SAMPLE)))
    stats_step = max(1, math.ceil(total / _STATS_SAMPLES))
    split_dir = out_dir / split
    split_dir.mkdir(exist_ok=True)
    stored = storage_order(args["split_seed"], split, total)
    for shard_id, start in enumerate(range(0, total, per_shard)):
        here = stored[start : start + per_shard]  # the positions of this shard's samples
        # the statistics come from the same positions whatever the storage order
        stats_rows = np.flatnonzero(here % stats_step == 0) if split == "base" else np.empty(0, dtype=np.int64)
        yield ShardTask(
                path=split_dir / f"{split}-{shard_id:06d}.tar",
                split=split,
                positions=here,
                items=src.items.subset(source_rows[here]),
                labels=labels[here],
                params=params[here],
                stats_rows=stats_rows,
                opts=opts,
            )  # fmt: skip


def _run_tasks(
    out_dir: Path, tasks: Iterator[ShardTask], total: int, args: dict[str, Any], num_workers: int, progress: bool
) -> dict[str, list[ShardResult]]:
    """Writes every shard not already written (journal and checksum agree); returns each split's shard
    results in shard order."""
    from tqdm import tqdm

    journal = _read_journal(out_dir, args)
    results: dict[Path, ShardResult] = {}
    order: dict[str, list[Path]] = {}
    bar = tqdm(total=total, unit="img", desc="prepare", disable=not progress, smoothing=0.05, dynamic_ncols=True)

    written: list[Path] = []

    def finished(task: ShardTask, result: ShardResult) -> None:
        written.append(task.path)
        results[task.path] = result
        journal[result.file] = result.__dict__
        _write_json_atomic(out_dir / JOURNAL, {"args": args, "shards": journal})
        bar.update(result.num_samples)

    def todo() -> Iterator[ShardTask]:
        for task in tasks:
            order.setdefault(task.split, []).append(task.path)
            done = journal.get(f"{task.split}/{task.path.name}")
            if done is not None and task.path.is_file() and file_sha256(task.path) == done["sha256"]:
                results[task.path] = ShardResult(**done)
                bar.update(done["num_samples"])
            else:
                yield task

    workers = num_workers or os.cpu_count() or 1
    try:
        if workers <= 1:
            for task in todo():
                finished(task, write_shard(task))
        else:
            # spawn: the pool processes import only numpy, PIL and this package's data modules
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                pending: dict[Future, ShardTask] = {}
                for task in todo():
                    pending[pool.submit(write_shard, task)] = task
                    # bounded: at most two tasks per process wait, so memory does not grow with the split
                    while len(pending) >= 2 * workers:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            finished(pending.pop(future), future.result())
                for future in list(pending):
                    finished(pending.pop(future), future.result())
    finally:
        bar.close()
    reused = sum(len(paths) for paths in order.values()) - len(written)
    if reused:
        logger.info("reused %d shards written before (checksums match)", reused)
    return {split: [results[p] for p in paths] for split, paths in order.items()}


def _read_journal(out_dir: Path, args: dict[str, Any]) -> dict[str, dict]:
    path = out_dir / JOURNAL
    if not path.is_file():
        return {}
    try:
        journal = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return journal.get("shards", {}) if journal.get("args") == args else {}


def _split_entry(out_dir: Path, split: str, shards: list[ShardResult], labels: np.ndarray, num_classes: int) -> dict:
    split_dir = out_dir / split
    keep = {Path(s.file).name for s in shards}
    # shards of an earlier, possibly larger, scenario would otherwise linger beside the new ones
    for stale in split_dir.glob(f"{split}-*.tar"):
        if stale.name not in keep:
            stale.unlink()
    wids_index = {
        "wids_version": 1,
        "name": split,
        "shardlist": [{"url": Path(s.file).name, "nsamples": s.num_samples, "filesize": s.bytes} for s in shards],
    }
    _write_json_atomic(split_dir / WIDS_INDEX, wids_index)
    counts = np.bincount(labels, minlength=num_classes)
    return {
        "num_samples": int(sum(s.num_samples for s in shards)),
        "class_counts": {str(c): int(n) for c, n in enumerate(counts)},
        "shards": [
            {"file": s.file, "num_samples": s.num_samples, "sha256": s.sha256, "bytes": s.bytes} for s in shards
        ],
        "wids_index": f"{split}/{WIDS_INDEX}",
    }


def _normalization(base_results: list[ShardResult]) -> tuple[list[float], list[float]]:
    histogram = np.sum([np.asarray(r.stats, dtype=np.int64) for r in base_results], axis=0)
    values = np.arange(256) / 255.0
    count = histogram.sum(1)
    mean = histogram @ values / count
    std = np.sqrt(np.maximum(histogram @ values**2 / count - mean**2, 0.0))
    return [float(m) for m in mean], [float(s) for s in std]


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    # rename last: readers see the old file or the complete new one, never a torn write
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(scenario_dir: Path) -> dict:
    """Load `scenario_dir`/manifest.json; a missing file or field raises ValueError naming both."""
    path = Path(scenario_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: no manifest; write the scenario first (iil-dist prepare)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc

    def require(obj: Any, fields: tuple[str, ...], where: str) -> None:
        for field_name in fields:
            value = obj
            for part in field_name.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ValueError(f"{path}: missing field '{where}{field_name}'")
                value = value[part]

    require(manifest, ("format_version",), "")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest['format_version']!r} is not {FORMAT_VERSION}; re-run prepare"
        )
    require(manifest, _TOP_FIELDS, "")
    for name, value in _LATER_ARGS.items():
        manifest.setdefault(name, value)
    manifest.setdefault("storage", "sequential")
    if manifest["storage"] not in STORAGE:
        raise ValueError(f"{path}: storage is {manifest['storage']!r}, expected one of {list(STORAGE)}")
    missing = [name for name in split_names(int(manifest["num_phases"])) if name not in manifest["splits"]]
    if missing:
        raise ValueError(f"{path}: num_phases is {manifest['num_phases']} but split {missing[0]!r} is missing")
    for split, entry in manifest["splits"].items():
        require(entry, _SPLIT_FIELDS, f"splits.{split}.")
        for k, shard in enumerate(entry["shards"]):
            require(shard, _SHARD_FIELDS, f"splits.{split}.shards[{k}].")
        count = entry["num_samples"]
        if not isinstance(count, int) or count < 1 or not entry["shards"]:
            # an empty phase would train on nothing and report it as a phase; an empty test set has no accuracy
            raise ValueError(
                f"{path}: split {split!r} is empty ({count!r} samples in {len(entry['shards'])} shards); every "
                "split needs samples: prepare the scenario again (with fewer data.num_phases for a small source)"
            )
    return manifest


def verify_shards(scenario_dir: Path, manifest: dict) -> None:
    """Recompute every shard's sha256; a missing or changed shard raises ValueError naming it."""
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            path = Path(scenario_dir) / shard["file"]
            if not path.is_file():
                raise ValueError(f"shard {path} listed in the manifest is missing")
            got = file_sha256(path)
            if got != shard["sha256"]:
                raise ValueError(f"shard {path} has sha256 {got}, manifest says {shard['sha256']}")


def prepare_scenario(data: Any, force: bool = False, progress: bool = True) -> Path:
    """Writes the scenario of a `DataConfig` unless its directory already holds one with the same settings.

    Raises:
        ValueError: the directory holds a scenario written with other settings (or an older format) and
            `force` is false; the message names the manifest.
    """
    out = data.scenario_dir
    args = {name: getattr(data, name) for name in SCENARIO_ARGS}
    if (out / MANIFEST).exists() and not force:
        try:
            manifest = read_manifest(out)
        except ValueError as err:
            raise ValueError(f"{err}; pass --force to rewrite it") from None
        if all(manifest.get(k) == v for k, v in args.items()):
            logger.info("scenario %s is already prepared with these settings; nothing to do", out)
            return out
        raise ValueError(f"{out / MANIFEST} was written with other settings; choose another data.root or pass --force")
    write_scenario(out, **args, source_path=data.source_path, num_workers=data.prepare_workers, progress=progress)
    return out
