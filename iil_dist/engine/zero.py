"""ZeRO helpers: whole state dicts from partitioned modules and the student's fp32 master values.

Under ZeRO stage 3 a module's parameters are placeholders; each rank holds a slice in
`param.ds_tensor`. These helpers hide that difference from the phase loop, so the same code
handles stages 0-3 and a plain module in one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_partitioned(module: nn.Module) -> bool:
    """Whether the module's parameters are ZeRO-3 partitions (DeepSpeed marks them with `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@torch.no_grad()
def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a whole fp32/int CPU tensor, on every rank.

    Under ZeRO-3 this is a collective (one all-gather per parameter, so no rank ever holds the whole
    model on its device at once); every rank must call it.
    """
    if not is_partitioned(module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.detach().cpu().clone()
    for name, buf in module.named_buffers():
        out[name] = buf.detach().cpu().clone()
    # the module's own key order, so that fingerprints and saved files do not depend on the stage
    return {k: out[k] for k in module.state_dict().keys() if k in out}


@torch.no_grad()
def load_full_state_dict_(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads a whole state dict into a plain or ZeRO-3 module, without communication.

    Under ZeRO-3 each rank copies its own slice of every parameter from the whole tensor, using the
    partition layout DeepSpeed gave it (slice `rank` of the flattened, zero-padded parameter).
    """
    missing = set(module.state_dict().keys()) ^ set(state)
    if missing:
        raise ValueError(f"state dict does not match the model: keys {sorted(missing)[:5]} differ")
    if not is_partitioned(module):
        module.load_state_dict(state)
        return
    for name, param in module.named_parameters():
        part = param.ds_tensor
        flat = state[name].reshape(-1).to(part.device, part.dtype)
        start = part.numel() * _partition_rank(param)
        piece = flat[start : start + part.numel()]
        part.zero_()
        part.narrow(0, 0, piece.numel()).copy_(piece)
    for name, buf in module.named_buffers():
        buf.copy_(state[name])


def _partition_rank(param: Any) -> int:
    import torch.distributed as dist

    group = getattr(param, "ds_process_group", None)
    return dist.get_rank(group=group)


def student_fp32_sources(engine: Any) -> list[torch.Tensor]:
    """The tensors a consolidation reads from the student, one per parameter, in fp32.

    Stage 3: this rank's slice of the fp32 master partition (no communication). Stages 0-2: the
    module's whole parameters, which every rank holds after the optimizer step; they are fp32 in every
    precision (bf16 is autocast, see engine/deepspeed_config.py).
    """
    module = engine.module
    if is_partitioned(module):
        from deepspeed.utils import safe_get_local_fp32_param

        return [safe_get_local_fp32_param(p) for p in module.parameters()]
    return [p.detach() for p in module.parameters()]


def local_partitions(module: nn.Module) -> list[torch.Tensor]:
    """This rank's slice of every parameter (stage 3), or the whole parameters (plain module)."""
    if is_partitioned(module):
        return [p.ds_tensor for p in module.parameters()]
    return [p.data for p in module.parameters()]
