"""Indexed reader: balanced training shares, exact evaluation coverage and decoding, on real shards."""

import pickle
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from iil_dist.data.augment import normalize
from iil_dist.data.reader import (
    SampleDecodeError,
    SplitDataset,
    StreamingSplit,
    eval_batches,
    eval_indices,
    num_eval_batches,
    num_train_batches,
    train_batches,
    train_indices,
)
from iil_dist.data.shards import read_manifest, write_scenario

WRITE_ARGS = {
    "source": "digits",
    "num_phases": 3,
    "base_fraction": 0.5,
    "test_fraction": 0.2,
    "split_seed": 0,
    "order_seed": 0,
    "drift": "rotation",
    "rotation_min_deg": 20.0,
    "rotation_max_deg": 60.0,
    "image_size": 16,
    "samples_per_shard": 100,
}


@pytest.fixture(scope="module")
def scenario_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reader") / "scenario"
    write_scenario(out, **WRITE_ARGS)
    return out


@pytest.fixture(scope="module")
def odd_split(scenario_dir: Path) -> str:
    """A split whose size is divisible by neither 2 nor 3, so padding and left-overs are exercised."""
    manifest = read_manifest(scenario_dir)
    for name, entry in manifest["splits"].items():
        if entry["num_samples"] % 2 and entry["num_samples"] % 3:
            return name
    pytest.fail(f"no split of odd size: {[e['num_samples'] for e in manifest['splits'].values()]}")


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_samples", [97, 101, 5])
def test_train_shares_balanced_and_disjoint(num_samples: int, world_size: int) -> None:
    """Guards against ranks running different step counts (collective hang) or training on the same sample."""
    batch_size = 8
    shares = [
        train_indices(num_samples, epoch=3, seed=7, rank=r, world_size=world_size, batch_size=batch_size)
        for r in range(world_size)
    ]
    expected = num_train_batches(num_samples, world_size, batch_size)
    assert all(len(batches) == expected for batches in shares)
    for batches in shares:
        sizes = [len(b) for b in batches]
        assert max(sizes) <= batch_size and max(sizes) - min(sizes) <= 1 and min(sizes) > 0
    assert len({tuple(len(b) for b in batches) for batches in shares}) == 1  # same sizes on every rank
    flat = np.concatenate([np.concatenate(batches) for batches in shares])
    assert len(set(flat.tolist())) == len(flat) == (num_samples // world_size) * world_size
    assert flat.min() >= 0 and flat.max() < num_samples


def test_train_order_depends_on_epoch() -> None:
    """Guards against the same order (and the same dropped left-overs) every epoch, or ranks disagreeing."""

    def share(epoch: int, rank: int) -> np.ndarray:
        return np.concatenate(train_indices(101, epoch=epoch, seed=0, rank=rank, world_size=3, batch_size=10))

    assert np.array_equal(share(0, 1), share(0, 1))
    assert not np.array_equal(share(0, 1), share(1, 1))
    dropped = [set(range(101)) - set(np.concatenate([share(e, r) for r in range(3)]).tolist()) for e in range(4)]
    assert all(len(d) == 101 % 3 for d in dropped) and len({frozenset(d) for d in dropped}) > 1


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_samples", [97, 101, 2])
def test_eval_covers_each_sample_once(num_samples: int, world_size: int) -> None:
    """Guards against evaluation counting a sample twice or never (wrong PP / F), or unequal rank batches."""
    batch_size = 8
    per_rank = [
        eval_indices(num_samples, rank=r, world_size=world_size, batch_size=batch_size) for r in range(world_size)
    ]
    expected = num_eval_batches(num_samples, world_size, batch_size)
    assert all(len(batches) == expected for batches in per_rank)
    counted = Counter()
    for batches in per_rank:
        for indices, mask in batches:
            assert len(indices) == len(mask) and indices.min() >= 0 and indices.max() < num_samples
            counted.update(indices[mask].tolist())
    assert counted == Counter(range(num_samples))


def test_train_batches_real_shards(scenario_dir: Path, odd_split: str) -> None:
    """Guards against batches whose images or labels do not belong to the yielded sample indices."""
    dataset = SplitDataset(scenario_dir, odd_split)
    counts = []
    for rank in range(3):
        batches = list(train_batches(dataset, epoch=0, seed=1, rank=rank, world_size=3, batch_size=32))
        counts.append(len(batches))
        x, y, indices = batches[-1]
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 16, 16) and y.dtype == torch.int64
        assert len(x) == len(y) == len(indices)
        first_x, first_y = dataset[int(indices[0])]
        assert torch.equal(x[0], first_x) and int(y[0]) == first_y
    assert len(set(counts)) == 1 and counts[0] == num_train_batches(len(dataset), 3, 32)


