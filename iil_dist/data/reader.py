"""Reading a prepared scenario: even training shares per rank and exact evaluation, from local shards
(indexed) or from any URL (streamed).

Collectives hang unless every rank runs the same number of steps, and PP / F are exact numbers only if
evaluation sees every sample once. Two readers give both:

- `SplitDataset` (indexed, the default): random access through wids' `IndexedTarSamples` (an mmap index
  of the tar members). Training gives each rank N // world_size samples of a per-epoch permutation (the
  at most world_size - 1 left-over samples differ every epoch); evaluation pads the ranks' strided shares
  to equal length and masks the padding. Needs a seekable file system (local disk or a shared mount).
- `StreamingSplit` (`data.shard_url`): sequential reading of whole shards through any URL WebDataset's
  `gopen` opens (`pipe:`, http) or fsspec (`s3://`, `gs://`, ...). Each (rank, loader process) slot reads
  its own shards of a per-epoch shard permutation, cycling through them until it has its fixed quota of
  N // world_size samples per rank (a shard may be read again in an epoch and a few samples skipped:
  the price of streaming). Evaluation gives rank r the shards r, r + world_size, ...; the batch count of
  every rank follows from the manifest's per-shard counts, so the ranks pad to the same count without
  communicating. Needs at least world_size x loader processes shards.

Samples come out as uint8 tensors (C, H, W): decoding and augmentation run in the loader processes and
normalisation runs on the training device (`iil_dist.data.augment.normalize`), so a batch crosses the
process boundary and the host-to-device copy at a quarter of the float32 size. wids' `ShardListDataset`
is not used: it copies shards into a cache directory or creates lock files beside them (fails on
read-only shared storage) and prints to stderr on every construction.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from wids.wids import IndexedTarSamples

from iil_dist.data.shards import key_position, read_manifest, storage_order

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Transform = Callable[..., torch.Tensor]


class SampleDecodeError(ValueError):
    """A sample whose image or label cannot be decoded; the message names the shard and the key."""


@dataclass(frozen=True)
class BadSample:
    """A sample skipped under `data.on_error=skip`: where it is and why it could not be decoded. Readers
    return it in place of the sample; batches drop it and hand it on, so every skip is counted."""

    split: str
    key: str
    shard: str
    reason: str


def _on_error(value: str) -> str:
    if value not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {value!r}")
    return value


class SampleDecoder:
    """Turns a sample's members (`cls` and `png` or `jpg` bytes) into (uint8 (C, H, W), label)."""

    def __init__(self, manifest: dict) -> None:
        self.num_classes = int(manifest["num_classes"])
        self.channels = int(manifest["channels"])
        # a fixed image_size means every stored image has that size; 0 means the sizes vary
        self.image_size = 0 if manifest.get("max_side") else int(manifest["image_size"])
        self._mode = "L" if self.channels == 1 else "RGB"

    def __call__(self, members: dict[str, bytes], key: str | None, where: Any) -> tuple[torch.Tensor, int]:
        # anything the image or label decoders raise means the same thing to the caller: this sample is
        # broken; say where it is, never skip it silently
        try:
            data = members.get("png", members.get("jpg"))
            if data is None:
                raise ValueError(f"no png or jpg member, only {sorted(members)}")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                # sources keep some images in other modes (CMYK or grayscale JPEGs in ImageNet)
                pixels = np.array(image if image.mode == self._mode else image.convert(self._mode))
            if self.image_size and pixels.shape[:2] != (self.image_size, self.image_size):
                raise ValueError(f"image size {pixels.shape[1::-1]}, expected {self.image_size}")
            label = int(members["cls"].decode("ascii"))
            if not 0 <= label < self.num_classes:
                raise ValueError(f"label {label} outside 0..{self.num_classes - 1}")
        except Exception as exc:
            raise SampleDecodeError(f"cannot decode sample {key!r} in shard {where}: {exc!r}") from exc
        x = torch.from_numpy(pixels)
        return (x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()), label


