"""data.on_error=skip on real shards: a sample that cannot be decoded is skipped, counted, logged and
reported, never dropped silently; the ranks stay in step when a whole batch is bad; a broken shard still
stops the run. The default (raise) names the shard and key (tests/test_reader.py)."""

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_CONFIG, SHORT, finish_rank, init_rank, spawn

from iil_dist.data.reader import (
    BadSample,
    InMemorySplit,
    SampleDecodeError,
    SplitDataset,
    StreamingSplit,
    eval_batches,
    train_batches,
    train_indices,
)
from iil_dist.data.shards import file_sha256, read_manifest


def _spoil(scenario: Path, split: str, positions: list[int]) -> list[str]:
    """Overwrites the PNG bytes of the samples at `positions` of `split` (tar structure intact) and updates
    the manifest's checksums, as if the source images had been bad when the shards were written. Returns
    the spoilt keys."""
    manifest_path = scenario / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    keys = [f"{split}-{p:06d}" for p in positions]
    for shard in manifest["splits"][split]["shards"]:
        path = scenario / shard["file"]
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
        hit = [k for k in keys if f"{k}.png" in members]
        with open(path, "r+b") as f:
            for key in hit:
                f.seek(members[f"{key}.png"].offset_data)
                f.write(b"\x00" * 16)
        shard["sha256"] = file_sha256(path)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return keys


@pytest.fixture()
def spoilt(tiny_scenario: Path, tmp_path: Path) -> tuple[Path, list[int]]:
    copy = tmp_path / "scenario"
    shutil.copytree(tiny_scenario, copy)
    bad = sorted(np.random.default_rng(0).choice(337, size=60, replace=False).tolist())
    _spoil(copy, "phase-01", bad)
    return copy, bad


def _readers(root: Path, on_error: str) -> dict[str, object]:
    manifest = read_manifest(root)
    return {
        "indexed": SplitDataset(root, "phase-01", manifest, on_error=on_error),
        "streamed": StreamingSplit(f"{root}/{{file}}", "phase-01", manifest, on_error=on_error),
    }


