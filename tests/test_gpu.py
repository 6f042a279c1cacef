"""The GPU path (nccl, bf16 autocast, channels_last, pinned memory, loader processes): skipped without CUDA.

Run on a GPU machine with `python -m pytest -q tests/test_gpu.py`. Each test guards a property that the
CPU tests cannot show: the precision rules hold on a real accelerator, and the teacher's EMA stays exact
in fp32 while the forward passes run in bf16.
"""

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = ["dist.use_gpu=true", "dist.precision=bf16", "dist.channels_last=true", "data.loader_workers=2"]


def _nccl_worker(rank: int, world: int, port: int, scenario: str, runs: str, stage: int) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), WANDB_MODE="disabled")  # fmt: skip
    os.environ.pop("DS_ACCELERATOR", None)
    import deepspeed
    import torch.distributed as dist
    from helpers import REPO_CONFIG, SHORT

    from iil_dist.config import load
    from iil_dist.engine.trainer import PhaseRunner

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="nccl")
    cfg = load(REPO_CONFIG, [*SHORT, *GPU, f"data.root={scenario}", f"dist.zero_stage={stage}"])
    runner = PhaseRunner(cfg, Path(runs))
    results = runner.run()
    if rank == 0:
        teacher = runner.teacher.module
        dtypes = sorted({str(t.dtype) for t in [*teacher.parameters(), *teacher.buffers()] if t.is_floating_point()})
        Path(runs, "gpu.json").write_text(json.dumps({"phases": results["phases"], "dtypes": dtypes}))
    runner.teacher.destroy()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_run_keeps_fp32_teacher(tmp_path, tiny_scenario, stage):
    """Guards against bf16 leaking into the weights, BatchNorm statistics or the EMA teacher (increments
    of (1 - alpha) x difference round to zero in bf16), and against the nccl path failing at ZeRO-0 or -3."""
    from helpers import spawn

    spawn(_nccl_worker, 1, str(tiny_scenario), str(tmp_path), stage)
    record = json.loads((tmp_path / "gpu.json").read_text())
    assert record["dtypes"] == ["torch.float32"]
    assert [p["phase"] for p in record["phases"]] == [0, 1, 2]
    assert record["phases"][-1]["teacher"]["test_acc"] > 20.0  # learnt something: 10 classes, chance is 10


def test_imagenet_resnets_bf16_channels_last_step():
    """Guards against the ImageNet models failing under bf16 autocast with channels_last inputs at 224 px."""
    from iil_dist.data.augment import normalize
    from iil_dist.models import build_model

    for name in ("resnet18", "resnet50"):
        model = build_model(name, num_classes=100, in_channels=3).cuda()  # contiguous, as the engine keeps it
        images = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, device="cuda")
        x = normalize(images, [0.5] * 3, [0.25] * 3, channels_last=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
