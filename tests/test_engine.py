"""The student engine on 2 gloo ranks: DeepSpeed's gradient clipping and the recorded gradient norm."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from iil_dist.config import from_dict
from iil_dist.engine.deepspeed_config import deepspeed_config
from iil_dist.engine.progress import grad_norm
from iil_dist.models import build_model


def _clip_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")  # fmt: skip
    import deepspeed

    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    results = {}
    try:
        for stage in (0, 1, 2):
            cfg = from_dict({}, [f"dist.zero_stage={stage}", "optim.grad_clip=0.01", "optim.batch_size=8"])
            torch.manual_seed(0)
            model = build_model("small_cnn", num_classes=10, in_channels=1)
            before = [p.detach().clone() for p in model.parameters()]
            # plain SGD with lr 1: the update is exactly the (clipped) all-reduced gradient
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(cfg, world)
            )
            torch.manual_seed(100 + rank)  # each rank its own batch: the gradient must be all-reduced
            x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            stage0_norm = grad_norm(engine.module) if stage == 0 else None
            engine.step()
            norm = stage0_norm if stage == 0 else engine.get_global_grad_norm()
            after = engine.module.parameters()
            step = torch.cat([(a - p.detach()).reshape(-1) for a, p in zip(before, after, strict=True)])
            results[stage] = (float(norm), float(step.norm()))
            engine.destroy()
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_gradient_clipping_and_norm_at_stages_0_1_2(tmp_path):
    """Guards against clipping silently off at a ZeRO stage (METHOD.md §5: dusted distillation diverges
    without it) and against a recorded gradient norm that is missing or already clipped."""
    out = tmp_path / "clip.pt"
    mp.spawn(_clip_worker, args=(2, free_port(), str(out)), nprocs=2)
    results = torch.load(out, weights_only=True)
    norms = [results[s][0] for s in (0, 1, 2)]
    for stage, (norm, update) in results.items():
        assert norm > 0.1, f"stage {stage}: the recorded norm {norm} is not the pre-clip norm"
        assert update == pytest.approx(0.01, rel=1e-3), f"stage {stage}: update norm {update}, clip is 0.01"
    # every stage all-reduces the same gradients, so it records the same norm
    assert max(norms) - min(norms) < 1e-4 * max(norms)
