"""Multi-process gloo tests of the engine's collectives: exact evaluation and rank agreement."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from iil_dist.data.reader import InMemorySplit, SplitDataset
from iil_dist.engine.dist import average_buffers_, check_same_on_all_ranks
from iil_dist.engine.evaluate import accuracies
from iil_dist.models import build_model


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", num_classes=10, in_channels=1).eval()


def _as_input(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def _eval_worker(rank: int, world: int, port: int, scenario: str, split: str, batch: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        dataset = SplitDataset(Path(scenario), split)
        accs = accuracies({"a": _model(0), "b": _model(1)}, dataset, batch, _as_input)
        if rank == 0:
            torch.save(accs, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("world", "batch"), [(2, 64), (3, 50)])
def test_evaluation_counts_every_sample_once_across_ranks(tmp_path, tiny_scenario, world, batch):
    """Guards against uneven per-rank shares hanging or double-counting in evaluation."""
    split = "phase-01"  # an odd-sized split: the ranks' shares differ
    dataset = SplitDataset(tiny_scenario, split)
    assert len(dataset) % world != 0
    want = accuracies({"a": _model(0), "b": _model(1)}, InMemorySplit(dataset), 1000, _as_input)
    out = tmp_path / "accs.pt"
    mp.spawn(_eval_worker, args=(world, free_port(), str(tiny_scenario), split, batch, str(out)), nprocs=world)
    got = torch.load(out, weights_only=True)
    assert got == pytest.approx(want, abs=1e-9)


def _agreement_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model(0).train()
        model(torch.randn(8, 1, 16, 16) * (rank + 1))  # BatchNorm statistics now differ by rank
        with pytest.raises(RuntimeError, match="differs between ranks"):
            check_same_on_all_ranks(model.state_dict(), "model")
        average_buffers_(model)
        digest = check_same_on_all_ranks(model.state_dict(), "model")
        if rank == 0:
            Path(out).write_text(digest)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_buffer_averaging_makes_ranks_agree(tmp_path):
    """Guards against ranks deploying different BatchNorm statistics, and a check that cannot fail."""
    out = tmp_path / "digest"
    mp.spawn(_agreement_worker, args=(2, free_port(), str(out)), nprocs=2)
    assert len(out.read_text()) == 16
