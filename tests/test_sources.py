"""Sources for `prepare` and the scalable shard writer, on real files written in tmp_path: a tiny CIFAR-100
tarball in the official pickle format, a tiny ImageFolder tree of real JPEG files, the shipped ImageNet-100
class list; parallel, resumable and size-targeted writing."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iil_dist.data import shards
from iil_dist.data.reader import SplitDataset
from iil_dist.data.shards import read_manifest, verify_shards, write_scenario
from iil_dist.data.sources import DEFAULT_IMAGENET100, load_source, read_class_list

COMMON = {"base_fraction": 0.5, "test_fraction": 0.25, "split_seed": 0, "order_seed": 0,
          "rotation_min_deg": 20.0, "rotation_max_deg": 60.0}  # fmt: skip


def _cifar_part(rng: np.random.Generator, n: int) -> dict:
    # the official files are Python-2 pickles of dicts with these fields; rows are R, G, B planes of 32x32
    return {
        "batch_label": "tiny", "filenames": [f"img_{i}.png" for i in range(n)],
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "fine_labels": [int(v) for v in np.arange(n) % 100], "coarse_labels": [int(v) for v in np.arange(n) % 20],
    }  # fmt: skip


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def cifar_tarball(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """cifar-100-python.tar.gz with 400 training and 200 test images (4 and 2 per class)."""
    rng = np.random.default_rng(0)
    train, test = _cifar_part(rng, 400), _cifar_part(rng, 200)
    meta = {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    path = tmp_path_factory.mktemp("cifar") / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, part in (("train", train), ("test", test), ("meta", meta)):
            _add(tar, f"cifar-100-python/{name}", pickle.dumps(part, protocol=2))
    return path, train, test


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ of 3 class folders with real JPEG files of varying sizes (10 and 4 per class)."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("imagefolder")
    for split, count in (("train", 10), ("val", 4)):
        for cls in ("n01", "n02", "n03"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{cls}_{i}.JPEG").write_bytes(
                    _jpeg(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90)))
                )
    return root


def _samples(scenario: Path, split: str) -> list[dict[str, bytes]]:
    """A split's samples in position order (their keys' order), whatever shards store them in."""
    members: dict[str, bytes] = {}
    manifest = read_manifest(scenario)
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(scenario / shard["file"]) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    keys = sorted({name.split(".")[0] for name in members})
    return [{n.split(".")[1]: v for n, v in members.items() if n.split(".")[0] == k} for k in keys]


def test_cifar100_official_splits_and_pixels(tmp_path, cifar_tarball):
    """Guards against a CIFAR-100 source that mixes the official test set into training, mislabels samples,
    or scrambles the R/G/B planes of the pickle's rows."""
    tarball, train, test = cifar_tarball
    out = tmp_path / "scenario"
    manifest = write_scenario(
        out, source="cifar100", source_path=str(tarball), num_phases=2, drift="none", image_size=32,
        samples_per_shard=64, **COMMON,
    )  # fmt: skip
    verify_shards(out, manifest)
    assert manifest["num_classes"] == 100 and manifest["channels"] == 3 and manifest["class_names"][7] == "class7"
    counts = {name: manifest["splits"][name]["num_samples"] for name in manifest["splits"]}
    assert counts == {"base": 200, "phase-01": 100, "phase-02": 100, "test": 200}
    # the test split is the official one, in order: pixels and labels equal the pickle's rows
    dataset = SplitDataset(out, "test")
    for i in (0, 57, 199):
        image, label = dataset[i]
        expected = test["data"][i].reshape(3, 32, 32)
        assert label == test["fine_labels"][i] and np.array_equal(image.numpy(), expected)
    assert not (out / ".source").exists()  # the decoded cache is removed once the scenario is complete


