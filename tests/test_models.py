"""Tests for the model registry and the two image classifiers."""

import pytest
import torch
from torch import nn

from iil_dist.models import MODEL_NAMES, build_model


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("in_channels", "size"), [(1, 16), (3, 16), (3, 32)])
def test_output_shape(name: str, in_channels: int, size: int) -> None:
    """Guards against a model that returns the wrong shape or fails on 16x16 or 32x32 inputs."""
    model = build_model(name, num_classes=7, in_channels=in_channels)
    logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)


def test_small_cnn_param_count() -> None:
    """Guards against small_cnn growing or shrinking far from its ~100k-parameter budget."""
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    assert 80_000 <= _num_params(model) <= 120_000


def test_small_cnn_convs_have_no_bias() -> None:
    """Guards against conv biases that BatchNorm makes redundant."""
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    assert all(conv.bias is None for conv in convs)


def test_resnet18_cifar_param_count() -> None:
    """Guards against a ResNet-18 that deviates from the CIFAR layout (~11.17M parameters)."""
    model = build_model("resnet18_cifar", num_classes=10, in_channels=3)
    assert 11_100_000 <= _num_params(model) <= 11_300_000


def test_resnet18_cifar_init() -> None:
    """Guards against losing the BatchNorm init (weight 1, bias 0) that the training recipe assumes."""
    model = build_model("resnet18_cifar", num_classes=10, in_channels=3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_unknown_name_error() -> None:
    """Guards against an error that does not tell the user which config field to change and to what."""
    with pytest.raises(ValueError) as excinfo:
        build_model("vgg", num_classes=10, in_channels=3)
    assert str(excinfo.value) == "unknown model.name 'vgg'; choose one of: small_cnn, resnet18_cifar"


def test_small_cnn_trains() -> None:
    """Guards against a model whose gradients do not flow (detached head, frozen layers)."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    inputs, targets = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(10):
        loss = nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_mode_is_deterministic(name: str) -> None:
    """Guards against BatchNorm using batch statistics (or updating them) in eval mode."""
    model = build_model(name, num_classes=10, in_channels=3)
    model.train()
    model(torch.randn(4, 3, 16, 16))  # move running stats away from their init
    model.eval()
    inputs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        first, second = model(inputs), model(inputs)
        single = model(inputs[:1])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # In eval mode a sample's logits must not depend on the rest of the batch.
    torch.testing.assert_close(single, first[:1])