class SplitDataset:
    """Indexed access to one split of a prepared scenario, normalised with the manifest's statistics."""

    def __init__(
        self, scenario_dir: Path, split: str, manifest: dict | None = None, max_open_shards: int = 64,
        on_error: str = "raise",
    ) -> None:  # fmt: skip
        """Open `split` of the scenario in `scenario_dir`; the manifest is read from there unless given.
        `on_error="skip"` returns a `BadSample` for a sample that cannot be decoded instead of raising."""
        self.scenario_dir = Path(scenario_dir)
        self.on_error = _on_error(on_error)
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

        self._decoder = SampleDecoder(self.manifest)
        self.num_classes = self._decoder.num_classes
        self.channels = self._decoder.channels
        self.image_size = self._decoder.image_size  # 0: the stored sizes vary
        self._max_open_shards = max_open_shards
        self._open: OrderedDict[int, IndexedTarSamples] = OrderedDict()
        # where each position is stored (see shards.storage_order); None: in position order
        self._place: np.ndarray | None = None
        if self.manifest.get("storage", "sequential") == "shuffled":
            order = storage_order(int(self.manifest["split_seed"]), split, self._num_samples)
            self._place = np.empty_like(order)
            self._place[order] = np.arange(len(order))

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | BadSample:
        """Sample `i` (its position in the split): uint8 (C, H, W) and its label (or, under on_error="skip", a
        BadSample)."""
        if not -self._num_samples <= i < self._num_samples:
            raise IndexError(f"index {i} out of range for split {self.split!r} of {self._num_samples} samples")
        i %= self._num_samples
        return self.stored(i if self._place is None else int(self._place[i]))

    def stored(self, i: int) -> tuple[torch.Tensor, int] | BadSample:
        """The sample at place `i` of the split's shards (shard by shard, member by member)."""
        shard_id = int(np.searchsorted(self._shard_ends, i, side="right"))
        inner = i - (int(self._shard_ends[shard_id - 1]) if shard_id else 0)
        # a shard that cannot be indexed, or holds another count than the manifest says, is always an
        # error: skipping it would drop every sample in it
        sample = self._shard(shard_id)[inner]
        key = sample.get("__key__")
        where = self._shard_paths[shard_id]
        try:
            if not key or "/" in key or ".." in key:
                raise SampleDecodeError(f"shard {where}: sample {inner} has the key {key!r}, not a plain sample name")
            members = {ext.lstrip("."): value.read() for ext, value in sample.items() if ext.startswith(".")}
            return self._decoder(members, key, where)
        except SampleDecodeError as exc:
            if self.on_error == "raise":
                raise
            return BadSample(self.split, str(key if key else f"#{inner}"), str(where), str(exc))

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

    def iter_all(self) -> Iterator[tuple[torch.Tensor, int] | BadSample]:
        """Every sample in split order."""
        return (self[i] for i in range(len(self)))

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


# Loader processes are forked, whatever the rank's own start method: a rank started by spawn (torchrun
# helpers, tests) would otherwise spawn them too, re-importing torch for ~1.5 s per loader and epoch.
# They touch no CUDA state, so forking a rank that uses a GPU is safe.
_LOADER_CONTEXT = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


Item = tuple[torch.Tensor, int] | BadSample
# a collated batch: images, labels, which of the requested positions they are (bad samples are dropped),
# and the bad samples
Collated = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[BadSample]]


def _collate(items: list[Item]) -> Collated:
    bad = [item for item in items if isinstance(item, BadSample)]
    keep = torch.tensor([not isinstance(item, BadSample) for item in items], dtype=torch.bool)
    good = [item for item in items if not isinstance(item, BadSample)]
    if not good:  # every sample of the batch was bad: an empty batch the caller must handle
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), keep, bad
    images, labels = zip(*good, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), keep, bad


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation: a function of (seed, epoch, sample), so the same crops come out
    whichever rank or loader process reads the sample, and a resumed run draws them again."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class _Transformed:
    """A split seen through a per-sample transform (picklable: loader processes build their own)."""

    def __init__(self, dataset: Any, transform: Transform | None, seed: int | None, epoch: int) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Item:
        item = self.dataset[i]
        if isinstance(item, BadSample):
            return item
        image, label = item
        if self.transform is None:
            return image, label
        if self.seed is None:  # a deterministic (evaluation) transform
            return self.transform(image), label
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i))
        return self.transform(image, generator), label


