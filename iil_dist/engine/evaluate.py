"""Exact evaluation across ranks: every sample counted once, whatever the per-rank counts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from iil_dist.data.reader import BadSample, eval_batches
from iil_dist.engine.dist import all_reduce_sum, rank, world_size


@torch.no_grad()
def accuracies(
    models: dict[str, nn.Module],
    dataset: Any,
    batch_size: int,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    bad: list[BadSample] | None = None,
) -> dict[str, float]:
    """Top-1 accuracy in percent of each model on `dataset`.

    Each rank takes a share padded to the same number of batches (so layer-gathering forwards stay in
    step); padded positions are masked out and the correct/total counts are summed over all ranks.
    `prepare` turns a loader batch into model input on the device (and gives the device of the counts).
    Samples a dataset opened with on_error="skip" cannot decode are left out of the accuracy (the check
    that every sample was counted allows for them) and appended to `bad`.
    """
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    counts: torch.Tensor | None = None
    skipped: list[BadSample] = []
    batches = eval_batches(
        dataset, rank=rank(), world_size=world_size(), batch_size=batch_size, num_workers=num_workers,
        transform=transform, pin_memory=pin_memory, bad=skipped,
    )  # fmt: skip
    for images, labels, mask in batches:
        inputs = prepare(images)
        if counts is None:
            counts = torch.zeros(len(models) + 2, dtype=torch.float64, device=inputs.device)
        labels, mask = labels.to(inputs.device), mask.to(inputs.device)
        with autocast():
            for i, model in enumerate(models.values()):
                counts[i] += ((model(inputs).argmax(1) == labels) & mask).sum()
        counts[-2] += mask.sum()
    # the ranks' shares are disjoint; a padding copy of a bad sample repeats one of the rank's own
    unique = {(b.split, b.key): b for b in skipped}
    counts[-1] = len(unique)
    all_reduce_sum(counts)
    if bad is not None:
        bad.extend(unique.values())
    for name, m in models.items():
        m.train(was_training[name])
    total, skipped_total = counts[-2].item(), counts[-1].item()
    if total + skipped_total != len(dataset):
        raise RuntimeError(
            f"evaluation counted {total:.0f} samples of {dataset.split} and skipped {skipped_total:.0f}, "
            f"expected {len(dataset)}"
        )
    if total == 0:
        raise RuntimeError(f"evaluation of {dataset.split}: every sample was bad ({skipped_total:.0f} skipped)")
    return {name: 100.0 * counts[i].item() / total for i, name in enumerate(models)}
