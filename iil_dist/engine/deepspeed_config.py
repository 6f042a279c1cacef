"""The DeepSpeed JSON of the student, derived from the one config tree."""

from __future__ import annotations

from typing import Any

from iil_dist.config import Config


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed settings for one phase's student engine.

    The optimizer and scheduler are torch objects handed to `deepspeed.initialize`, so DeepSpeed
    compiles no fused optimizer op. The engine always holds fp32 weights: `dist.precision=bf16` runs
    the forward passes under torch.autocast instead of DeepSpeed's bf16 mode, so the weights are their
    own fp32 masters, BatchNorm statistics stay fp32 and the EMA reads exact fp32 values (the price:
    gradients are all-reduced in fp32, twice the bytes of a bf16 all-reduce).
    """
    micro = cfg.optim.batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