def _load(dataset: Any, batches: list[np.ndarray], num_workers: int, pin_memory: bool) -> Iterator[Collated]:
    index_lists = [[int(i) for i in batch] for batch in batches]
    if num_workers == 0:
        for batch in index_lists:
            yield _collate([dataset[i] for i in batch])
        return
    loader = DataLoader(
        dataset, batch_sampler=index_lists, num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory,
        multiprocessing_context=_LOADER_CONTEXT,
    )  # fmt: skip
    yield from loader


def train_batches(
    dataset: Any,
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int = 0,
    transform: Transform | None = None,
    pin_memory: bool = False,
    bad: list[BadSample] | None = None,
) -> Iterator[Batch]:
    """This rank's training batches (x uint8, y, sample indices) of `epoch`; every rank yields the same
    count. `transform(image, generator)` augments each sample with a generator seeded per sample.

    A dataset opened with on_error="skip" drops its bad samples from their batches and appends them to
    `bad`; a batch whose every sample is bad comes out empty (zero rows), and the caller decides.
    """
    if len(dataset) < world_size:
        name = getattr(dataset, "split", "?")
        raise ValueError(f"split {name} has {len(dataset)} samples, fewer than world_size {world_size}")
    if isinstance(dataset, StreamingSplit):
        yield from dataset.train_batches(
            epoch=epoch, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size,
            num_workers=num_workers, transform=transform, pin_memory=pin_memory, bad=bad,
        )  # fmt: skip
        return
    batches = train_indices(
        len(dataset), epoch=epoch, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size
    )
    view = _Transformed(dataset, transform, seed, epoch)
    for indices, (x, y, keep, skipped) in zip(batches, _load(view, batches, num_workers, pin_memory), strict=True):
        _collect(bad, skipped)
        yield x, y, torch.from_numpy(indices)[keep]


def eval_batches(
    dataset: Any,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int = 0,
    transform: Transform | None = None,
    pin_memory: bool = False,
    bad: list[BadSample] | None = None,
) -> Iterator[Batch]:
    """This rank's evaluation batches (x uint8, y, mask); over all ranks, mask True marks every sample once,
    and every rank yields the same number of batches. Bad samples (on_error="skip") are dropped and
    appended to `bad` (a padding copy of one may come twice); a batch left empty is replaced by one masked
    placeholder image, so that every rank still runs the same forwards."""
    if isinstance(dataset, StreamingSplit):
        yield from dataset.eval_batches(
            rank=rank, world_size=world_size, batch_size=batch_size, num_workers=num_workers,
            transform=transform, pin_memory=pin_memory, bad=bad,
        )  # fmt: skip
        return
    batches = eval_indices(len(dataset), rank=rank, world_size=world_size, batch_size=batch_size)
    index_batches = [indices for indices, _ in batches]
    # evaluation counts each sample once, in whatever order: by place, the shards are read one after another
    view = _Transformed(_StoredOrder(dataset) if isinstance(dataset, SplitDataset) else dataset, transform, None, 0)
    shape = None
    for (_, mask), (x, y, keep, skipped) in zip(
        batches, _load(view, index_batches, num_workers, pin_memory), strict=True
    ):
        _collect(bad, skipped)
        if len(y):
            shape = x.shape[1:]
            yield x, y, torch.from_numpy(mask)[keep]
        else:
            yield _placeholder_batch(shape or _image_shape(dataset, transform))


