"""The scenario protocol of METHOD.md §2: base / phase / test split and the concept drift of the phases.

A scenario is a dict of index arrays into the source arrays, keyed "base", "phase-01" .. "phase-NN"
and "test". The base and test sets and the content of the incremental sets depend only on
`split_seed`; `order_seed` only permutes which incremental set becomes phase-01, phase-02, ...
"""

import dataclasses
import hashlib
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

BASE = "base"
TEST = "test"
DRIFTS = ("none", "rotation", "corruption", "subpopulation")
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
    hidden: np.ndarray | None = None,
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
        hidden: optional boolean mask (N,) of samples that may not enter D(0) (the hidden sub-populations
            of the subpopulation drift); D(0) keeps its class-stratified size, drawn from the others.
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
    base, incremental = _stratified_take(train, labels, base_fraction, split_rng, hidden)
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
    indices: np.ndarray,
    labels: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    hidden: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Take round(fraction * len(indices)) samples, each class within one sample of its proportional share,
    none of them `hidden`."""
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
        if hidden is not None:
            # a stable partition keeps the permutation's order inside the allowed and the hidden members
            allowed = ~hidden[members]
            if allowed.sum() < k:
                raise ValueError(
                    f"class {int(cls)} has {int(allowed.sum())} samples outside its hidden sub-groups, fewer than "
                    f"the {int(k)} data.base_fraction asks for; lower data.hidden_subgroups or data.base_fraction"
                )
            members = np.concatenate([members[allowed], members[~allowed]])
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


def subgroup_ids(thumbnails: np.ndarray, labels: np.ndarray, *, num_groups: int, seed: int) -> np.ndarray:
    """Sub-group of each sample within its class: k-means (k = `num_groups`) on its thumbnail's pixels.

    Deterministic for the same inputs and seed. Groups are numbered per class by size, largest first,
    so group `num_groups - 1` is the smallest of its class.
    """
    features = thumbnails.reshape(len(thumbnails), -1).astype(np.float64) / 255.0
    groups = np.zeros(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rng = np.random.default_rng(derived_seed(seed, f"subgroups-{int(cls)}"))
        assignment = _kmeans(features[members], min(num_groups, len(members)), rng)
        sizes = np.bincount(assignment, minlength=num_groups)
        rank = np.empty(num_groups, dtype=np.int64)
        rank[np.argsort(-sizes, kind="stable")] = np.arange(num_groups)
        groups[members] = rank[assignment]
    return groups


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 30) -> np.ndarray:
    """Cluster index of each row of x: k-means++ seeding, then Lloyd iterations."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        dist = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        total = dist.sum()
        centres.append(x[rng.choice(len(x), p=dist / total)] if total > 0 else x[rng.integers(len(x))])
    centres = np.stack(centres)
    assignment = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        assignment = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        for j in range(k):
            if (assignment == j).any():
                centres[j] = x[assignment == j].mean(0)
    return assignment


def thumbnail(image: Image.Image, side: int = 8) -> np.ndarray:
    """A side x side grayscale thumbnail (uint8), the feature the sub-populations are clustered on."""
    return np.asarray(image.convert("L").resize((side, side), Image.Resampling.BILINEAR))


@dataclass(frozen=True)
class Drift:
    """A controlled shift of the incremental phases (METHOD.md §2), chosen by `data.drift`.

    - rotation: every phase image is rotated by an angle in [rotation_min_deg, rotation_max_deg], either way;
    - corruption: every phase image is blurred (Gaussian, sigma a fraction in [blur_min, blur_max] of the
      image side) and loses contrast (factor in [contrast_min, contrast_max]; 1 keeps it);
    - subpopulation: each class is cut into `subgroups` sub-groups (k-means on 8x8 thumbnails); its
      `hidden_subgroups` smallest never enter D(0), so they appear only in phases >= 1. Images are unchanged.

    The base set is never transformed. Under rotation and corruption the test set holds every test image
    twice, clean then transformed; under subpopulation it is the plain test set (all sub-groups).
    """

    kind: str = "none"
    rotation_min_deg: float = 20.0
    rotation_max_deg: float = 60.0
    blur_min: float = 0.06
    blur_max: float = 0.12
    contrast_min: float = 0.3
    contrast_max: float = 0.6
    subgroups: int = 3
    hidden_subgroups: int = 1

    def __post_init__(self) -> None:
        if self.kind not in DRIFTS:
            raise ValueError(f"data.drift must be one of {list(DRIFTS)}, got {self.kind!r}")
        ranges = (("rotation_min_deg", "rotation_max_deg", 0.0, 180.0), ("blur_min", "blur_max", 0.0, 1.0),
                  ("contrast_min", "contrast_max", 0.0, 1.0))  # fmt: skip
        for low, high, floor, ceiling in ranges:
            lo, hi = getattr(self, low), getattr(self, high)
            if not floor <= lo <= hi <= ceiling:
                raise ValueError(
                    f"data.{low} and data.{high} must satisfy {floor:g} <= min <= max <= {ceiling:g}, "
                    f"got {lo!r} and {hi!r}"
                )
        if not 1 <= self.hidden_subgroups < self.subgroups:
            raise ValueError(
                f"data.hidden_subgroups must be in 1..data.subgroups-1 ({self.subgroups - 1}), "
                f"got {self.hidden_subgroups!r}"
            )

    @property
    def transforms_images(self) -> bool:
        return self.kind in ("rotation", "corruption")


