"""Shards with random bytes flipped, read by both readers: every case either delivers every sample or stops
with a ValueError that names the shard; none hangs, crashes otherwise, or drops a sample silently.

The sha256 check before training catches every one of these shards (checked too); the readers are fuzzed
with it off, as they are when shards are streamed from storage that is not checksummed on the way.
"""

import random
import shutil
from pathlib import Path

import pytest

from iil_dist.data.reader import BadSample, SplitDataset, StreamingSplit
from iil_dist.data.shards import read_manifest, verify_shards

CASES = 240


def _flip(data: bytes, rng: random.Random) -> bytes:
    """1-8 random bytes changed: anywhere in the shard, or (half the cases) within its tar headers."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.5:
            pos = rng.randrange(len(out))
        else:  # a header block of one of the first members: names, sizes, checksums
            pos = 512 * rng.choice([0, 2, 4, 6]) + rng.randrange(512)
        out[pos] ^= rng.randint(1, 255)
    return bytes(out)


def _read_all(read) -> tuple[list | None, Exception | None]:  # noqa: ANN001
    try:
        return list(read()), None
    except Exception as err:  # noqa: BLE001 - the test classifies every exception
        return None, err


@pytest.mark.timeout(300)
def test_flipped_bytes_never_pass_silently(tiny_scenario: Path, tmp_path: Path) -> None:
    """Guards against a damaged shard that hangs a reader, escapes as an unexplained exception (KeyError,
    struct.error, ...), or yields fewer samples than the manifest lists without saying so."""
    copy = tmp_path / "scenario"
    shutil.copytree(tiny_scenario, copy)
    manifest = read_manifest(copy)
    entry = manifest["splits"]["phase-01"]
    shard = copy / entry["shards"][0]["file"]
    pristine = shard.read_bytes()
    expected = [label for _, label in SplitDataset(copy, "phase-01").iter_all()]
    rng = random.Random(0)
    outcomes = {"delivered": 0, "named": 0, "skipped": 0}
    for case in range(CASES):
        shard.write_bytes(_flip(pristine, rng))
        with pytest.raises(ValueError, match="sha256"):
            verify_shards(copy, manifest)
        readers = {
            f"{kind}-{on_error}": (
                lambda on_error=on_error: SplitDataset(copy, "phase-01", manifest, on_error=on_error).iter_all()
            ) if kind == "indexed" else (
                lambda on_error=on_error: StreamingSplit(
                    f"{copy}/{{file}}", "phase-01", manifest, on_error=on_error
                ).iter_all()
            )
            for kind in ("indexed", "streamed")
            for on_error in ("raise", "skip")
        }  # fmt: skip
        for name, read in readers.items():
            items, err = _read_all(read)
            if err is None:
                # delivered: every sample is there (a flipped label digit cannot be told from a real one;
                # only the checksum can, above), or under on_error=skip stands for by a BadSample naming it
                assert len(items) == len(expected), (case, name)
                bad = [item for item in items if isinstance(item, BadSample)]
                assert all(shard.name in b.shard and b.key for b in bad), (case, name)
                outcomes["delivered"] += not bad
                outcomes["skipped"] += bool(bad)
            else:
                assert isinstance(err, ValueError), (case, name, repr(err))
                assert shard.name in str(err), (case, name, str(err))
                outcomes["named"] += 1
    assert outcomes["named"] > CASES  # most damage is found by the readers themselves
    assert outcomes["skipped"] > 0  # some damage is to single samples, which on_error=skip passes over