def test_eval_batches_masked_counts_exact(scenario_dir: Path, odd_split: str) -> None:
    """Guards against padding leaking into the class counts that a masked all-reduce would sum."""
    manifest = read_manifest(scenario_dir)
    dataset = SplitDataset(scenario_dir, odd_split, manifest)
    for world_size in (2, 3):
        totals = torch.zeros(10, dtype=torch.int64)
        for rank in range(world_size):
            batches = list(eval_batches(dataset, rank=rank, world_size=world_size, batch_size=64))
            assert len(batches) == num_eval_batches(len(dataset), world_size, 64)
            for x, y, mask in batches:
                assert mask.dtype == torch.bool and len(x) == len(y) == len(mask)
                totals += torch.bincount(y[mask], minlength=10)
        expected = manifest["splits"][odd_split]["class_counts"]
        assert totals.tolist() == [expected[str(c)] for c in range(10)]


def test_single_process_eval(scenario_dir: Path) -> None:
    """Guards against the single-process path (world_size 1) padding or dropping samples."""
    dataset = SplitDataset(scenario_dir, "phase-01")
    batches = list(eval_batches(dataset, rank=0, world_size=1, batch_size=50))
    assert sum(len(y) for _, y, _ in batches) == len(dataset)
    assert all(mask.all() for _, _, mask in batches)


def test_too_few_samples_for_world_size(scenario_dir: Path) -> None:
    """Guards against a rank silently getting no training batches when a split is smaller than world_size."""
    dataset = SplitDataset(scenario_dir, "phase-02")
    world_size = len(dataset) + 1
    with pytest.raises(ValueError, match=f"split phase-02 has {len(dataset)} samples, fewer than world_size"):
        next(train_batches(dataset, epoch=0, seed=0, rank=0, world_size=world_size, batch_size=4))


def test_decoded_normalisation(scenario_dir: Path) -> None:
    """Guards against decoding with the wrong scale, channel layout or normalisation statistics: the manifest's
    statistics must make the base split zero-mean and unit-variance after `normalize`."""
    base = SplitDataset(scenario_dir, "base")
    images, labels = zip(*base.iter_all(), strict=True)
    x, y = torch.stack(images), torch.tensor(labels)
    assert x.shape == (len(base), 1, 16, 16) and x.dtype == torch.uint8 and int(x.max()) == 255
    norm = base.manifest["normalization"]
    z = normalize(x, norm["mean"], norm["std"])
    assert z.dtype == torch.float32 and abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1.0) < 1e-3
    assert set(y.tolist()) == set(range(10))
    background = (0.0 - norm["mean"][0]) / norm["std"][0]
    assert float(z.min()) == pytest.approx(background, abs=1e-5)