# the parameters of a drift, besides its kind: the data.* config fields of the same names
DRIFT_FIELDS = tuple(f.name for f in dataclasses.fields(Drift) if f.name != "kind")

# one row of per-image drift parameters: rotation angle (degrees), blur sigma (fraction of the side),
# contrast factor; this row leaves an image unchanged
IDENTITY = (0.0, 0.0, 1.0)


def drift_params(num_images: int, split: str, drift: Drift, seed: int) -> np.ndarray:
    """Parameters (M, 3) of the transform of each output image of a split of `num_images` source images.

    Rows are (angle in degrees, blur sigma as a fraction of the side, contrast factor); see `Drift`. They
    depend only on `seed` and the split name.
    """
    kind = _split_kind(split)
    clean = np.tile(np.asarray(IDENTITY), (num_images, 1))
    if not drift.transforms_images or kind == BASE:
        return clean
    rng = np.random.default_rng(derived_seed(seed, split))
    drifted = clean.copy()
    if drift.kind == "rotation":
        magnitudes = rng.uniform(drift.rotation_min_deg, drift.rotation_max_deg, size=num_images)
        signs = np.where(rng.random(num_images) < 0.5, -1.0, 1.0)
        drifted[:, 0] = signs * magnitudes
    else:
        drifted[:, 1] = rng.uniform(drift.blur_min, drift.blur_max, size=num_images)
        drifted[:, 2] = rng.uniform(drift.contrast_min, drift.contrast_max, size=num_images)
    return drifted if kind == "phase" else np.concatenate([clean, drifted])


def drift_source_positions(num_images: int, split: str, drift: Drift) -> np.ndarray:
    """Input position of each output image of a split: labels[positions] labels the output."""
    positions = np.arange(num_images, dtype=np.int64)
    if drift.transforms_images and _split_kind(split) == TEST:
        return np.concatenate([positions, positions])
    return positions


def distort(image: Image.Image, params: np.ndarray | tuple[float, float, float]) -> Image.Image:
    """`image` with one row of `drift_params` applied: rotation, then blur, then contrast."""
    angle, blur, contrast = (float(v) for v in params)
    if angle:
        # counter-clockwise for positive angles; corners that come from outside the image are black
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(radius=blur * max(image.size)))
    if contrast != 1.0:
        image = ImageEnhance.Contrast(image).enhance(contrast)
    return image


def _split_kind(split: str) -> str:
    if split in (BASE, TEST):
        return split
    if _PHASE_RE.fullmatch(split):
        return "phase"
    raise ValueError(f"split must be 'base', 'test' or 'phase-NN', got {split!r}")


def apply_drift(
    images: np.ndarray, split: str, *, drift: Drift, seed: int, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resize the images (N, H, W[, C]) uint8 of one split and apply `drift` as the shard writer does.

    Returns the images (M, image_size, image_size[, C]) and their `drift_params` rows (M, 3); output i
    comes from input `drift_source_positions(...)[i]`.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"data.image_size must be a positive integer, got {image_size!r}")
    positions = drift_source_positions(len(images), split, drift)
    params = drift_params(len(images), split, drift, seed)
    upright = resize_images(images, image_size)
    out = [np.asarray(distort(Image.fromarray(upright[p]), row)) for p, row in zip(positions, params, strict=True)]
    return np.stack(out), params