@pytest.mark.parametrize("reader", ["indexed", "streamed"])
def test_bad_samples_are_skipped_counted_and_named(spoilt: tuple[Path, list[int]], reader: str) -> None:
    """Guards against a skipped sample that is not reported, a good one dropped with it, evaluation
    counting a bad sample, or ranks getting different batch counts."""
    root, bad_positions = spoilt
    bad_keys = {f"phase-01-{p:06d}" for p in bad_positions}
    with pytest.raises(SampleDecodeError, match=r"cannot decode sample 'phase-01-\d{6}' in shard .*phase-01-"):
        list(_readers(root, "raise")[reader].iter_all())

    split = _readers(root, "skip")[reader]
    items = list(split.iter_all())
    assert {b.key for b in items if isinstance(b, BadSample)} == bad_keys
    assert all(
        "cannot decode sample" in b.reason and b.shard.endswith(".tar") for b in items if isinstance(b, BadSample)
    )

    # evaluation over 2 ranks: every good sample counted once, every bad one reported, equal batch counts
    reported, counted, batch_counts = [], 0, []
    for rank in range(2):
        batches = list(eval_batches(split, rank=rank, world_size=2, batch_size=16, bad=reported))
        batch_counts.append(len(batches))
        counted += sum(int(mask.sum()) for _, _, mask in batches)
        assert all(len(x) == len(y) == len(mask) for x, y, mask in batches)
    assert len(set(batch_counts)) == 1
    assert counted == 337 - len(bad_keys) and {b.key for b in reported} == bad_keys

    # training over 2 ranks: batches of good samples only; the indexed reader's batches shrink, the stream
    # fills them from its next samples; either way each bad sample met is reported
    reported = []
    per_rank = [list(train_batches(split, epoch=1, seed=5, rank=r, world_size=2, batch_size=16, bad=reported))
                for r in range(2)]  # fmt: skip
    assert len(per_rank[0]) == len(per_rank[1])
    delivered = sum(len(y) for batches in per_rank for _, y, _ in batches)
    if reader == "indexed":
        shares = [np.concatenate(train_indices(337, epoch=1, seed=5, rank=r, world_size=2, batch_size=16))
                  for r in range(2)]  # fmt: skip
        met = {f"phase-01-{int(i):06d}" for i in np.concatenate(shares)} & bad_keys
        assert Counter(b.key for b in reported) == Counter(met)  # each met once per epoch, none invented
        assert delivered == 2 * (337 // 2) - len(met)
        for r, batches in enumerate(per_rank):
            got = np.concatenate([i.numpy() for _, _, i in batches])
            assert set(got.tolist()) == set(shares[r].tolist()) - {int(k[-6:]) for k in met}
    else:
        assert delivered == 2 * (337 // 2) and reported and {b.key for b in reported} <= bad_keys


def test_in_memory_split_leaves_bad_samples_out_once(spoilt: tuple[Path, list[int]]) -> None:
    """Guards against an in-memory split keeping a bad sample or forgetting that it left one out."""
    root, bad_positions = spoilt
    split = InMemorySplit(SplitDataset(root, "phase-01", on_error="skip"))
    assert len(split) == 337 - len(bad_positions)
    assert sorted(int(b.key[-6:]) for b in split.bad) == bad_positions


def test_a_batch_of_only_bad_samples_comes_out_empty_or_masked(spoilt: tuple[Path, list[int]]) -> None:
    """Guards against an all-bad batch crashing the collation, vanishing (ranks would fall out of step)
    or being counted in evaluation."""
    root, bad_positions = spoilt
    split = SplitDataset(root, "phase-01", on_error="skip")
    batches = list(train_batches(split, epoch=0, seed=1, rank=0, world_size=1, batch_size=1))
    assert len(batches) == 337 and sum(len(y) == 0 for _, y, _ in batches) == len(bad_positions)
    evals = list(eval_batches(split, rank=0, world_size=1, batch_size=1))
    assert len(evals) == 337
    placeholders = [(x, m) for x, _, m in evals if not m.any()]
    assert len(placeholders) == len(bad_positions) and all(x.shape == (1, 1, 16, 16) for x, _ in placeholders)


def test_broken_shard_is_not_skipped(spoilt: tuple[Path, list[int]]) -> None:
    """Guards against on_error=skip hiding a truncated shard, which would drop every sample after the cut."""
    root, _ = spoilt
    manifest = read_manifest(root)
    shard = root / manifest["splits"]["phase-01"]["shards"][0]["file"]
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[-2].offset
    shard.write_bytes(shard.read_bytes()[:cut] + b"\0" * 1024)
    for split in _readers(root, "skip").values():
        with pytest.raises(ValueError, match=r"phase-01-000000\.tar holds 149 samples, the manifest says 150"):
            list(split.iter_all())


def _worker(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    from iil_dist.config import load
    from iil_dist.engine import trainer

    init_rank(rank, world, port)
    cfg = load(REPO_CONFIG, [*SHORT, f"data.root={scenario}", "data.on_error=skip", "data.in_memory=false",
                             "optim.batch_size=2"])  # fmt: skip
    runner = trainer.PhaseRunner(cfg, Path(out))
    results = runner.run()
    if rank == 0:
        (Path(out) / "results.json").write_text(json.dumps(results))
    runner.teacher.destroy()
    finish_rank()


@pytest.mark.timeout(300)
def test_training_skips_bad_samples_on_every_rank_and_reports_them(
    spoilt: tuple[Path, list[int]], tmp_path: Path
) -> None:
    """Guards against bad samples stopping a run that asked to skip them, a step taken by some ranks only
    (an all-bad batch on one rank: the others would wait in a collective), or a report that miscounts.

    Two gloo ranks, real DeepSpeed; batches of 2, so that some batches hold only bad samples. The expected
    skipped steps and bad samples follow from the reader's own batch plan."""
    root, bad_positions = spoilt
    test_bad = _spoil(root, "test", [0, 7, 100])
    spawn(_worker, 2, str(root), str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    phases = results["phases"]

    bad = set(bad_positions)
    skipped_steps, met = 0, set()
    for epoch in (1, 2, 3):  # SHORT: 3 epochs per phase; phase 1 trains with seed cfg.seed + 1000
        plans = [train_indices(337, epoch=epoch, seed=1000, rank=r, world_size=2, batch_size=2) for r in range(2)]
        for batches in zip(*plans, strict=True):
            skipped_steps += any(set(b.tolist()) <= bad for b in batches)
            met |= {int(i) for b in batches for i in b} & bad
    assert [p["skipped_steps"] for p in phases] == [0, skipped_steps, 0] and skipped_steps > 0
    assert [p["bad_samples"] for p in phases] == [3, len(met) + 3, 3]
    listed = {(b["split"], b["key"]) for b in phases[1]["bad_sample_list"]}
    assert listed == {("test", k) for k in test_bad} | {("phase-01", f"phase-01-{i:06d}") for i in met}
    assert all(p["teacher"]["test_acc"] > 50 for p in phases)
