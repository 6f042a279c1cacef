"""A ~94k-parameter CNN for 16x16 grayscale digits."""

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # The conv has no bias: BatchNorm's shift makes one redundant.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv3x3-BN-ReLU blocks (32, 64, 128 channels), global average pool, linear head.

    Max-pooling after the first two blocks takes 16x16 inputs to 4x4; the adaptive pool makes any
    input of at least 8x8 work, so the same model also runs on 32x32 images.
    """

    def __init__(self, *, num_classes: int, in_channels: int = 1, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, widths[0]),
            nn.MaxPool2d(2),
            _conv_bn_relu(widths[0], widths[1]),
            nn.MaxPool2d(2),
            _conv_bn_relu(widths[1], widths[2]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch, num_classes)."""
        return self.head(self.features(x))
