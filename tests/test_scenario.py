"""Scenario split, drift and shard writing on the real digits data, with real shards in tmp_path."""

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import wids

from iil_dist.data.scenario import Drift, apply_drift, build_scenario, resize_images, split_names, subgroup_ids
from iil_dist.data.shards import read_manifest, verify_shards, write_scenario
from iil_dist.data.sources import load_digits, load_source

NUM_PHASES = 3
SPLIT_ARGS = {
    "num_phases": NUM_PHASES,
    "base_fraction": 0.5,
    "test_fraction": 0.25,
    "split_seed": 0,
    "order_seed": 0,
}
WRITE_ARGS = {
    "source": "digits",
    **SPLIT_ARGS,
    "drift": "rotation",
    "rotation_min_deg": 20.0,
    "rotation_max_deg": 60.0,
    "image_size": 16,
    "samples_per_shard": 100,
}
DRIFT_ARGS = {"drift": Drift("rotation", rotation_min_deg=20.0, rotation_max_deg=60.0), "seed": 0, "image_size": 16}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_digits()


@pytest.fixture(scope="module")
def scenario_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenario") / "a"
    write_scenario(out, **WRITE_ARGS)
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tar_samples(path: Path) -> list[tuple[str, int]]:
    """(key, label) of every sample in a shard, from its .cls members."""
    with tarfile.open(path) as tar:
        return [
            (m.name.split(".")[0], int(tar.extractfile(m).read())) for m in tar.getmembers() if m.name.endswith(".cls")
        ]