def test_cifar100_pickle_may_not_run_code(tmp_path):
    """Guards against unpickling a downloaded tarball that carries code (a pickle global such as os.system)."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("train", "test", "meta"):
            _add(tar, f"cifar-100-python/{name}", pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"cifar-100-python/meta.*print is not allowed"):
        load_source("cifar100", str(path), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="does not exist"):
        load_source("cifar100", str(tmp_path / "missing.tar.gz"), cache_dir=tmp_path / "cache")


def test_image_folder_keeps_source_bytes_and_val_as_test(tmp_path, image_folder):
    """Guards against re-encoding JPEGs that need no change (quality loss, wasted time), against val/ not
    being the test split, and against class folders mapped to the wrong labels."""
    out = tmp_path / "scenario"
    manifest = write_scenario(
        out, source="imagefolder", source_path=str(image_folder), num_phases=2, drift="none", image_size=0,
        encode="keep", samples_per_shard=7, **COMMON,
    )  # fmt: skip
    assert manifest["class_names"] == ["n01", "n02", "n03"] and manifest["splits"]["test"]["num_samples"] == 12
    test = _samples(out, "test")
    sources = sorted((image_folder / "val").rglob("*.JPEG"))
    assert [s["jpg"] for s in test] == [p.read_bytes() for p in sources]
    assert [int(s["cls"]) for s in test] == [["n01", "n02", "n03"].index(p.parent.name) for p in sources]


def test_image_folder_max_side_rotation_and_class_list(tmp_path, image_folder):
    """Guards against max_side leaving large images, rotation drift failing on images of varying sizes, and
    a class list (ImageNet-100's mechanism) not restricting and ordering the classes."""
    (tmp_path / "classes.txt").write_text("# two of three\nn03\nn01\n")
    out = tmp_path / "scenario"
    manifest = write_scenario(
        out, source="imagenet100", source_path=str(image_folder), class_list=str(tmp_path / "classes.txt"),
        num_phases=2, drift="rotation", image_size=0, max_side=48, encode="keep", jpeg_quality=80,
        samples_per_shard=5, **COMMON,
    )  # fmt: skip
    assert manifest["class_names"] == ["n03", "n01"] and manifest["num_classes"] == 2
    assert manifest["splits"]["test"]["num_samples"] == 2 * 8  # upright and rotated copies of 8 val images
    for split in ("base", "phase-01", "test"):
        for sample in _samples(out, split):
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                assert max(image.size) <= 48 and image.mode == "RGB"
            assert int(sample["cls"]) in (0, 1)


def test_shipped_imagenet100_list():
    """Guards against a damaged default class list: 100 distinct ImageNet-1k WordNet ids."""
    names = read_class_list(DEFAULT_IMAGENET100)
    assert len(names) == 100 and len(set(names)) == 100
    assert all(len(n) == 9 and n[0] == "n" and n[1:].isdigit() for n in names) and names == sorted(names)


def test_parallel_writing_is_byte_identical(tmp_path, image_folder):
    """Guards against pool processes producing different shards than one process (ordering, seeds)."""
    args = {"source": "imagefolder", "source_path": str(image_folder), "num_phases": 2, "drift": "rotation",
            "image_size": 24, "encode": "jpeg", "samples_per_shard": 4, **COMMON}  # fmt: skip
    one = write_scenario(tmp_path / "one", num_workers=1, **args)
    two = write_scenario(tmp_path / "two", num_workers=2, **args)
    assert one == two
    for split in one["splits"]:
        for shard in one["splits"][split]["shards"]:
            assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "two" / shard["file"]).read_bytes()


def test_shard_size_target(tmp_path, image_folder):
    """Guards against data.shard_size_mb being ignored or far off (shards of ~100-500 MB at ImageNet scale)."""
    target_mb = 0.02
    manifest = write_scenario(
        tmp_path / "s", source="imagefolder", source_path=str(image_folder), num_phases=1, drift="none",
        image_size=0, encode="keep", samples_per_shard=1000, shard_size_mb=target_mb, **COMMON,
    )  # fmt: skip
    sizes = [s["bytes"] for s in manifest["splits"]["base"]["shards"]]
    assert len(sizes) > 1
    assert all(0.5 * target_mb * 2**20 <= size <= 1.5 * target_mb * 2**20 for size in sizes[:-1]), sizes


def test_interrupted_prepare_resumes_and_rewrites_damaged_shards(tmp_path, monkeypatch, caplog):
    """Guards against a rerun of an interrupted prepare starting over, or keeping a shard whose bytes no
    longer match what was recorded; the result must equal an uninterrupted write."""
    args = {"source": "digits", "num_phases": 3, "drift": "rotation", "image_size": 16, "samples_per_shard": 50,
            **COMMON}  # fmt: skip
    clean = write_scenario(tmp_path / "clean", **args)
    out = tmp_path / "cut"
    real_write, written = shards.write_shard, []

    def crash_after_six(task):
        if len(written) == 6:
            raise KeyboardInterrupt  # as if the machine went away
        written.append(task.path)
        return real_write(task)

    monkeypatch.setattr(shards, "write_shard", crash_after_six)
    with pytest.raises(KeyboardInterrupt):
        write_scenario(out, **args)
    monkeypatch.setattr(shards, "write_shard", real_write)
    assert not (out / "manifest.json").exists()
    journal = json.loads((out / shards.JOURNAL).read_text())
    assert len(journal["shards"]) == 6

    damaged = written[2]
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with caplog.at_level("INFO", logger="iil_dist.data.shards"):
        resumed = write_scenario(out, **args)
    assert "reused 5 shards" in caplog.text
    assert resumed == clean and not (out / shards.JOURNAL).exists()
    verify_shards(out, resumed)


