"""The scenario protocol of METHOD.md §2: base / phase / test split and the concept drift of the phases.

A scenario is a dict of index arrays into the source arrays, keyed "base", "phase-01" .. "phase-NN"
and "test". The base and test sets and the content of the incremental sets depend only on
`split_seed`; `order_seed` only permutes which incremental set becomes phase-01, phase-02, ...
"""

import hashlib
import re

import numpy as np
from PIL import Image

BASE = "base"
TEST = "test"
DRIFTS = ("none", "rotation")
_PHASE_RE = re.compile(r"phase-\d{2,}")


def phase_name(phase: int) -> str:
    """Split name of incremental phase `phase` (1-based): "phase-01"."""
    return f"phase-{phase:02d}"


def split_names(num_phases: int) -> list[str]:
    """All split names of a scenario in the order they are written and trained."""
    return [BASE, *(phase_name(t) for t in range(1, num_phases + 1)), TEST]


def build_scenario(
    labels: np.ndarray,
    *,
    num_phases: int,
    base_fraction: float,
    test_fraction: float,
    split_seed: int,
    order_seed: int,
    num_train: int | None = None,
) -> dict[str, np.ndarray]:
    """Split sample indices into base, phase-01..phase-NN and test (sorted int64 arrays, disjoint, covering).

    Args:
        labels: integer class labels (N,) of every sample of the source.
        num_phases: number of incremental sets T the non-base half of the training set is cut into.
        base_fraction: class-stratified share of the training set (non-test samples) that forms D(0).
        test_fraction: class-stratified share of all samples held out as the test set, for a source
            without an official test split.
        split_seed: seeds the test, base and incremental-set contents.
        order_seed: seeds only the order of the incremental sets.
        num_train: samples 0..num_train-1 are the training set and the rest the official test set
            (METHOD.md §2); None carves the test set out with `test_fraction`.
    """
    labels = np.asarray(labels)
    _check_scenario_args(labels, num_phases, base_fraction, test_fraction, split_seed, order_seed)

    # one generator drawn in a fixed order (test, base, sets), so split_seed alone fixes every set's content
    split_rng = np.random.default_rng(split_seed)
    all_indices = np.arange(len(labels), dtype=np.int64)
    if num_train is None or num_train >= len(labels):
        test, train = _stratified_take(all_indices, labels, test_fraction, split_rng)
    else:
        train, test = all_indices[:num_train], all_indices[num_train:]
    base, incremental = _stratified_take(train, labels, base_fraction, split_rng)
    if len(test) == 0:
        raise ValueError(f"data.test_fraction={test_fraction} leaves the test split empty")
    if len(base) == 0:
        raise ValueError(f"data.base_fraction={base_fraction} leaves the base split empty")
    if len(incremental) < num_phases:
        raise ValueError(
            f"data.num_phases={num_phases} leaves a phase empty: only {len(incremental)} incremental samples"
        )
    sets = _stratified_deal(incremental, labels, num_phases, split_rng)

    order = np.random.default_rng(order_seed).permutation(num_phases)
    scenario = {BASE: base}
    for t, set_id in enumerate(order, start=1):
        scenario[phase_name(t)] = sets[set_id]
    scenario[TEST] = test
    return scenario


