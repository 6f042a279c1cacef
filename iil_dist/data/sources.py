"""Raw datasets a scenario is cut from: labels up front, images fetched one at a time.

A `Source` knows every sample's label (the split needs only those) and hands out its images through
`items`, a sequence that `prepare`'s writer processes slice per shard. Slices are small and picklable,
so shards are written in parallel processes without copying the dataset into each of them:

- digits: scikit-learn's bundled 8x8 digits, in memory (1,797 images, no official test split);
- cifar100: the official python pickle tarball (`cifar-100-python.tar.gz`), decoded once into a
  memory-mapped .npy cache; its official test split is the scenario's test set;
- imagefolder: `train/` and `val/` of class folders (ImageNet-1k's layout), files kept encoded; `val/`
  is the test set;
- imagenet100: an ImageFolder tree restricted to the classes of a list file (a seeded 100-class list
  of ImageNet-1k ships with the package);
- arrays: a folder with `images.npy` (uint8, N x H x W or N x H x W x C) and `labels.npy` (N integers),
  memory-mapped, so its size is not bounded by memory (no official test split).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_IMAGENET100 = Path(__file__).with_name("imagenet100_classes.txt")


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes as stored by the source, and its format (`jpg` or `png`)."""

    data: bytes
    ext: str


RawImage = np.ndarray | EncodedImage


class ArrayItems:
    """Images held as one uint8 array (N, H, W[, C]), in memory or as a memory-mapped .npy file."""

    def __init__(self, images: np.ndarray | None = None, path: Path | None = None, rows: np.ndarray | None = None):
        self._images, self._path = images, path
        self._rows = rows  # which rows of the array this (sub)sequence holds; None is all of them

    def _array(self) -> np.ndarray:
        if self._images is None:
            # opened lazily, in the process that reads: a slice pickles as (path, rows), not pixels
            self._images = np.load(self._path, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._array())

    def __getitem__(self, i: int) -> RawImage:
        row = int(self._rows[i]) if self._rows is not None else i
        return np.asarray(self._array()[row])

    def subset(self, indices: np.ndarray) -> ArrayItems:
        rows = self._rows[indices] if self._rows is not None else np.asarray(indices)
        if self._path is not None:
            return ArrayItems(path=self._path, rows=rows)
        return ArrayItems(images=np.ascontiguousarray(self._array()[rows]))  # in memory: small by design

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._path is not None:
            state["_images"] = None
        return state


class FileItems:
    """Images as files under `root`, read as stored (JPEG or PNG bytes)."""

    def __init__(self, root: Path, files: np.ndarray):
        self.root = Path(root)
        self.files = files  # relative paths as a numpy array of UTF-8 bytes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> RawImage:
        path = self.root / self.files[i].decode()
        ext = path.suffix.lower().lstrip(".")
        return EncodedImage(path.read_bytes(), "jpg" if ext == "jpeg" else ext)

    def subset(self, indices: np.ndarray) -> FileItems:
        return FileItems(self.root, self.files[indices])


Items = ArrayItems | FileItems


@dataclass
class Source:
    """A labelled dataset: samples 0..num_train-1 are its training set, the rest its official test set."""

    name: str
    labels: np.ndarray  # (N,) int64
    num_train: int
    class_names: list[str]
    channels: int
    items: Items

    @property
    def has_test_split(self) -> bool:
        return self.num_train < len(self.labels)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Scikit-learn's bundled 8x8 digits (no network): uint8 images (N, 8, 8) in 0..255, int64 labels (N,)."""
    import sklearn.datasets

    bunch = sklearn.datasets.load_digits()
    # the bundled pixels are counts 0..16 of a 4x4 block; stretch them to the usual 8-bit range
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    return images, labels


def digits_source() -> Source:
    images, labels = load_digits()
    names = [str(d) for d in range(10)]
    return Source("digits", labels, len(labels), names, channels=1, items=ArrayItems(images))


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global but the few a CIFAR pickle needs: a tarball from anywhere runs no code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle")
        return super().find_class(module, name)


