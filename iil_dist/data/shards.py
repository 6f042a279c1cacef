"""Write a scenario as WebDataset shards plus a manifest; read and check the manifest.

Layout of a scenario directory:

    manifest.json                 written last, atomically: its presence marks a complete scenario
    base/base-000000.tar ...      WebDataset shards, members <key>.cls (ascii label) and <key>.png
    base/index.json               wids descriptor of the split (relative shard urls)
    phase-01/ ... test/           the same for every other split

Keys are "<split>-<6-digit position in split>": no "." or "/" so that WebDataset and wids both cut
the member name into key and extension the same way. Same arguments give byte-identical files.
"""

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from iil_dist.data.scenario import apply_drift, build_scenario, drift_source_positions, split_names
from iil_dist.data.sources import load_source

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WIDS_INDEX = "index.json"
# fixed tar member metadata: TarWriter stamps the current time unless told otherwise
_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
_TAR_OWNER = "iil"

_ARG_FIELDS = (
    "source",
    "num_phases",
    "base_fraction",
    "test_fraction",
    "split_seed",
    "order_seed",
    "drift",
    "rotation_min_deg",
    "rotation_max_deg",
    "image_size",
    "samples_per_shard",
)
_TOP_FIELDS = (
    "format_version",
    *_ARG_FIELDS,
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
) -> dict:
    """Build the scenario from `source`, write its shards and manifest under `out_dir`, return the manifest.

    Normalisation statistics are computed on the base split as written (after resizing), on the
    pixel / 255 scale. An existing manifest is removed first, so an interrupted rewrite leaves none.
    """
    args = {
        "source": source,
        "num_phases": num_phases,
        "base_fraction": base_fraction,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "order_seed": order_seed,
        "drift": drift,
        "rotation_min_deg": rotation_min_deg,
        "rotation_max_deg": rotation_max_deg,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
    }
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"data.samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    images, labels = load_source(source)
    scenario = build_scenario(
        images,
        labels,
        num_phases=num_phases,
        base_fraction=base_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
        order_seed=order_seed,
    )
    num_classes = int(labels.max()) + 1
    channels = 1 if images.ndim == 3 else images.shape[-1]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)

    splits: dict[str, dict] = {}
    mean = std = None
    for split in split_names(num_phases):
        indices = scenario[split]
        split_images, _ = apply_drift(
            images[indices],
            split,
            drift=drift,
            seed=split_seed,
            rotation_min_deg=rotation_min_deg,
            rotation_max_deg=rotation_max_deg,
            image_size=image_size,
        )
        split_labels = labels[indices][drift_source_positions(len(indices), split, drift=drift)]
        if split == "base":
            mean, std = _channel_stats(split_images)
        splits[split] = _write_split(out_dir, split, split_images, split_labels, num_classes, samples_per_shard)
        splits[split]["num_source_samples"] = len(indices)

    manifest = {
        "format_version": FORMAT_VERSION,
        **args,
        "num_classes": num_classes,
        "channels": channels,
        "normalization": {"mean": mean, "std": std},
        "phases": split_names(num_phases)[1:-1],
        "splits": splits,
    }
    _write_json_atomic(out_dir / MANIFEST, manifest)
    logger.info(
        "wrote scenario %s: %s",
        out_dir,
        ", ".join(f"{name} {entry['num_samples']}" for name, entry in splits.items()),
    )
    return manifest


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    pixels = images.reshape(len(images), -1, 1 if images.ndim == 3 else images.shape[-1]) / 255.0
    mean = pixels.mean(axis=(0, 1))
    std = pixels.std(axis=(0, 1))
    return [float(m) for m in mean], [float(s) for s in std]


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # fixed encoder settings: same pixels, same bytes (PNG carries no timestamp unless asked to)
    Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _write_split(
    out_dir: Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    samples_per_shard: int,
) -> dict:
    split_dir = out_dir / split
    split_dir.mkdir(exist_ok=True)
    # shards of an earlier, possibly larger, scenario would otherwise linger beside the new ones
    for stale in split_dir.glob(f"{split}-*.tar"):
        stale.unlink()

    shards = []
    for shard_id, start in enumerate(range(0, len(images), samples_per_shard)):
        name = f"{split}-{shard_id:06d}.tar"
        stop = min(start + samples_per_shard, len(images))
        samples = (
            {
                "__key__": sample_key(split, i),
                "cls": str(int(labels[i])).encode("ascii"),
                "png": _encode_png(images[i]),
            }
            for i in range(start, stop)
        )
        _write_tar(split_dir / name, samples)
        shards.append({"file": f"{split}/{name}", "num_samples": stop - start, "sha256": file_sha256(split_dir / name)})

    wids_index = {
        "wids_version": 1,
        "name": split,
        "shardlist": [
            {
                "url": Path(s["file"]).name,
                "nsamples": s["num_samples"],
                "filesize": (out_dir / s["file"]).stat().st_size,
            }
            for s in shards
        ],
    }
    _write_json_atomic(split_dir / WIDS_INDEX, wids_index)
    counts = np.bincount(labels, minlength=num_classes)
    return {
        "num_samples": len(images),
        "class_counts": {str(c): int(n) for c, n in enumerate(counts)},
        "shards": shards,
        "wids_index": f"{split}/{WIDS_INDEX}",
    }


def _write_tar(path: Path, samples: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, user=_TAR_OWNER, group=_TAR_OWNER, mode=0o444, encoder=False, mtime=_TAR_MTIME)
        for sample in samples:
            writer.write(sample)
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


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
        for field in fields:
            value = obj
            for part in field.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ValueError(f"{path}: missing field '{where}{field}'")
                value = value[part]

    require(manifest, _TOP_FIELDS, "")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest['format_version']!r} is not {FORMAT_VERSION}; re-run prepare"
        )
    for split, entry in manifest["splits"].items():
        require(entry, _SPLIT_FIELDS, f"splits.{split}.")
        for k, shard in enumerate(entry["shards"]):
            require(shard, _SHARD_FIELDS, f"splits.{split}.shards[{k}].")
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
