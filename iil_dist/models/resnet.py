"""ResNet-18 for 32x32 images (CIFAR variant: 3x3 stride-1 stem, no stem max-pool)."""

import torch
from torch import nn


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """A residual block's shortcut: the identity, or a 1x1 conv + BN where the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with an identity shortcut, or a 1x1 conv + BN one when the shape changes."""

    # Output channels per unit of stage width; the ImageNet ResNets (resnet_imagenet.py) share this block.
    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return relu(residual(x) + shortcut(x))."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))

    def zero_init_last_bn(self) -> None:
        """Zero the residual branch's last BatchNorm scale, so that the block starts as relu(shortcut(x))."""
        nn.init.zeros_(self.bn2.weight)


class ResNetCIFAR(nn.Module):
    """ResNet of BasicBlocks in four stages; stages 2-4 halve the resolution and widen the channels."""

    def __init__(
        self,
        *,
        num_blocks: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
    ):
        super().__init__()
        # A stride-1 stem without max-pool keeps the full resolution of small (32x32) inputs.
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        channels = widths[0]
        for stage_index, (width, count) in enumerate(zip(widths, num_blocks, strict=True)):
            stride = 1 if stage_index == 0 else 2
            blocks = [BasicBlock(channels, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # fan_out keeps the backward signal's variance stable through ReLU layers (He et al., 2015).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch, num_classes)."""
        out = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(out), 1))


def resnet18_cifar(*, num_classes: int, in_channels: int = 3) -> ResNetCIFAR:
    """ResNet-18 with [2, 2, 2, 2] BasicBlocks; ~11.2M parameters for 10 classes."""
    return ResNetCIFAR(num_blocks=(2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
