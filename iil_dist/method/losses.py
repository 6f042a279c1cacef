"""Loss terms of decision-boundary-aware distillation (METHOD.md §5) and of the baselines.

Pure torch: nothing here knows about Ray, DeepSpeed or the data pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def fused_labels(
    teacher_logits: torch.Tensor, labels: torch.Tensor, *, beta_inner: float, beta_outer: float, tau: float
) -> torch.Tensor:
    """Fuses the teacher's prediction with the one-hot label: (p_T + beta * onehot) / (1 + beta).

    beta is chosen per sample: `beta_inner` where the teacher is already right (inner samples),
    `beta_outer` where it is wrong (outer samples). Rows sum to one.
    """
    probs = F.softmax(teacher_logits.float() / tau, dim=1)
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    inner = teacher_logits.argmax(dim=1) == labels
    beta_by_sample = torch.tensor([beta_outer, beta_inner], dtype=probs.dtype, device=probs.device)
    beta = beta_by_sample[inner.long()].unsqueeze(1)
    return (probs + beta * onehot) / (1.0 + beta)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c targets_c * log softmax(logits)_c."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def dust(inputs: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Adds Gaussian noise of standard deviation `sigma` (in normalised input units)."""
    noise = torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype, device=inputs.device)
    return inputs + sigma * noise


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher/tau) || softmax(student/tau)), averaged over the batch."""
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / tau, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return tau * tau * kl


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module) -> Iterator[None]:
    """Makes BatchNorm layers normalise with, and not update, their running statistics.

    Used for the student's forward pass on dusted inputs: noise would otherwise pollute the
    running statistics, and batch statistics of noise give the student a function different from
    the eval-mode teacher it copies (METHOD.md §5 measures both failures). Gradients still flow.
    """
    changed = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.training]
    for m in changed:
        m.eval()
    try:
        yield
    finally:
        for m in changed:
            m.train()