def test_workers_and_pickling(scenario_dir: Path) -> None:
    """Guards against DataLoader workers or a pickled copy (spawn, Ray) reading different samples."""
    dataset = SplitDataset(scenario_dir, "base")
    reference = dataset[250]
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[250][0], reference[0]) and clone[250][1] == reference[1]

    kwargs = {"epoch": 2, "seed": 0, "rank": 1, "world_size": 2, "batch_size": 100}
    plain = list(train_batches(dataset, **kwargs))
    parallel = list(train_batches(dataset, num_workers=2, **kwargs))
    assert len(plain) == len(parallel)
    for a, b in zip(plain, parallel, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_corrupt_png_names_shard_and_key(scenario_dir: Path, tmp_path: Path) -> None:
    """Guards against a corrupt sample being skipped silently or reported without where it is."""
    copy = tmp_path / "scenario"
    shutil.copytree(scenario_dir, copy)
    shard = copy / "base" / "base-000001.tar"
    with tarfile.open(shard) as tar:
        member, neighbour = [m for m in tar.getmembers() if m.name.endswith(".png")][:2]
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\x00" * 16)  # destroys the PNG signature and header, tar structure intact

    dataset = SplitDataset(copy, "base")
    key = member.name.removesuffix(".png")
    dataset[int(neighbour.name[5:11])]  # the next sample of the shard still decodes
    with pytest.raises(SampleDecodeError, match=rf"'{key}'.*base-000001\.tar"):
        dataset[int(key[5:])]


@pytest.mark.parametrize("template", ["pipe:cat {root}/{file}", "file://{root}/{file}"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_eval_counts_every_sample_once(scenario_dir: Path, odd_split: str, template: str, num_workers: int):
    """Guards against streamed evaluation (shards through a URL, e.g. an object store) dropping or doubling
    samples, or giving ranks different batch counts (a hang under layer-gathering forwards)."""
    manifest = read_manifest(scenario_dir)
    url = template.replace("{root}", str(scenario_dir))
    split = StreamingSplit(url, odd_split, manifest)
    assert len(split.shards) > 3  # ranks with different shard counts: padding needed
    indexed = SplitDataset(scenario_dir, odd_split, manifest)
    for world_size in (2, 3):
        seen, counts = Counter(), []
        for rank in range(world_size):
            batches = list(
                eval_batches(split, rank=rank, world_size=world_size, batch_size=16, num_workers=num_workers)
            )
            counts.append(len(batches))
            for x, y, mask in batches:
                assert x.dtype == torch.uint8 and len(x) == len(y) == len(mask)
                seen.update(
                    (bytes(img.numpy().tobytes()), int(label)) for img, label in zip(x[mask], y[mask], strict=True)
                )
        assert len(set(counts)) == 1
        expected = Counter((img.numpy().tobytes(), label) for img, label in indexed.iter_all())
        assert seen == expected


def test_streaming_train_quota_and_errors(scenario_dir: Path, tmp_path: Path):
    """Guards against streamed training giving ranks different step counts, repeating the epoch's order every
    epoch, or accepting fewer shards than ranks x loader processes; and against a truncated shard being read
    silently short."""
    manifest = read_manifest(scenario_dir)
    split = StreamingSplit(f"{scenario_dir}/{{file}}", "base", manifest)  # plain paths stream too
    kwargs = {"seed": 3, "world_size": 2, "batch_size": 32}
    per_rank = [list(train_batches(split, epoch=1, rank=r, **kwargs)) for r in range(2)]
    expected = num_train_batches(len(split), 2, 32)
    assert [len(b) for b in per_rank] == [expected, expected]
    assert sum(len(y) for _, y, _ in per_rank[0]) == len(split) // 2
    first = per_rank[0][0][1]
    assert not torch.equal(first, next(iter(train_batches(split, epoch=2, rank=0, **kwargs)))[1])
    with pytest.raises(ValueError, match="fewer than ranks x loader processes"):
        next(iter(train_batches(split, epoch=1, rank=0, num_workers=5, **kwargs)))

    copy = tmp_path / "copy"
    shutil.copytree(scenario_dir, copy)
    shard = copy / manifest["splits"]["base"]["shards"][0]["file"]
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[-2].offset  # drop the last sample, keep a valid tar end
    data = shard.read_bytes()
    shard.write_bytes(data[:cut] + b"\0" * 1024)
    broken = StreamingSplit(f"{copy}/{{file}}", "base", manifest)
    with pytest.raises(ValueError, match=r"base-000000\.tar holds 99 samples, the manifest says 100"):
        list(broken.iter_all())


def test_member_names_that_leave_the_shard_are_refused(scenario_dir: Path, tmp_path: Path) -> None:
    """Guards against a crafted shard whose member names climb out of its directory (`../x.png`) or are
    absolute being read as samples, and against the writer producing such names."""
    import io

    from iil_dist.data.reader import iter_tar_samples
    from iil_dist.data.shards import _write_tar

    copy = tmp_path / "scenario"
    shutil.copytree(scenario_dir, copy)
    shard = copy / "base" / "base-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    for prefix in ("../", "/abs/"):
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in members:
                member.name = prefix + member.name.lstrip("./").split("/")[-1]
                tar.addfile(member, io.BytesIO(data))
        with pytest.raises(SampleDecodeError, match=r"base-000000\.tar: sample 0 has the key .*not a plain sample"):
            SplitDataset(copy, "base").stored(0)  # the shard's first sample
        with pytest.raises(ValueError, match=rf"member name '{prefix}base-\d{{6}}\.cls' is not a plain sample file"):
            list(iter_tar_samples(str(shard)))
    for key in ("../escape", "a/b", ""):
        with pytest.raises(ValueError, match="refusing to write a sample key"):
            _write_tar(tmp_path / "out.tar", iter([(key, {"cls": b"1"})]))
    assert not (tmp_path / "out.tar").exists() and not (tmp_path / ".out.tar.tmp").exists()


def test_label_outside_the_classes_and_short_shard_are_named(scenario_dir: Path, tmp_path: Path) -> None:
    """Guards against a label beyond the class count reaching the loss (an index error deep in a kernel, or
    a silently wrong target) and against an indexed shard with fewer samples than the manifest lists."""
    import io

    copy = tmp_path / "scenario"
    shutil.copytree(scenario_dir, copy)
    shard = copy / "base" / "base-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = next(m.name for m, _ in members if m.name.endswith(".cls")).removesuffix(".cls")
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == f"{key}.cls":
                data = b"12"  # digits has classes 0..9
                member = tarfile.TarInfo(member.name)
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    manifest = read_manifest(copy)
    with pytest.raises(SampleDecodeError, match=rf"'{key}' in shard .*base-000000\.tar.*label 12 outside 0\.\.9"):
        SplitDataset(copy, "base", manifest)[int(key[5:])]
    with pytest.raises(SampleDecodeError, match=rf"'{key}'.*label 12 outside 0\.\.9"):
        list(StreamingSplit(f"{copy}/{{file}}", "base", manifest).iter_all())

    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members[:-2]:  # the last sample is gone
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"base-000000\.tar holds 99 samples, the manifest says 100"):
        SplitDataset(copy, "base", manifest).stored(0)
