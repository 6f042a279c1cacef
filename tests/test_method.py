"""Unit tests of the method's pieces: fused labels, dusting, the BatchNorm rule, KC-EMA."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iil_dist.config import MethodConfig
from iil_dist.method.dbd import dbd_losses
from iil_dist.method.ema import consolidate_, consolidation_due, ema_update_, num_consolidations
from iil_dist.method.losses import distillation_kl, dust, frozen_batchnorm, fused_labels, soft_cross_entropy
from iil_dist.models import build_model


def test_fused_label_matches_formula_per_sample_beta():
    """Guards against swapping inner/outer beta or forgetting the renormalisation."""
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 2])  # sample 0 inner (teacher right), sample 1 outer
    out = fused_labels(logits, labels, beta_inner=0.5, beta_outer=3.0, tau=1.0)
    p = F.softmax(logits, dim=1)
    want0 = (p[0] + 0.5 * torch.tensor([1.0, 0, 0])) / 1.5
    want1 = (p[1] + 3.0 * torch.tensor([0, 0, 1.0])) / 4.0
    torch.testing.assert_close(out, torch.stack([want0, want1]))
    torch.testing.assert_close(out.sum(1), torch.ones(2))


def test_fused_label_keeps_teacher_view_of_other_classes():
    """Guards against a target that collapses to one-hot (which would disturb the boundary)."""
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = fused_labels(logits, torch.tensor([0]), beta_inner=1.0, beta_outer=1.0, tau=1.0)
    assert out[0, 2] > out[0, 1] > 0
    assert out[0, 0] > F.softmax(logits, 1)[0, 0]


def test_fused_label_beta_zero_is_teacher_and_large_beta_is_onehot():
    """Guards against the limits of the fusion going wrong."""
    logits = torch.randn(5, 4)
    labels = torch.randint(0, 4, (5,))
    torch.testing.assert_close(
        fused_labels(logits, labels, beta_inner=0, beta_outer=0, tau=2.0), F.softmax(logits / 2, 1)
    )
    big = fused_labels(logits, labels, beta_inner=1e6, beta_outer=1e6, tau=1.0)
    torch.testing.assert_close(big, F.one_hot(labels, 4).float(), atol=1e-5, rtol=0)


def test_soft_cross_entropy_equals_cross_entropy_on_onehot():
    """Guards against a sign or reduction error in the fused-label loss."""
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    torch.testing.assert_close(
        soft_cross_entropy(logits, F.one_hot(labels, 5).float()), F.cross_entropy(logits, labels)
    )


def test_distillation_kl_zero_on_equal_logits_and_positive_otherwise():
    """Guards against a KL with swapped arguments or a missing tau^2 scale."""
    z = torch.randn(4, 6)
    assert distillation_kl(z, z, 2.0).abs() < 1e-6
    other = torch.randn(4, 6)
    p_t, log_p_s = F.softmax(other / 2, 1), F.log_softmax(z / 2, 1)
    manual = 4.0 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    torch.testing.assert_close(distillation_kl(z, other, 2.0), manual)


def test_dust_has_requested_std_and_is_seeded():
    """Guards against noise of the wrong scale or an unseeded generator."""
    x = torch.zeros(200, 1, 16, 16)
    a = dust(x, 1.5, torch.Generator().manual_seed(3))
    b = dust(x, 1.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert abs(a.std().item() - 1.5) < 0.02


def test_frozen_batchnorm_uses_running_stats_and_does_not_update_them():
    """Guards against the dusted pass polluting BatchNorm statistics or using batch statistics."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    model.train()
    model(torch.randn(16, 1, 16, 16))  # give the running statistics non-default values
    before = copy.deepcopy(model.state_dict())
    noisy = torch.randn(16, 1, 16, 16) * 5
    with frozen_batchnorm(model):
        out = model(noisy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in the dusted pass"
    model.eval()
    torch.testing.assert_close(out, model(noisy))  # same function as the eval-mode model
    model.train()
    assert all(m.training for m in model.modules())  # mode restored


def test_frozen_batchnorm_keeps_gradients():
    """Guards against the dusted pass running without autograd (no distillation signal)."""
    model = build_model("small_cnn", num_classes=10, in_channels=1).train()
    with frozen_batchnorm(model):
        model(torch.randn(4, 1, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dbd_losses_terms_and_bn_rule():
    """Guards against a missing loss term, a wrong total, or the dusted pass moving BN statistics."""
    torch.manual_seed(1)
    teacher = build_model("small_cnn", num_classes=10, in_channels=1).eval()
    student = copy.deepcopy(teacher).train()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    cfg = MethodConfig(lambda_dis=0.5)
    stats_after_clean = copy.deepcopy(student)
    stats_after_clean(x)  # one clean training-mode forward: the only BN update allowed
    losses = dbd_losses(student, teacher, x, y, cfg, torch.Generator().manual_seed(0))
    assert {"loss", "fl", "dis", "outer_frac"} <= set(losses)
    torch.testing.assert_close(losses["loss"], losses["fl"] + 0.5 * losses["dis"])
    for (k, a), b in zip(student.state_dict().items(), stats_after_clean.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # DIS only (METHOD.md §5): no label term at all, so the labels cannot change the loss
    # (each call on its own copy: the clean forward moves the running statistics the dusted pass uses)
    dis_cfg = MethodConfig(fused_label=False)
    only_dis = dbd_losses(copy.deepcopy(student), teacher, x, y, dis_cfg, torch.Generator().manual_seed(0))
    assert set(only_dis) == {"loss", "dis"}
    other_labels = dbd_losses(
        copy.deepcopy(student), teacher, x, (y + 1) % 10, dis_cfg, torch.Generator().manual_seed(0)
    )
    assert torch.equal(only_dis["loss"], other_labels["loss"]) and torch.equal(only_dis["loss"], only_dis["dis"])


def _reference_ema(t: dict, s: dict, alpha: float) -> dict:
    return {k: (alpha * t[k] + (1 - alpha) * s[k]) if t[k].is_floating_point() else s[k].clone() for k in t}


def test_consolidate_matches_plain_reference_after_k_updates():
    """Guards against an EMA with the wrong direction, skipped buffers, or averaged integer buffers."""
    torch.manual_seed(2)
    teacher = build_model("small_cnn", num_classes=10, in_channels=1)
    student = build_model("small_cnn", num_classes=10, in_channels=1)
    ref = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for _ in range(5):
        student.train()
        loss = student(torch.randn(8, 1, 16, 16)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        consolidate_(teacher, student, 0.8)
        s = {k: v.double() if v.is_floating_point() else v for k, v in student.state_dict().items()}
        ref = _reference_ema(ref, s, 0.8)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v.double() if v.is_floating_point() else v, ref[k], atol=1e-6, rtol=0)
    ints = [k for k, v in teacher.state_dict().items() if not v.is_floating_point()]
    assert ints and all(teacher.state_dict()[k] == student.state_dict()[k] == 5 for k in ints)


def test_ema_moves_one_minus_alpha_power_k_towards_fixed_student():
    """Guards against the schedule arithmetic the config's alpha relies on (1 - alpha^k)."""
    t, s = [torch.zeros(3)], [torch.ones(3)]
    for _ in range(4):
        ema_update_(t, s, 0.9)
    torch.testing.assert_close(t[0], torch.full((3,), 1 - 0.9**4))


@pytest.mark.parametrize(
    ("epochs", "freeze", "every", "want"), [(30, 10, 1, 20), (30, 10, 5, 4), (5, 0, 1, 5), (3, 3, 1, 0)]
)
def test_consolidation_schedule(epochs, freeze, every, want):
    """Guards against off-by-one errors in the freezing period and interval."""
    due = [e for e in range(1, epochs + 1) if consolidation_due(e, freeze_epochs=freeze, every_epochs=every)]
    assert len(due) == want == num_consolidations(epochs, freeze_epochs=freeze, every_epochs=every)
    assert all(e > freeze for e in due)


def test_ema_keeps_fp32_teacher_precision():
    """Guards against a low-precision EMA where small increments round to zero."""
    t = [torch.ones(4, dtype=torch.float32)]
    s = [torch.full((4,), 1.0 + 2**-7, dtype=torch.bfloat16)]
    ema_update_(t, s, 0.99)
    assert (t[0] > 1.0).all()


def test_consolidate_rejects_different_architectures():
    """Guards against silently averaging mismatched models."""
    a = build_model("small_cnn", num_classes=10, in_channels=1)
    b = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises((ValueError, RuntimeError)):
        consolidate_(a, b, 0.5)