def _check_scenario_args(
    labels: np.ndarray,
    num_phases: int,
    base_fraction: float,
    test_fraction: float,
    split_seed: int,
    order_seed: int,
) -> None:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d integer array, got shape {labels.shape} dtype {labels.dtype}")
    if not isinstance(num_phases, int) or isinstance(num_phases, bool) or num_phases < 1:
        raise ValueError(f"data.num_phases must be >= 1, got {num_phases!r}")
    for name, value in (("base_fraction", base_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"data.{name} must be in (0, 1), got {value!r}")
    for name, value in (("split_seed", split_seed), ("order_seed", order_seed)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
            raise ValueError(f"data.{name} must be an integer >= 0, got {value!r}")


def _stratified_take(
    indices: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Take round(fraction * len(indices)) samples, each class within one sample of its proportional share."""
    classes, counts = np.unique(labels[indices], return_counts=True)
    quotas = fraction * counts
    take = np.floor(quotas).astype(np.int64)
    # largest-remainder apportionment: the total matches the requested fraction exactly, per-class
    # rounding alone could be off by up to half the number of classes
    missing = int(np.floor(fraction * len(indices) + 0.5)) - int(take.sum())
    by_remainder = np.argsort(-(quotas - take), kind="stable")
    take[by_remainder[:missing]] += 1

    taken, rest = [], []
    for cls, k in zip(classes, take, strict=True):
        members = rng.permutation(indices[labels[indices] == cls])
        taken.append(members[:k])
        rest.append(members[k:])
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


def _stratified_deal(
    indices: np.ndarray, labels: np.ndarray, num_sets: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Cut `indices` into `num_sets` sets whose sizes, overall and per class, differ by at most one."""
    per_class = [rng.permutation(indices[labels[indices] == cls]) for cls in np.unique(labels[indices])]
    # dealing the class-grouped stream like cards keeps every class spread evenly over the sets
    stream = np.concatenate(per_class)
    return [np.sort(stream[k::num_sets]) for k in range(num_sets)]


def derived_seed(seed: int, split: str) -> int:
    """A per-split seed from `seed` and the split name, stable across processes and Python versions."""
    # Python's hash() of a str is salted per process, so it cannot make shards reproducible
    digest = hashlib.sha256(f"{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """Resize every image (N, H, W[, C]) uint8 to image_size x image_size with PIL bilinear."""
    size = (image_size, image_size)
    return np.stack([np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR)) for img in images])


def _rotate(image: np.ndarray, angle_deg: float) -> np.ndarray:
    """`image` rotated like the shard writer rotates (see `rotate`)."""
    return np.asarray(rotate(Image.fromarray(image), angle_deg))


def rotate(image: Image.Image, angle_deg: float) -> Image.Image:
    # counter-clockwise for positive angles; corners that come from outside the image are black
    return image.rotate(angle_deg, resample=Image.Resampling.BILINEAR, fillcolor=0)


def _split_kind(split: str) -> str:
    if split in (BASE, TEST):
        return split
    if _PHASE_RE.fullmatch(split):
        return "phase"
    raise ValueError(f"split must be 'base', 'test' or 'phase-NN', got {split!r}")


def apply_drift(
    images: np.ndarray,
    split: str,
    *,
    drift: str,
    seed: int,
    rotation_min_deg: float,
    rotation_max_deg: float,
    image_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Resize the images of one split and apply the concept drift of METHOD.md §2.

    With drift "rotation" the base split stays upright, every phase image is rotated by an angle drawn
    uniformly from [rotation_min_deg, rotation_max_deg] with a random sign, and the test split is doubled:
    the output is concat(upright, rotated), so output i comes from input `drift_source_positions(...)[i]`
    (i mod N for the test split). The angles depend only on `seed` and the split name.

    Returns:
        The images (M, image_size, image_size[, C]) uint8 and the rotation angle of each, degrees (M,).
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"data.image_size must be a positive integer, got {image_size!r}")
    positions = drift_source_positions(len(images), split, drift=drift)
    angles = drift_angles(
        len(images), split, drift=drift, seed=seed, rotation_min_deg=rotation_min_deg, rotation_max_deg=rotation_max_deg
    )
    upright = resize_images(images, image_size)
    out = np.stack([_rotate(upright[p], a) if a else upright[p] for p, a in zip(positions, angles, strict=True)])
    return out, angles


def drift_angles(
    num_images: int, split: str, *, drift: str, seed: int, rotation_min_deg: float, rotation_max_deg: float
) -> np.ndarray:
    """Rotation angle in degrees of each output image of a split of `num_images` source images (0 = upright).

    Base images stay upright; every phase image gets an angle drawn uniformly from
    [rotation_min_deg, rotation_max_deg] with a random sign; the test split is doubled, upright then
    rotated. The angles depend only on `seed` and the split name.
    """
    if drift not in DRIFTS:
        raise ValueError(f"data.drift must be one of {list(DRIFTS)}, got {drift!r}")
    if not 0.0 <= rotation_min_deg <= rotation_max_deg <= 180.0:
        raise ValueError(
            "data.rotation_min_deg and data.rotation_max_deg must satisfy 0 <= min <= max <= 180, "
            f"got {rotation_min_deg!r} and {rotation_max_deg!r}"
        )
    kind = _split_kind(split)
    no_rotation = np.zeros(num_images, dtype=np.float64)
    if drift == "none" or kind == BASE:
        return no_rotation
    rng = np.random.default_rng(derived_seed(seed, split))
    magnitudes = rng.uniform(rotation_min_deg, rotation_max_deg, size=num_images)
    signs = np.where(rng.random(num_images) < 0.5, -1.0, 1.0)
    angles = signs * magnitudes
    return angles if kind == "phase" else np.concatenate([no_rotation, angles])


def drift_source_positions(num_images: int, split: str, *, drift: str) -> np.ndarray:
    """Input position of each output image of `apply_drift`: labels[positions] labels the output."""
    if drift not in DRIFTS:
        raise ValueError(f"data.drift must be one of {list(DRIFTS)}, got {drift!r}")
    positions = np.arange(num_images, dtype=np.int64)
    if drift == "rotation" and _split_kind(split) == TEST:
        return np.concatenate([positions, positions])
    return positions