def _read_cifar_member(tar: tarfile.TarFile, name: str, tarball: Path) -> dict[str, Any]:
    try:
        member = tar.extractfile(f"cifar-100-python/{name}")
    except KeyError:
        raise ValueError(f"{tarball}: no member cifar-100-python/{name}; is it cifar-100-python.tar.gz?") from None
    try:
        # latin1 decodes the Python-2 strings of the official files; keys may come as bytes or str
        raw = _CifarUnpickler(io.BytesIO(member.read()), encoding="latin1").load()
    except Exception as err:
        raise ValueError(f"{tarball}: cifar-100-python/{name} is not a CIFAR-100 pickle: {err}") from None
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_split(part: dict[str, Any], name: str, tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    for key in ("data", "fine_labels"):
        if key not in part:
            raise ValueError(f"{tarball}: cifar-100-python/{name} has no field {key!r}")
    data = np.asarray(part["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{tarball}: cifar-100-python/{name} field 'data' has shape {data.shape}, expected (N, 3072)")
    labels = np.asarray(part["fine_labels"], dtype=np.int64)
    if len(labels) != len(data) or labels.min() < 0 or labels.max() > 99:
        raise ValueError(f"{tarball}: cifar-100-python/{name} field 'fine_labels' is not N labels in 0..99")
    # rows hold the red, green and blue planes one after the other
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def cifar100_source(tarball: Path, cache_dir: Path) -> Source:
    """CIFAR-100 from the official python tarball; images are cached once as `cache_dir/cifar100-images.npy`."""
    tarball = Path(tarball)
    if not tarball.is_file():
        raise ValueError(f"data.source_path: CIFAR-100 tarball {tarball} does not exist")
    cache = Path(cache_dir) / "cifar100-images.npy"
    labels_cache = cache.with_name("cifar100-labels.npz")  # written last: marks the cache complete
    with tarfile.open(tarball, "r:*") as tar:
        meta = _read_cifar_member(tar, "meta", tarball)
        if not labels_cache.exists():
            train_x, train_y = _cifar_split(_read_cifar_member(tar, "train", tarball), "train", tarball)
            test_x, test_y = _cifar_split(_read_cifar_member(tar, "test", tarball), "test", tarball)
            cache.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save(cache, lambda f: np.save(f, np.concatenate([train_x, test_x])))
            labels = np.concatenate([train_y, test_y])
            _atomic_save(labels_cache, lambda f: np.savez(f, labels=labels, num_train=len(train_y)))
    with np.load(labels_cache) as cached:
        labels, num_train = cached["labels"], int(cached["num_train"])
    names = [str(n) for n in meta.get("fine_label_names", range(100))]
    return Source("cifar100", labels, num_train, names, channels=3, items=ArrayItems(path=cache))


def _atomic_save(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def read_class_list(path: Path) -> list[str]:
    """Class folder names, one per line; blank lines and `#` comments are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.class_list: {path} does not exist")
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"data.class_list: {path} must list distinct class names, one per line")
    return names


def _list_images(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


def imagefolder_source(root: Path, class_list: Sequence[str] | None = None, name: str = "imagefolder") -> Source:
    """`root/train/<class>/*.jpg` and `root/val/<class>/*.jpg`; classes in sorted order, or those of `class_list`."""
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise ValueError(f"data.source_path: {d} is missing; an ImageFolder source needs train/ and val/")
    classes = list(class_list) if class_list else sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    files: list[str] = []
    labels: list[int] = []
    num_train = 0
    for split_dir in (train_dir, val_dir):
        for label, cls in enumerate(classes):
            folder = split_dir / cls
            if not folder.is_dir():
                raise ValueError(f"data.source_path: class folder {folder} is missing")
            names = _list_images(folder)
            if not names:
                raise ValueError(f"data.source_path: class folder {folder} holds no .jpg/.jpeg/.png image")
            files += [f"{split_dir.name}/{cls}/{n}" for n in names]
            labels += [label] * len(names)
        if split_dir is train_dir:
            num_train = len(files)
    # fixed-width UTF-8 bytes: ~1 byte per character instead of a Python object (or 4 bytes per character)
    items = FileItems(root, np.array([f.encode() for f in files]))
    return Source(name, np.array(labels, dtype=np.int64), num_train, classes, channels=3, items=items)


def arrays_source(folder: Path) -> Source:
    """`folder`/images.npy and `folder`/labels.npy, checked for shape and type before anything is written."""
    images_path, labels_path = folder / "images.npy", folder / "labels.npy"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise ValueError(f"data.source_path: {path} is missing (data.source=arrays reads images.npy, labels.npy)")
    images = np.load(images_path, mmap_mode="r")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise ValueError(f"{images_path}: expected uint8 N x H x W or N x H x W x (1 or 3), got {images.dtype} "
                         f"{images.shape}")  # fmt: skip
    labels = np.load(labels_path)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_path}: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{labels_path}: label {int(labels.min())} is negative")
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    channels = 1 if images.ndim == 3 else int(images.shape[3])
    names = [str(c) for c in range(num_classes)]
    return Source("arrays", labels.astype(np.int64), len(labels), names, channels, ArrayItems(path=images_path))


SOURCE_NAMES = ("digits", "cifar100", "imagefolder", "imagenet100", "arrays")


def load_source(name: str, source_path: str = "", class_list: str = "", cache_dir: Path | None = None) -> Source:
    """The source `name`; `source_path` is the CIFAR tarball or ImageFolder root, `cache_dir` where
    CIFAR-100's decoded images are kept. An unknown name or a missing path raises ValueError naming it."""
    if name not in SOURCE_NAMES:
        raise ValueError(f"data.source must be one of {list(SOURCE_NAMES)}, got {name!r}")
    if name == "digits":
        return digits_source()
    if not source_path:
        raise ValueError(f"data.source_path is required for data.source={name}")
    if name == "cifar100":
        return cifar100_source(Path(source_path), cache_dir or Path(source_path).parent)
    if name == "arrays":
        return arrays_source(Path(source_path))
    classes = read_class_list(Path(class_list)) if class_list else None
    if name == "imagenet100" and classes is None:
        classes = read_class_list(DEFAULT_IMAGENET100)
    return imagefolder_source(Path(source_path), classes, name)
