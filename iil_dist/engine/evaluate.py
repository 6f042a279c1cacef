"""Exact evaluation across ranks: every sample counted once, whatever the per-rank counts."""

from __future__ import annotations

import torch
from torch import nn

from iil_dist.data.reader import SplitDataset, eval_batches
from iil_dist.engine.dist import all_reduce_sum, rank, world_size


@torch.no_grad()
def accuracies(
    models: dict[str, nn.Module], dataset: SplitDataset, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Top-1 accuracy in percent of each model on `dataset`.

    Each rank takes a strided share padded to the same number of batches (so layer-gathering
    forwards stay in step); padded positions are masked out and the correct/total counts are
    summed over all ranks.
    """
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    counts = torch.zeros(len(models) + 1, dtype=torch.float64, device=device)
    for inputs, labels, mask in eval_batches(dataset, rank=rank(), world_size=world_size(), batch_size=batch_size):
        inputs, labels, mask = inputs.to(device), labels.to(device), mask.to(device)
        for i, model in enumerate(models.values()):
            counts[i] += ((model(inputs).argmax(1) == labels) & mask).sum()
        counts[-1] += mask.sum()
    all_reduce_sum(counts)
    for name, m in models.items():
        m.train(was_training[name])
    total = counts[-1].item()
    if total != len(dataset):
        raise RuntimeError(f"evaluation counted {total:.0f} samples of {dataset.split}, expected {len(dataset)}")
    return {name: 100.0 * counts[i].item() / total for i, name in enumerate(models)}
