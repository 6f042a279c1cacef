"""Tests for the model registry and the image classifiers."""

import copy

import pytest
import torch
from torch import nn

from iil_dist.models import MODEL_NAMES, build_model
from iil_dist.models.resnet import BasicBlock
from iil_dist.models.resnet_imagenet import Bottleneck, resnet18, resnet34, resnet50

# The ImageNet layout downsamples by 32, so these models are tested from 32x32 up.
IMAGENET_BUILDERS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("in_channels", "size"), [(1, 16), (3, 16), (3, 32)])
def test_output_shape(name: str, in_channels: int, size: int) -> None:
    """Guards against a model that returns the wrong shape or fails on 16x16 or 32x32 inputs."""
    if name in IMAGENET_BUILDERS and size < 32:
        pytest.skip("ImageNet layout: inputs from 32x32 up (see test_imagenet_resnet_output_shape)")
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
    assert (
        str(excinfo.value)
        == "unknown model.name 'vgg'; choose one of: small_cnn, resnet18_cifar, resnet18, resnet34, resnet50"
    )


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


@pytest.mark.parametrize(
    ("name", "expected"), [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)]
)
def test_imagenet_resnet_param_count(name: str, expected: int) -> None:
    """Guards against a layout that differs from the standard architecture (a missing projection shortcut,
    a wrong expansion, biased convs): each would change the reference parameter count at 1000 classes."""
    assert _num_params(build_model(name, num_classes=1000, in_channels=3)) == expected


@pytest.mark.parametrize("name", IMAGENET_BUILDERS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_imagenet_resnet_output_shape(name: str, in_channels: int) -> None:
    """Guards against a model that fails on grayscale or RGB inputs of a size other than 224."""
    model = build_model(name, num_classes=5, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, 64, 64)).shape == (2, 5)


def test_resnet18_output_shape_224() -> None:
    """Guards against a failure at the full ImageNet resolution (e.g. a pool that assumes a fixed size)."""
    model = build_model("resnet18", num_classes=1000, in_channels=3)
    inputs = torch.randn(2, 3, 224, 224)
    assert model(inputs).shape == (2, 1000)
    assert model.stages(model.stem(inputs)).shape == (2, 512, 7, 7)  # downsampled by 32 before the global pool


def _residual_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]


@pytest.mark.parametrize("name", IMAGENET_BUILDERS)
def test_imagenet_resnet_channels_last(name: str) -> None:
    """Guards against a layer that breaks, changes results or falls back to contiguous memory on channels_last
    tensors (e.g. a view that assumes NCHW strides); the GPU recipes train in channels_last."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    inputs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(inputs)
        features = model_cl.stages(model_cl.stem(inputs.contiguous(memory_format=torch.channels_last)))
        actual = model_cl.head(torch.flatten(model_cl.pool(features), 1))
    assert features.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)

    # The zero-initialised residual branches above add exact zeros, so check them live, block by block: the
    # two layouts' fp32 kernels sum in different orders (~1 ulp per layer), which compounds past 1e-5 through
    # a whole network of live blocks but not through one (outputs up to ~10, hence the relative part).
    model = IMAGENET_BUILDERS[name](num_classes=10, in_channels=3, zero_init_residual=False)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for block, block_cl in zip(_residual_blocks(model), _residual_blocks(model_cl), strict=True):
        inputs = torch.randn(2, block.conv1.in_channels, 16, 16)
        with torch.no_grad():
            expected, actual = block(inputs), block_cl(inputs.contiguous(memory_format=torch.channels_last))
        assert actual.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", IMAGENET_BUILDERS)
def test_zero_init_residual_blocks_start_as_identity(name: str) -> None:
    """Guards against zero_init_residual missing a block or zeroing the wrong BatchNorm: at init every
    block must output relu(shortcut(x)), and without the option it must not."""
    for zero_init, identity in [(True, True), (False, False)]:
        model = IMAGENET_BUILDERS[name](num_classes=10, in_channels=3, zero_init_residual=zero_init).eval()
        blocks = _residual_blocks(model)
        assert len(blocks) == {"resnet18": 8, "resnet34": 16, "resnet50": 16}[name]
        for block in blocks:
            inputs = torch.randn(2, block.conv1.in_channels, 8, 8)
            with torch.no_grad():
                output, shortcut = block(inputs), torch.relu(block.shortcut(inputs))
            assert torch.equal(output, shortcut) == identity


@pytest.mark.parametrize("name", IMAGENET_BUILDERS)
def test_imagenet_resnet_gradients(name: str) -> None:
    """Guards against gradients that stop before the stem, and against zero-initialised BatchNorm scales that
    get no gradient (the residual branches would then stay switched off for good)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.randint(0, 10, (4,)))
    loss.backward()
    stem_grad = model.stem[0].weight.grad
    assert stem_grad is not None and torch.isfinite(stem_grad).all() and stem_grad.abs().sum() > 0
    for block in _residual_blocks(model):
        last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        assert torch.all(last_bn.weight == 0) and last_bn.weight.grad.abs().sum() > 0
