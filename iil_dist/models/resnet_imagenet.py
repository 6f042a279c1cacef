"""ResNet-18/34/50 in the ImageNet layout: 7x7 stride-2 stem and max-pool, four stages, global pool, linear head."""

import torch
from torch import nn

from iil_dist.models.resnet import BasicBlock, shortcut


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand to 4x the width, each with BN; the shortcut is as in `BasicBlock`."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # The stride sits on the 3x3 conv, the common "v1.5" placement, not on the first 1x1 conv as in the
        # original paper: a strided 1x1 conv drops three of every four positions unseen, the 3x3 one sees all
        # of them. It costs a little more compute for a slightly better accuracy; the parameters are the same.
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return relu(residual(x) + shortcut(x))."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))

    def zero_init_last_bn(self) -> None:
        """Zero the residual branch's last BatchNorm scale, so that the block starts as relu(shortcut(x))."""
        nn.init.zeros_(self.bn3.weight)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """ResNet for ImageNet-sized inputs; the output is 1/32 of the input side before the global pool.

    The adaptive pool makes any input of at least 32x32 work (stage 4 then sees 1x1).

    Args:
        block: `BasicBlock` (ResNet-18/34) or `Bottleneck` (ResNet-50 and deeper).
        num_blocks: blocks per stage.
        num_classes: size of the linear head's output.
        in_channels: image channels (1 for grayscale, 3 for RGB).
        widths: stage widths; a stage outputs `width * block.expansion` channels.
        zero_init_residual: zero the last BatchNorm scale of every residual branch, so that each block starts
            as the identity (relu of its shortcut) and the network as a shallow one whose signal and gradient
            pass through every stage unchanged in scale. This helps training with large batches and
            learning rates (Goyal et al., 2017); the scales move away from zero after the first step.
    """

    def __init__(
        self,
        *,
        block: Block,
        num_blocks: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        zero_init_residual: bool = True,
    ):
        super().__init__()
        # Two stride-2 steps before the first stage (224 -> 56): the stages then run at a resolution whose
        # compute is affordable for full-size images.
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        channels = widths[0]
        for stage_index, (width, count) in enumerate(zip(widths, num_blocks, strict=True)):
            stride = 1 if stage_index == 0 else 2
            blocks = [block(channels, width, stride)]
            channels = width * block.expansion
            blocks += [block(channels, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # fan_out keeps the backward signal's variance stable through ReLU layers (He et al., 2015).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock | Bottleneck):
                    module.zero_init_last_bn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch, num_classes)."""
        out = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(out), 1))


def resnet18(*, num_classes: int, in_channels: int = 3, zero_init_residual: bool = True) -> ResNet:
    """ResNet-18: BasicBlocks (2, 2, 2, 2); 11.7M parameters for 1000 classes."""
    return ResNet(
        block=BasicBlock,
        num_blocks=(2, 2, 2, 2),
        num_classes=num_classes,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
    )


def resnet34(*, num_classes: int, in_channels: int = 3, zero_init_residual: bool = True) -> ResNet:
    """ResNet-34: BasicBlocks (3, 4, 6, 3); 21.8M parameters for 1000 classes."""
    return ResNet(
        block=BasicBlock,
        num_blocks=(3, 4, 6, 3),
        num_classes=num_classes,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
    )


def resnet50(*, num_classes: int, in_channels: int = 3, zero_init_residual: bool = True) -> ResNet:
    """ResNet-50: Bottlenecks (3, 4, 6, 3), stride on the 3x3 conv; 25.6M parameters for 1000 classes."""
    return ResNet(
        block=Bottleneck,
        num_blocks=(3, 4, 6, 3),
        num_classes=num_classes,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
    )