def _train_worker(rank: int, world: int, port: int, scenario: str, runs: str, overrides: list[str]) -> None:
    from helpers import REPO_CONFIG, finish_rank, init_rank

    from iil_dist.config import load
    from iil_dist.engine.trainer import PhaseRunner

    init_rank(rank, world, port)
    cfg = load(REPO_CONFIG, [f"data.root={scenario}", "tracking.wandb_mode=disabled", *overrides])
    runner = PhaseRunner(cfg, Path(runs))
    results = runner.run()
    if rank == 0:
        (Path(runs) / "results.json").write_text(json.dumps(results))
    finish_rank()


# one base phase and one incremental phase, a few steps each
ONE_PHASE = ["data.num_phases=1", "optim.base_epochs=2", "optim.epochs_per_phase=2", "method.freeze_epochs=1",
             "optim.batch_size=16", "optim.eval_batch_size=64", "tracking.log_every=1",
             "tracking.print_every=1"]  # fmt: skip


@pytest.mark.timeout(300)
def test_cifar100_prepare_and_train_one_phase(tmp_path, cifar_tarball):
    """Guards against a CIFAR-100 scenario that prepares but cannot train: 3-channel images, 100 classes,
    CIFAR augmentation in loader processes, evaluation on the official test split."""
    from helpers import spawn

    tarball, _, _ = cifar_tarball
    scenario = tmp_path / "scenario"
    write_scenario(scenario, source="cifar100", source_path=str(tarball), num_phases=1, drift="none",
                   image_size=32, samples_per_shard=100, **COMMON)  # fmt: skip
    overrides = [*ONE_PHASE, "data.source=cifar100", f"data.source_path={tarball}", "data.drift=none",
                 "data.image_size=32", "data.train_transform=pad_crop_flip", "data.loader_workers=2",
                 "data.in_memory=false", "model.name=small_cnn"]  # fmt: skip
    spawn(_train_worker, 1, str(scenario), str(tmp_path / "runs"), overrides)
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert [p["phase"] for p in results["phases"]] == [0, 1] and results["num_consolidations"] == 1
    assert all(0.0 <= p[m]["test_acc"] <= 100.0 for p in results["phases"] for m in ("teacher", "student"))


@pytest.mark.timeout(300)
def test_image_folder_streamed_bf16_two_ranks(tmp_path, image_folder):
    """Guards against the ImageNet path failing on CPU: JPEGs of varying sizes streamed through a `pipe:`
    URL by loader processes, random resized crops, centre-crop evaluation, an ImageNet ResNet, bf16
    autocast and channels_last, on two ranks that must run equal step counts and agree bitwise."""
    from helpers import spawn

    scenario = tmp_path / "scenario"
    write_scenario(scenario, source="imagefolder", source_path=str(image_folder), num_phases=1, drift="rotation",
                   image_size=0, encode="keep", samples_per_shard=4, **COMMON)  # fmt: skip
    overrides = [*ONE_PHASE, "data.source=imagefolder", f"data.source_path={image_folder}", "data.image_size=0",
                 "data.train_transform=resized_crop_flip", "data.eval_transform=resize_center_crop",
                 "data.crop_size=32", "data.loader_workers=2", "data.in_memory=false",
                 f"data.shard_url=pipe:cat {scenario}/{{file}}", "model.name=resnet18", "dist.precision=bf16",
                 "dist.channels_last=true", "optim.batch_size=4"]  # fmt: skip
    spawn(_train_worker, 2, str(scenario), str(tmp_path / "runs"), overrides)
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert [p["phase"] for p in results["phases"]] == [0, 1]
    # the rotated test copies double val/: 12 images
    manifest = read_manifest(scenario)
    assert manifest["splits"]["test"]["num_samples"] == 24 and results["world_size"] == 2


