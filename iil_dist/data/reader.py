"""Indexed reading of a prepared scenario: even training shares per rank and exact evaluation.

Why indexed and not streaming: collectives hang unless every rank runs the same number of steps,
and PP / F are exact numbers only if evaluation sees every sample once. With random access both
follow from index arithmetic: training gives each rank N // world_size samples of a per-epoch
permutation (the at most world_size - 1 left-over samples differ every epoch), evaluation pads the
ranks' strided shares to equal length and masks the padding. The price is that shards must sit on a
seekable file system (local disk or a shared mount), not be streamed from an object store.

Each shard is opened with wids' `IndexedTarSamples` (an mmap index of the tar members). wids'
`ShardListDataset` is not used: it copies shards into a cache directory or, given the shard paths
as local names, creates lock files beside them (fails on read-only shared storage), and it prints
to stderr on every construction. The shard list and lengths come from the manifest instead.
"""

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from wids.wids import IndexedTarSamples

from iil_dist.data.shards import read_manifest

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SampleDecodeError(ValueError):
    """A sample whose image or label cannot be decoded; the message names the shard and the key."""


class SplitDataset:
    """Indexed access to one split of a prepared scenario, normalised with the manifest's statistics."""

    def __init__(self, scenario_dir: Path, split: str, manifest: dict | None = None, max_open_shards: int = 64):
        """Open `split` of the scenario in `scenario_dir`; the manifest is read from there unless given."""
        self.scenario_dir = Path(scenario_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.scenario_dir)
        if split not in self.manifest["splits"]:
            raise ValueError(
                f"split {split!r} is not in scenario {self.scenario_dir}; it has {list(self.manifest['splits'])}"
            )
        self.split = split
        entry = self.manifest["splits"][split]
        self._shard_paths = [self.scenario_dir / shard["file"] for shard in entry["shards"]]
        self._shard_sizes = [int(shard["num_samples"]) for shard in entry["shards"]]
        self._shard_ends = np.cumsum(self._shard_sizes)
        self._num_samples = int(entry["num_samples"])
        if not self._shard_sizes or int(self._shard_ends[-1]) != self._num_samples:
            raise ValueError(
                f"{self.scenario_dir}: split {split!r} lists {sum(self._shard_sizes)} samples in its shards "
                f"but num_samples {self._num_samples}"
            )

        self.num_classes = int(self.manifest["num_classes"])
        self.channels = int(self.manifest["channels"])
        self.image_size = int(self.manifest["image_size"])
        self._mode = "L" if self.channels == 1 else "RGB"
        norm = self.manifest["normalization"]
        self._mean = torch.tensor(norm["mean"], dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(norm["std"], dtype=torch.float32).view(-1, 1, 1)
        self._max_open_shards = max_open_shards
        self._open: OrderedDict[int, IndexedTarSamples] = OrderedDict()

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Sample `i`: float32 (C, H, W), normalised with the manifest's mean and std, and its label."""
        if not -self._num_samples <= i < self._num_samples:
            raise IndexError(f"index {i} out of range for split {self.split!r} of {self._num_samples} samples")
        i %= self._num_samples
        shard_id = int(np.searchsorted(self._shard_ends, i, side="right"))
        inner = i - (int(self._shard_ends[shard_id - 1]) if shard_id else 0)
        sample = self._shard(shard_id)[inner]
        pixels, label = self._decode(sample, self._shard_paths[shard_id])

        x = torch.from_numpy(pixels).to(torch.float32).div_(255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return (x - self._mean) / self._std, label

    def _decode(self, sample: dict, path: Path) -> tuple[np.ndarray, int]:
        key = sample.get("__key__")
        # anything the image or label decoders raise means the same thing to the caller: this sample is
        # broken; say where it is, never skip it silently
        try:
            with Image.open(sample[".png"]) as image:
                image.load()
                if image.mode != self._mode:
                    raise ValueError(f"image mode {image.mode}, expected {self._mode}")
                if image.size != (self.image_size, self.image_size):
                    raise ValueError(f"image size {image.size}, expected {self.image_size}")
                pixels = np.array(image)
            label = int(sample[".cls"].read().decode("ascii"))
            if not 0 <= label < self.num_classes:
                raise ValueError(f"label {label} outside 0..{self.num_classes - 1}")
        except Exception as exc:
            raise SampleDecodeError(f"cannot decode sample {key!r} in shard {path}: {exc!r}") from exc
        return pixels, label

    def _shard(self, shard_id: int) -> IndexedTarSamples:
        if shard_id in self._open:
            self._open.move_to_end(shard_id)
            return self._open[shard_id]
        path = self._shard_paths[shard_id]
        try:
            tar = IndexedTarSamples(path=str(path))
        except Exception as exc:
            raise ValueError(f"cannot index shard {path}: {exc!r}") from exc
        if len(tar) != self._shard_sizes[shard_id]:
            tar.close()
            raise ValueError(f"shard {path} holds {len(tar)} samples, the manifest says {self._shard_sizes[shard_id]}")
        self._open[shard_id] = tar
        # bounded so that a split of thousands of shards does not exhaust file descriptors
        if len(self._open) > self._max_open_shards:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        return tar

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split stacked: (N, C, H, W) float32 and (N,) int64; meant for small splits."""
        images, labels = zip(*(self[i] for i in range(len(self))), strict=True)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)

    def close(self) -> None:
        """Close the open shard files; later reads reopen them."""
        while self._open:
            _, tar = self._open.popitem()
            tar.close()

    def __getstate__(self) -> dict:
        # open mmaps cannot be pickled (DataLoader workers under spawn, Ray); the copy reopens lazily
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def _check_ranks(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def num_train_batches(num_samples: int, world_size: int, batch_size: int) -> int:
    """Training batches per epoch, the same on every rank: ceil((num_samples // world_size) / batch_size)."""
    _check_ranks(0, world_size, batch_size)
    if num_samples < world_size:
        raise ValueError(f"{num_samples} samples, fewer than world_size {world_size}")
    return math.ceil((num_samples // world_size) / batch_size)


def num_eval_batches(num_samples: int, world_size: int, batch_size: int) -> int:
    """Evaluation batches, the same on every rank: ceil(ceil(num_samples / world_size) / batch_size)."""
    _check_ranks(0, world_size, batch_size)
    if num_samples < 1:
        raise ValueError("cannot evaluate on an empty split")
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def train_indices(
    num_samples: int, *, epoch: int, seed: int, rank: int, world_size: int, batch_size: int
) -> list[np.ndarray]:
    """The sample indices of each of this rank's training batches in `epoch`.

    Every rank gets the same number of batches, each of at most `batch_size` samples and sizes that
    differ by at most one; the batch sizes are the same on every rank.
    """
    _check_ranks(rank, world_size, batch_size)
    num_batches = num_train_batches(num_samples, world_size, batch_size)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed {seed} and epoch {epoch}")
    # every rank draws the same permutation, so the strided shares are disjoint without communication
    permutation = np.random.default_rng([seed, epoch]).permutation(num_samples)
    share = permutation[rank : (num_samples // world_size) * world_size : world_size]
    # batches of near-equal size (they differ by at most one sample) rather than full batches plus a
    # remainder: a remainder of one or two samples gives a noisy step and poisons BatchNorm statistics,
    # which matters when a phase brings only a few dozen samples per rank
    return np.array_split(share, num_batches)


def eval_indices(
    num_samples: int, *, rank: int, world_size: int, batch_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(indices, mask) of each of this rank's evaluation batches; masked-out positions are padding."""
    _check_ranks(rank, world_size, batch_size)
    num_batches = num_eval_batches(num_samples, world_size, batch_size)
    share = np.arange(rank, num_samples, world_size)
    padded_len = math.ceil(num_samples / world_size)
    # pad with a real sample so that the batch decodes and runs through the model like any other
    filler = share[-1] if len(share) else 0
    indices = np.concatenate([share, np.full(padded_len - len(share), filler, dtype=share.dtype)])
    mask = np.arange(padded_len) < len(share)
    return [
        (indices[b * batch_size : (b + 1) * batch_size], mask[b * batch_size : (b + 1) * batch_size])
        for b in range(num_batches)
    ]


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*items, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _load(
    dataset: SplitDataset, batches: list[np.ndarray], num_workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    index_lists = [[int(i) for i in batch] for batch in batches]
    if num_workers == 0:
        for batch in index_lists:
            yield _collate([dataset[i] for i in batch])
        return
    loader = DataLoader(dataset, batch_sampler=index_lists, num_workers=num_workers, collate_fn=_collate)
    yield from loader


def train_batches(
    dataset: SplitDataset,
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """This rank's training batches (x, y, sample indices) of `epoch`; every rank yields the same count."""
    if len(dataset) < world_size:
        name = getattr(dataset, "split", "?")
        raise ValueError(f"split {name} has {len(dataset)} samples, fewer than world_size {world_size}")
    batches = train_indices(
        len(dataset), epoch=epoch, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size
    )
    for indices, (x, y) in zip(batches, _load(dataset, batches, num_workers), strict=True):
        yield x, y, torch.from_numpy(indices)


def eval_batches(
    dataset: SplitDataset, *, rank: int, world_size: int, batch_size: int, num_workers: int = 0
) -> Iterator[Batch]:
    """This rank's evaluation batches (x, y, mask); over all ranks, mask True marks every sample once."""
    batches = eval_indices(len(dataset), rank=rank, world_size=world_size, batch_size=batch_size)
    index_batches = [indices for indices, _ in batches]
    for (_, mask), (x, y) in zip(batches, _load(dataset, index_batches, num_workers), strict=True):
        yield x, y, torch.from_numpy(mask)


class InMemorySplit:
    """A split decoded once and kept in memory: indexed like SplitDataset, for small datasets."""

    def __init__(self, dataset: SplitDataset) -> None:
        self.split = dataset.split
        self.images, self.labels = dataset.load_all()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
