"""The per-batch objective of each method: a dict of named losses with the total under `loss`.

Fine-tuning, joint training and the mean teacher's student use `base_losses`; LwF distils to the
phase-start model (`lwf_losses`); DBD is `dbd_losses`.

The student is anything callable on a batch (a DeepSpeed engine or a plain module); the target
model (teacher or phase-start copy) runs frozen under `torch.no_grad()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iil_dist.config import MethodConfig
from iil_dist.method.losses import distillation_kl, dust, frozen_batchnorm, fused_labels, soft_cross_entropy


def base_losses(student: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Phase 0 and fine-tuning: plain cross-entropy on the labels."""
    ce = F.cross_entropy(student(inputs).float(), labels)
    return {"loss": ce, "ce": ce}


def dbd_losses(
    student: nn.Module,
    target: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    cfg: MethodConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Decision-boundary-aware distillation (METHOD.md §5): L = L_FL + lambda * L_DIS.

    The ablations switch terms off: with `fused_label` off there is no label term at all (the "DIS only"
    ablation learns nothing from the labels), with `dusting` off no distillation term. `student` may be a
    DeepSpeed engine; its `.module` holds the layers.
    """
    losses: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=inputs.device)

    # label term: fused labels keep the teacher's view of the other classes
    if cfg.fused_label:
        logits = student(inputs)
        with torch.no_grad():
            target_logits = target(inputs)
        soft = fused_labels(
            target_logits, labels, beta_inner=cfg.beta_inner, beta_outer=cfg.beta_outer, tau=cfg.tau_fuse
        )
        losses["fl"] = soft_cross_entropy(logits, soft)
        losses["outer_frac"] = (target_logits.argmax(1) != labels).float().mean().detach()
        total = losses["fl"]
    else:
        # no label term, but BatchNorm's running statistics still follow the clean new data
        with torch.no_grad():
            student(inputs)

    # dusted-input distillation: the student copies the teacher where noise pushes samples
    # across the old boundary; its BatchNorm uses (and keeps) the clean running statistics
    if cfg.dusting:
        dusted = dust(inputs, cfg.sigma, generator)
        with torch.no_grad():
            target_dusted = target(dusted)
        with frozen_batchnorm(getattr(student, "module", student)):
            student_dusted = student(dusted)
        losses["dis"] = distillation_kl(student_dusted, target_dusted, cfg.tau_distill)
        total = total + cfg.lambda_dis * losses["dis"]

    losses["loss"] = total
    return losses


def lwf_losses(
    student: nn.Module, old_model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, cfg: MethodConfig
) -> dict[str, torch.Tensor]:
    """Learning without forgetting (Li & Hoiem): cross-entropy on the labels plus distillation to the
    phase-start model on the same clean inputs, L = CE + lwf_lambda * tau^2 KL(p_old || p_student)."""
    logits = student(inputs)
    ce = F.cross_entropy(logits.float(), labels)
    with torch.no_grad():
        old_logits = old_model(inputs)
    lwf = distillation_kl(logits, old_logits, cfg.lwf_tau)
    return {"loss": ce + cfg.lwf_lambda * lwf, "ce": ce, "lwf": lwf}