class _StoredOrder:
    """A SplitDataset indexed by place in its shards rather than by position."""

    def __init__(self, dataset: SplitDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Item:
        return self.dataset.stored(i)


def _collect(bad: list[BadSample] | None, skipped: list[BadSample]) -> None:
    if bad is not None:
        bad.extend(skipped)
    for item in skipped if bad is None else ():
        logger.warning("skipped bad sample %s of split %s in %s: %s", item.key, item.split, item.shard, item.reason)


def _image_shape(dataset: Any, transform: Transform | None) -> tuple[int, ...]:
    size = getattr(transform, "size", 0) or getattr(dataset, "image_size", 0)
    if not size:
        raise SampleDecodeError(
            f"every sample of an evaluation batch of split {dataset.split} is bad and the image size is unknown"
        )
    return (dataset.channels, size, size)


def _placeholder_batch(shape: tuple[int, ...]) -> Batch:
    masked = torch.zeros(1, dtype=torch.bool)
    return torch.zeros((1, *shape), dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), masked


class InMemorySplit:
    """A split decoded once and kept in memory as uint8: indexed like SplitDataset, for small datasets."""

    def __init__(self, dataset: Any) -> None:
        self.split = dataset.split
        self.channels, self.image_size = dataset.channels, dataset.image_size
        # bad samples (a dataset opened with on_error="skip") are left out once, here, and kept for the report
        self.images, labels, self.bad = [], [], []
        for item in dataset.iter_all():
            if isinstance(item, BadSample):
                self.bad.append(item)
                continue
            self.images.append(item[0])
            labels.append(item[1])
        if not labels:
            raise SampleDecodeError(f"split {self.split}: every sample is bad ({len(self.bad)} skipped)")
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def open_url(url: str) -> Any:
    """A readable binary stream of `url`: WebDataset's gopen (local paths, pipe:, http(s), gs via gsutil),
    or fsspec for any other scheme it knows (s3://, az://, ...; their packages must be installed)."""
    from urllib.parse import urlparse

    from webdataset.gopen import gopen, gopen_schemes

    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def iter_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of every sample of a shard, read sequentially from `url`."""
    stream = open_url(url)
    try:
        key, members = None, {}
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                if "/" in name or ".." in name:
                    raise ValueError(f"shard {url}: member name {name!r} is not a plain sample file")
                stem, _, ext = name.partition(".")
                if stem != key:
                    if key is not None:
                        yield key, members
                    key, members = stem, {}
                members[ext] = tar.extractfile(member).read()
        if key is not None:
            yield key, members
    except tarfile.TarError as exc:
        raise ValueError(f"shard {url} is not a readable tar stream: {exc!r}") from exc
    finally:
        stream.close()


class _StreamSlots(IterableDataset):
    """Loader-process side of StreamingSplit: each process reads the shards of its slot and yields batches."""

    def __init__(self, split: StreamingSplit, plans: list[dict[str, Any]], transform: Transform | None) -> None:
        self.split, self.plans, self.transform = split, plans, transform

    def __iter__(self) -> Iterator[Collated]:
        info = torch.utils.data.get_worker_info()
        plan = self.plans[info.id if info is not None else 0]
        yield from self.split.slot_batches(plan, self.transform)


class ConcatSplit:
    """Several indexed splits read as one, e.g. D(0) + ... + D(t) for the joint baseline."""

    def __init__(self, parts: list[Any], name: str) -> None:
        self.parts, self.split = parts, name
        self._ends = np.cumsum([len(p) for p in parts])
        self.channels, self.image_size = parts[0].channels, parts[0].image_size
        self.bad = [b for p in parts for b in getattr(p, "bad", [])]

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, i: int) -> Item:
        part = int(np.searchsorted(self._ends, i, side="right"))
        return self.parts[part][i - (int(self._ends[part - 1]) if part else 0)]

    def iter_all(self) -> Iterator[Item]:
        for part in self.parts:
            yield from (part[i] for i in range(len(part)))


_WARNED_SEQUENTIAL: set[str] = set()


class StreamingSplit:
    """Split(s) read by streaming whole shards from `url_template.format(file=...)` (see the module doc);
    a list of split names reads them as one."""

    def __init__(
        self, url_template: str, split: str | list[str], manifest: dict, shuffle_buffer: int = 2000,
        on_error: str = "raise",
    ) -> None:  # fmt: skip
        self.on_error = _on_error(on_error)
        names = [split] if isinstance(split, str) else list(split)
        for name in names:
            if name not in manifest["splits"]:
                raise ValueError(f"split {name!r} is not in the manifest; it has {list(manifest['splits'])}")
        self.split = "+".join(names)
        self.url_template = url_template
        entries = [manifest["splits"][name] for name in names]
        self.shards = [
            (url_template.format(file=s["file"]), int(s["num_samples"])) for e in entries for s in e["shards"]
        ]
        self._num_samples = sum(int(e["num_samples"]) for e in entries)
        self._decoder = SampleDecoder(manifest)
        self.channels = self._decoder.channels
        self.image_size = self._decoder.image_size
        self.shuffle_buffer = shuffle_buffer
        self._names = names
        self._shuffled = manifest.get("storage", "sequential") == "shuffled"
        if not self._shuffled and url_template not in _WARNED_SEQUENTIAL:
            _WARNED_SEQUENTIAL.add(url_template)
            logger.warning(
                "the shards at %s were written in position order (before shuffled storage): a stream mixes only the "
                "classes its shuffle buffer holds; prepare the scenario again with --force for shards of mixed "
                "classes", url_template,
            )  # fmt: skip

    def __len__(self) -> int:
        return self._num_samples

    def _samples(self, shard: int) -> Iterator[tuple[torch.Tensor, int, str] | BadSample]:
        url, expected = self.shards[shard]
        count = 0
        # a shard that breaks off or holds another count than the manifest says is always an error; a
        # sample that cannot be decoded is one under on_error="raise", else it comes out as a BadSample
        for key, members in iter_tar_samples(url):
            count += 1
            try:
                image, label = self._decoder(members, key, url)
            except SampleDecodeError as exc:
                if self.on_error == "raise":
                    raise
                yield BadSample(self.split, key, url, str(exc))
                continue
            yield image, label, key
        if count != expected:
            raise ValueError(f"shard {url} holds {count} samples, the manifest says {expected} (truncated?)")

    def iter_all(self) -> Iterator[Item]:
        """Every sample once, in position order (split by split), as SplitDataset.iter_all gives them: shuffled
        storage is read whole and sorted by the keys' positions, so this is for splits that fit in memory."""
        samples = (sample for shard in range(len(self.shards)) for sample in self._samples(shard))
        if not self._shuffled:
            yield from (sample if isinstance(sample, BadSample) else sample[:2] for sample in samples)
            return

        def position(sample: tuple[torch.Tensor, int, str] | BadSample) -> tuple[int, int]:
            named = key_position(sample.key if isinstance(sample, BadSample) else sample[2])
            known = named is not None and named[0] in self._names
            return (self._names.index(named[0]), named[1]) if known else (len(self._names), 0)

        for sample in sorted(samples, key=position):
            yield sample if isinstance(sample, BadSample) else sample[:2]

    def _slots(self, world_size: int, num_workers: int) -> int:
        slots = world_size * max(1, num_workers)
        if len(self.shards) < slots:
            raise ValueError(
                f"split {self.split} has {len(self.shards)} shards, fewer than ranks x loader processes ({slots}); "
                "write smaller shards (data.shard_size_mb, data.samples_per_shard) or use fewer data.loader_workers"
            )
        return slots

    def train_batches(self, *, epoch: int, seed: int, rank: int, world_size: int, batch_size: int,
                      num_workers: int, transform: Transform | None, pin_memory: bool,
                      bad: list[BadSample] | None = None) -> Iterator[Batch]:  # fmt: skip
        slots = self._slots(world_size, num_workers)
        workers = max(1, num_workers)
        order = np.random.default_rng([seed, epoch]).permutation(len(self.shards))
        quota = self._num_samples // world_size
        plans = []
        for w in range(workers):
            slot = rank * workers + w
            share = quota // workers + (w < quota % workers)
            plans.append({"shards": order[slot::slots].tolist(), "quota": share, "batch_size": batch_size,
                          "seed": [seed, epoch, slot], "epoch": epoch, "base_seed": seed, "train": True})  # fmt: skip
        # a bad sample is replaced by the stream's next one, so training batches never come out short
        for x, y, _, skipped in self._run(plans, transform, num_workers, pin_memory):
            _collect(bad, skipped)
            yield x, y, torch.full((len(y),), -1, dtype=torch.int64)  # stream positions are not tracked

    def eval_batches(self, *, rank: int, world_size: int, batch_size: int, num_workers: int,
                     transform: Transform | None, pin_memory: bool,
                     bad: list[BadSample] | None = None) -> Iterator[Batch]:  # fmt: skip
        workers = max(1, num_workers)

        def plan(r: int, w: int) -> list[int]:
            return list(range(len(self.shards)))[r::world_size][w::workers]

        def num_batches(r: int) -> int:
            return sum(math.ceil(sum(self.shards[s][1] for s in plan(r, w)) / batch_size) for w in range(workers))

        plans = [{"shards": plan(rank, w), "batch_size": batch_size, "train": False} for w in range(workers)]
        produced, shape = 0, None
        for x, y, _, skipped in self._run(plans, transform, num_workers, pin_memory):
            _collect(bad, skipped)
            produced += 1
            if len(y):
                shape = x.shape[1:]
                yield x, y, torch.ones(len(y), dtype=torch.bool)
            else:
                yield _placeholder_batch(shape or _image_shape(self, transform))
        # pad to the largest rank's batch count, known to every rank from the manifest
        for _ in range(max(num_batches(r) for r in range(world_size)) - produced):
            yield _placeholder_batch(shape or _image_shape(self, transform))

    def _run(self, plans: list[dict[str, Any]], transform: Transform | None, num_workers: int,
             pin_memory: bool) -> Iterator[Collated]:  # fmt: skip
        if num_workers == 0:
            yield from self.slot_batches(plans[0], transform)
            return
        slots = _StreamSlots(self, plans, transform)
        yield from DataLoader(
            slots, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            multiprocessing_context=_LOADER_CONTEXT,
        )  # fmt: skip

    def slot_batches(self, plan: dict[str, Any], transform: Transform | None) -> Iterator[Collated]:
        """The batches of one slot: its training quota (cycling over its shards, shuffled through a buffer)
        or, for evaluation, every sample of its shards once. Bad samples (on_error="skip") ride along with
        the batch after which they were met."""
        batch_size = plan["batch_size"]
        if not plan["train"]:
            items = (
                sample if isinstance(sample, BadSample) else
                (transform(sample[0]) if transform is not None else sample[0], sample[1])
                for shard in plan["shards"]
                for sample in self._samples(shard)
            )  # fmt: skip
            yield from _batched(items, batch_size)
            return
        quota = plan["quota"]
        if quota == 0:
            return
        rng = np.random.default_rng(plan["seed"])
        slot_samples = sum(self.shards[s][1] for s in plan["shards"])
        pending: list[BadSample] = []

        def endless() -> Iterator[tuple[torch.Tensor, int, str]]:
            in_a_row = 0
            while True:
                for shard in rng.permutation(plan["shards"]):
                    for sample in self._samples(int(shard)):
                        if isinstance(sample, BadSample):
                            pending.append(sample)
                            in_a_row += 1
                            # a whole pass over the slot's shards without a good sample: cycling would never end
                            if in_a_row > slot_samples:
                                raise SampleDecodeError(
                                    f"split {self.split}: every sample of the shards {plan['shards']} is bad"
                                )
                            continue
                        in_a_row = 0
                        yield sample

        # never wait for more samples than the slot's shards hold or its quota needs
        buffer_size = min(self.shuffle_buffer, quota, slot_samples)
        # the first batches come from a small buffer, which then grows by one sample per sample given out:
        # an epoch starts after a few batches' decoding rather than a whole buffer's (the shards themselves
        # are stored shuffled, so a small buffer is already mixed)
        initial = min(buffer_size, 4 * batch_size)

        def augmented() -> Iterator[tuple[torch.Tensor, int]]:
            buffer: list[tuple[torch.Tensor, int, str]] = []
            source = endless()
            for sample in source:
                buffer.append(sample)
                if len(buffer) < buffer_size and len(buffer) >= initial:
                    buffer.append(next(source))
                if len(buffer) < initial:
                    continue
                image, label, key = buffer.pop(int(rng.integers(len(buffer))))
                yield self._augment(image, key, plan, transform), label

        # near-equal batches, as the indexed reader cuts them
        sizes = [len(b) for b in np.array_split(np.arange(quota), math.ceil(quota / batch_size))]
        stream = augmented() if buffer_size > 1 else (
            (self._augment(i, k, plan, transform), lbl) for i, lbl, k in endless()
        )  # fmt: skip
        for size in sizes:
            x, y, keep, _ = _collate([next(stream) for _ in range(size)])
            yield x, y, keep, pending.copy()
            pending.clear()

    def _augment(
        self, image: torch.Tensor, key: str, plan: dict[str, Any], transform: Transform | None
    ) -> torch.Tensor:
        if transform is None:
            return image
        position = int(key.rsplit("-", 1)[-1])
        generator = torch.Generator().manual_seed(sample_seed(plan["base_seed"], plan["epoch"], position))
        return transform(image, generator)


def _batched(items: Iterator[Item], batch_size: int) -> Iterator[Collated]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield _collate(batch)
            batch = []
    if batch:
        yield _collate(batch)