def test_arrays_source_is_read_memory_mapped_and_checked(tmp_path):
    """Guards against the arrays source reordering or altering pixels or labels, and against a wrong array
    failing deep in the writer instead of naming the file."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(120, 12, 12), dtype=np.uint8)
    labels = np.arange(120) % 4
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "images.npy", images)
    np.save(folder / "labels.npy", labels)
    source = load_source("arrays", str(folder))
    assert source.channels == 1 and source.class_names == ["0", "1", "2", "3"] and not source.has_test_split
    assert all(np.array_equal(source.items[i], images[i]) for i in (0, 57, 119))
    out = tmp_path / "scenario"
    manifest = write_scenario(
        out, source="arrays", source_path=str(folder), num_phases=2, drift="none", image_size=12,
        samples_per_shard=20, **COMMON,
    )  # fmt: skip
    written = sum(e["num_samples"] for e in manifest["splits"].values())
    assert written == 120 and manifest["num_classes"] == 4
    stored = {x.numpy().tobytes(): y for name in manifest["splits"] for x, y in SplitDataset(out, name).iter_all()}
    assert stored == {img.tobytes(): int(lbl) for img, lbl in zip(images, labels, strict=True)}

    np.save(folder / "images.npy", images.astype(np.float32))
    with pytest.raises(ValueError, match=r"images\.npy: expected uint8"):
        load_source("arrays", str(folder))
    np.save(folder / "images.npy", images)
    np.save(folder / "labels.npy", labels[:-1])
    with pytest.raises(ValueError, match=r"labels\.npy: expected 120 integer labels"):
        load_source("arrays", str(folder))
    (folder / "labels.npy").unlink()
    with pytest.raises(ValueError, match=r"labels\.npy is missing"):
        load_source("arrays", str(folder))


def test_shards_of_a_class_sorted_source_hold_mixed_classes(tmp_path):
    """Guards against shards written in the source's order: an ImageFolder lists its images class by class,
    so such shards hold one class each and a stream through them trains on batches of one or two classes.
    The storage order must not change what a position reads: by index, streamed into memory, or evaluated."""
    from iil_dist.data.reader import InMemorySplit, StreamingSplit, eval_batches

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(400, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 40)  # class by class, as an ImageFolder lists them
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "images.npy", images)
    np.save(folder / "labels.npy", labels)
    out = tmp_path / "scenario"
    manifest = write_scenario(
        out, source="arrays", source_path=str(folder), num_phases=2, drift="none", image_size=8,
        samples_per_shard=20, **COMMON,
    )  # fmt: skip
    assert manifest["storage"] == "shuffled"
    for name, entry in manifest["splits"].items():
        indexed = SplitDataset(out, name, manifest)
        streamed = StreamingSplit(f"{out}/{{file}}", name, manifest)
        stream = [sample for shard in range(len(streamed.shards)) for sample in streamed._samples(shard)]
        # in the shards: a mix of classes in every shard of 20 (in position order each would hold 1 or 2)
        for shard in range(len(entry["shards"])):
            shard_labels = {label for _, label, _ in streamed._samples(shard)}
            assert len(shard_labels) >= 5, (name, shard, shard_labels)
        # by position: the split's order (sorted source rows, so sorted labels here), the same sample by
        # index as the key of that position holds, and the same in-memory split from either reader
        by_key = {int(key.rsplit("-", 1)[1]): (image, label) for image, label, key in stream}
        assert sorted(by_key) == list(range(len(indexed)))
        assert [indexed[i][1] for i in range(len(indexed))] == sorted(by_key[i][1] for i in by_key)
        for i in range(len(indexed)):
            image, label = indexed[i]
            assert label == by_key[i][1] and torch.equal(image, by_key[i][0]), (name, i)
        memory = [InMemorySplit(reader) for reader in (indexed, streamed)]
        assert torch.equal(memory[0].labels, memory[1].labels)
        assert all(torch.equal(a, b) for a, b in zip(memory[0].images, memory[1].images, strict=True))
        # evaluation reads every sample once, whatever order it reads them in
        batches = [b for r in range(2) for b in eval_batches(indexed, rank=r, world_size=2, batch_size=16)]
        seen = sorted(image.numpy().tobytes() for x, _, mask in batches for image in x[mask])
        assert seen == sorted(image.numpy().tobytes() for image, _ in by_key.values())

    # a manifest from before the field was written in position order, and is read so
    legacy = json.loads((out / "manifest.json").read_text())
    del legacy["storage"]
    (out / "manifest.json").write_text(json.dumps(legacy))
    assert read_manifest(out)["storage"] == "sequential"
    legacy["storage"] = "random"
    (out / "manifest.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match=r"manifest\.json: storage is 'random'"):
        read_manifest(out)