def test_digits_source_range(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Guards against the 0..16 digits pixels reaching the shards unscaled or as the wrong dtype."""
    images, labels = digits
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8) and images.max() == 255
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="data.source.*digits.*'nope'"):
        load_source("nope")
    with pytest.raises(ValueError, match="data.source_path is required for data.source=cifar100"):
        load_source("cifar100")


def test_splits_disjoint_and_covering(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Guards against a sample in two splits (test leakage) or a sample dropped by the split."""
    _, labels = digits
    scenario = build_scenario(labels, **SPLIT_ARGS)
    assert list(scenario) == split_names(NUM_PHASES)
    merged = np.concatenate(list(scenario.values()))
    assert len(merged) == len(labels) and set(merged.tolist()) == set(range(len(labels)))


def test_base_and_test_stratified(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Guards against base or test sets that miss their fraction or over-represent a class."""
    _, labels = digits
    scenario = build_scenario(labels, **SPLIT_ARGS)
    all_counts = np.bincount(labels, minlength=10)
    test_counts = np.bincount(labels[scenario["test"]], minlength=10)
    assert np.all(np.abs(test_counts - 0.25 * all_counts) <= 1)
    assert len(scenario["test"]) == round(0.25 * len(labels))

    train_counts = all_counts - test_counts
    base_counts = np.bincount(labels[scenario["base"]], minlength=10)
    assert np.all(np.abs(base_counts - 0.5 * train_counts) <= 1)
    assert abs(len(scenario["base"]) - 0.5 * train_counts.sum()) <= 0.5


def test_phases_equal_and_stratified(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Guards against phases of unequal size or with a class missing from some phases."""
    _, labels = digits
    scenario = build_scenario(labels, **SPLIT_ARGS)
    phases = [scenario[name] for name in split_names(NUM_PHASES)[1:-1]]
    incremental_counts = sum(np.bincount(labels[p], minlength=10) for p in phases)
    sizes = [len(p) for p in phases]
    assert max(sizes) - min(sizes) <= 10
    for phase in phases:
        assert np.all(np.abs(np.bincount(labels[phase], minlength=10) - incremental_counts / NUM_PHASES) <= 1)


def test_order_seed_permutes_phases_only(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Guards against order_seed changing the base or test set, or changing phase contents."""
    _, labels = digits
    reference = build_scenario(labels, **SPLIT_ARGS)
    phase_names = split_names(NUM_PHASES)[1:-1]
    reference_sets = sorted(tuple(reference[n]) for n in phase_names)
    orders_seen = set()
    for order_seed in range(1, 6):
        other = build_scenario(labels, **{**SPLIT_ARGS, "order_seed": order_seed})
        assert np.array_equal(other["base"], reference["base"])
        assert np.array_equal(other["test"], reference["test"])
        assert sorted(tuple(other[n]) for n in phase_names) == reference_sets
        orders_seen.add(tuple(reference_sets.index(tuple(other[n])) for n in phase_names))
    assert len(orders_seen) > 1


def test_split_seed_changes_split(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Guards against split_seed being ignored (every seed giving the same base set)."""
    _, labels = digits
    a = build_scenario(labels, **SPLIT_ARGS)
    b = build_scenario(labels, **{**SPLIT_ARGS, "split_seed": 1})
    assert not np.array_equal(a["base"], b["base"])
    assert not np.array_equal(a["test"], b["test"])


@pytest.mark.parametrize(
    ("override", "argument"),
    [
        ({"num_phases": 0}, "num_phases must be >= 1, got 0"),
        ({"num_phases": 10_000}, "num_phases"),
        ({"base_fraction": 0.0}, "base_fraction"),
        ({"base_fraction": 1.0}, "base_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"split_seed": -1}, "split_seed"),
        ({"order_seed": 0.5}, "order_seed"),
    ],
)
def test_bad_scenario_arguments(digits: tuple[np.ndarray, np.ndarray], override: dict, argument: str) -> None:
    """Guards against invalid arguments producing a silently broken split instead of a named error."""
    _, labels = digits
    with pytest.raises(ValueError, match=argument):
        build_scenario(labels, **{**SPLIT_ARGS, **override})


def test_bad_drift_arguments(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Guards against an unknown drift or bad angle range being accepted silently."""
    images = digits[0][:4]
    with pytest.raises(ValueError, match="data.drift.*rotation.*'shear'"):
        Drift("shear")
    with pytest.raises(ValueError, match="rotation_min_deg"):
        Drift("rotation", rotation_min_deg=70.0)
    with pytest.raises(ValueError, match="data.blur_min and data.blur_max"):
        Drift("corruption", blur_min=0.2, blur_max=0.1)
    with pytest.raises(ValueError, match="data.contrast_min and data.contrast_max.*1.5"):
        Drift("corruption", contrast_max=1.5)
    with pytest.raises(ValueError, match=r"data.hidden_subgroups must be in 1..data.subgroups-1 \(2\), got 3"):
        Drift("subpopulation", subgroups=3, hidden_subgroups=3)
    with pytest.raises(ValueError, match="split"):
        apply_drift(images, "train", **DRIFT_ARGS)


def test_rotation_drift(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Guards against a rotated base set, upright phases, or a test set not doubled as documented."""
    images = digits[0][:50]
    upright = resize_images(images, 16)
    assert upright.shape == (50, 16, 16)

    base, base_params = apply_drift(images, "base", **DRIFT_ARGS)
    assert np.array_equal(base, upright) and not base_params[:, 0].any()

    phase, params = apply_drift(images, "phase-02", **DRIFT_ARGS)
    angles = params[:, 0]
    assert not params[:, 1].any() and np.all(params[:, 2] == 1.0)  # rotation only: no blur, full contrast
    assert phase.shape == upright.shape
    assert all(not np.array_equal(p, u) for p, u in zip(phase, upright, strict=True))
    assert np.all((np.abs(angles) >= 20.0) & (np.abs(angles) <= 60.0))
    assert (angles < 0).any() and (angles > 0).any()

    test, test_params = apply_drift(images, "test", **DRIFT_ARGS)
    test_angles = test_params[:, 0]
    assert test.shape == (100, 16, 16)
    assert np.array_equal(test[:50], upright) and not test_angles[:50].any()
    assert np.all(np.abs(test_angles[50:]) >= 20.0)

    again, again_params = apply_drift(images, "phase-02", **DRIFT_ARGS)
    assert np.array_equal(again, phase) and np.array_equal(again_params, params)
    _, other_params = apply_drift(images, "phase-03", **DRIFT_ARGS)
    assert not np.array_equal(other_params, params)

    plain, plain_params = apply_drift(images, "test", **{**DRIFT_ARGS, "drift": Drift("none")})
    assert np.array_equal(plain, upright) and np.array_equal(plain_params, np.tile([0.0, 0.0, 1.0], (50, 1)))


def test_corruption_drift(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Guards against corrupted base images, phases that are not blurred and low in contrast, or a test set
    not doubled clean + corrupted."""
    images = digits[0][:50]
    upright = resize_images(images, 16).astype(np.float64)
    corruption = Drift("corruption", blur_min=0.06, blur_max=0.12, contrast_min=0.3, contrast_max=0.6)
    args = {**DRIFT_ARGS, "drift": corruption}
    base, base_params = apply_drift(images, "base", **args)
    assert np.array_equal(base, upright) and np.all(base_params == [0.0, 0.0, 1.0])

    phase, params = apply_drift(images, "phase-01", **args)
    assert not params[:, 0].any()  # no rotation
    assert np.all((params[:, 1] >= 0.06) & (params[:, 1] <= 0.12))
    assert np.all((params[:, 2] >= 0.3) & (params[:, 2] <= 0.6))
    # contrast at most 0.6 of the original: the spread of the pixel values shrinks at least that much
    assert np.all(phase.reshape(50, -1).std(1) < 0.65 * upright.reshape(50, -1).std(1))

    # blur: the share of high frequencies (Laplacian energy per unit of variance, which a contrast change
    # leaves alone) drops
    def sharpness(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
        return (lap**2).mean((1, 2)) / x.var((1, 2))

    assert np.all(sharpness(phase) < 0.8 * sharpness(upright))

    test, test_params = apply_drift(images, "test", **args)
    assert test.shape == (100, 16, 16) and np.array_equal(test[:50], upright)
    assert np.all(test_params[50:, 2] <= 0.6)


def test_subpopulation_groups(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Guards against sub-groups that mix classes, change between calls, or are not numbered by size."""
    images, labels = digits
    thumbs = resize_images(images, 8)
    groups = subgroup_ids(thumbs, labels, num_groups=3, seed=0)
    assert np.array_equal(groups, subgroup_ids(thumbs, labels, num_groups=3, seed=0))
    for cls in range(10):
        sizes = np.bincount(groups[labels == cls], minlength=3)
        assert sizes.min() > 0 and list(sizes) == sorted(sizes, reverse=True)
    # the clusters are real structure: a group's members are closer to their own centre than to the others'
    x = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    members = labels == 7
    centres = np.stack([x[members & (groups == g)].mean(0) for g in range(3)])
    nearest = ((x[members][:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == groups[members]).mean() > 0.9


def test_subpopulation_scenario(tmp_path: Path) -> None:
    """Guards against a hidden sub-group leaking into D(0), or hidden samples missing from the phases and the
    test set, under the subpopulation drift (images stay unchanged, the test set is not doubled)."""
    manifest = write_scenario(tmp_path / "s", **{**WRITE_ARGS, "drift": "subpopulation", "subgroups": 3,
                                                   "hidden_subgroups": 1})  # fmt: skip
    splits = manifest["splits"]
    assert splits["base"]["num_hidden"] == 0
    in_phases = [splits[f"phase-{t:02d}"]["num_hidden"] for t in range(1, NUM_PHASES + 1)]
    assert all(n > 0 for n in in_phases)
    assert splits["test"]["num_hidden"] > 0 and splits["test"]["num_samples"] == splits["test"]["num_source_samples"]
    # D(0) keeps its size: the hidden samples are replaced by other samples of their class
    plain = write_scenario(tmp_path / "p", **{**WRITE_ARGS, "drift": "none"})
    assert splits["base"]["class_counts"] == plain["splits"]["base"]["class_counts"]
    with pytest.raises(ValueError, match="data.hidden_subgroups or data.base_fraction"):
        write_scenario(tmp_path / "x", **{**WRITE_ARGS, "drift": "subpopulation", "subgroups": 3,
                                           "hidden_subgroups": 2, "base_fraction": 0.9})  # fmt: skip


def test_same_arguments_byte_identical(scenario_dir: Path, tmp_path: Path) -> None:
    """Guards against non-reproducible shards (tar timestamps, PNG metadata, unseeded randomness)."""
    write_scenario(tmp_path / "b", **WRITE_ARGS)
    a, b = _tree_bytes(scenario_dir), _tree_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[name] == b[name] for name in a)
    assert hashlib.sha256(a["manifest.json"]).digest() == hashlib.sha256(b["manifest.json"]).digest()

    write_scenario(tmp_path / "c", **{**WRITE_ARGS, "split_seed": 1})
    c = _tree_bytes(tmp_path / "c")
    assert c["manifest.json"] != a["manifest.json"]
    assert c["base/base-000000.tar"] != a["base/base-000000.tar"]


def test_manifest_matches_shards(scenario_dir: Path) -> None:
    """Guards against a manifest whose sample or class counts disagree with what the shards hold."""
    manifest = read_manifest(scenario_dir)
    assert manifest["num_classes"] == 10 and manifest["channels"] == 1 and manifest["image_size"] == 16
    assert manifest["split_seed"] == 0 and manifest["drift"] == "rotation"
    assert list(manifest["splits"]) == split_names(NUM_PHASES)
    for split, entry in manifest["splits"].items():
        samples = []
        for shard in entry["shards"]:
            shard_samples = _tar_samples(scenario_dir / shard["file"])
            assert len(shard_samples) == shard["num_samples"] <= 100
            samples += shard_samples
        keys = [key for key, _ in samples]
        assert len(set(keys)) == len(keys) == entry["num_samples"]
        assert all(key.startswith(f"{split}-") and "/" not in key for key in keys)
        counts = np.bincount([label for _, label in samples], minlength=10)
        assert entry["class_counts"] == {str(c): int(n) for c, n in enumerate(counts)}

    # the doubled test split: second half repeats the first half's labels in the same order (of positions)
    test = manifest["splits"]["test"]
    stored = sorted(sample for shard in test["shards"] for sample in _tar_samples(scenario_dir / shard["file"]))
    labels = [label for _, label in stored]
    half = test["num_source_samples"]
    assert test["num_samples"] == 2 * half and labels[:half] == labels[half:]


def test_tar_members_have_fixed_metadata(scenario_dir: Path) -> None:
    """Guards against tar members stamped with the writing time or user, which breaks reproducibility."""
    with tarfile.open(scenario_dir / "phase-01" / "phase-01-000000.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (946684800, 0, 0, "iil", "iil", 0o444)
    }
    assert [m.name.split(".")[1] for m in members[:2]] == ["cls", "png"]


def test_wids_descriptor_loads(scenario_dir: Path) -> None:
    """Guards against a wids descriptor that wids cannot resolve or whose counts are wrong."""
    manifest = read_manifest(scenario_dir)
    descriptor = json.loads((scenario_dir / "base" / "index.json").read_text())
    assert descriptor["wids_version"] == 1
    # identity local names: read the shards in place instead of copying them into a cache directory
    index = str(scenario_dir / "base" / "index.json")
    dataset = wids.ShardListDataset(index, localname=lambda url: url, transformations=[])
    assert len(dataset) == manifest["splits"]["base"]["num_samples"]
    # every position once (the shards store them in a shuffled order)
    assert sorted(dataset[i]["__key__"] for i in range(len(dataset))) == [f"base-{i:06d}" for i in range(len(dataset))]
    dataset.close()


def test_read_manifest_names_missing_field(scenario_dir: Path, tmp_path: Path) -> None:
    """Guards against a truncated or hand-edited manifest failing later with an unrelated KeyError."""
    manifest = json.loads((scenario_dir / "manifest.json").read_text())
    del manifest["normalization"]["std"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json.*normalization\.std"):
        read_manifest(tmp_path)

    manifest = json.loads((scenario_dir / "manifest.json").read_text())
    del manifest["splits"]["phase-02"]["shards"][0]["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"splits\.phase-02\.shards\[0\]\.sha256"):
        read_manifest(tmp_path)

    with pytest.raises(ValueError, match="no manifest"):
        read_manifest(tmp_path / "missing")


def test_empty_or_missing_phase_is_named(scenario_dir: Path, tmp_path: Path) -> None:
    """Guards against a phase without samples (a hand-edited manifest or another tool's) being trained on as
    if it were a phase, or failing later inside the reader with a message about shard counts."""
    manifest = json.loads((scenario_dir / "manifest.json").read_text())
    manifest["splits"]["phase-02"].update(num_samples=0, shards=[])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: split 'phase-02' is empty \(0 samples in 0 shards\)"):
        read_manifest(tmp_path)
    del manifest["splits"]["phase-02"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"num_phases is 3 but split 'phase-02' is missing"):
        read_manifest(tmp_path)


def test_manifest_from_before_the_corruption_and_subpopulation_fields(scenario_dir: Path, tmp_path: Path) -> None:
    """Guards against rotation scenarios prepared before the newer drift fields existed becoming unreadable or
    being rewritten: their shards do not depend on those fields."""
    from iil_dist.config import from_dict
    from iil_dist.data.shards import prepare_scenario

    copy = tmp_path / "old"
    shutil.copytree(scenario_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in ("blur_min", "blur_max", "contrast_min", "contrast_max", "subgroups", "hidden_subgroups"):
        del manifest[name]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(copy)["blur_max"] == 0.12 and read_manifest(copy)["hidden_subgroups"] == 1
    data = from_dict({"data": {k: v for k, v in WRITE_ARGS.items() if k != "source"} | {"root": str(copy)}}).data
    before = (copy / "manifest.json").stat().st_mtime_ns
    assert prepare_scenario(data, progress=False) == copy
    assert (copy / "manifest.json").stat().st_mtime_ns == before  # reused, not rewritten


def test_verify_shards_detects_change(scenario_dir: Path, tmp_path: Path) -> None:
    """Guards against a changed shard going unnoticed by the checksum check."""
    copy = tmp_path / "copy"
    shutil.copytree(scenario_dir, copy)
    manifest = read_manifest(copy)
    verify_shards(copy, manifest)

    shard = copy / "base" / "base-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="base-000001.tar"):
        verify_shards(copy, manifest)


def test_failed_rewrite_leaves_no_manifest(scenario_dir: Path, tmp_path: Path) -> None:
    """Guards against a half-rewritten scenario keeping its old manifest and passing as complete."""
    copy = tmp_path / "copy"
    shutil.copytree(scenario_dir, copy)
    with pytest.raises(ValueError, match="data.drift"):
        write_scenario(copy, **{**WRITE_ARGS, "drift": "shear"})
    assert not (copy / "manifest.json").exists()
