"""Training and evaluation transforms in plain torch ops, and batch normalisation on the device.

The per-sample transforms take and return uint8 tensors (C, H, W) with C = 1 or 3; they run in the loader
processes on the CPU. Every random draw comes from the `generator` argument when one is given, so a
generator seeded per sample gives the same crops whichever process reads the sample. `normalize` turns a
uint8 batch into the models' float input after the batch has been moved to the device: a uint8 batch is a
quarter of the bytes of a float32 one to copy.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

# Tries at a random box before random_resized_crop falls back to a central crop.
_MAX_TRIES = 10


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(high: int, generator: torch.Generator | None) -> int:
    """A uniform integer in [0, high], both ends included."""
    return int(torch.randint(0, high + 1, (), generator=generator))


def _check_image(image: torch.Tensor) -> None:
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape (C, H, W), got shape {tuple(image.shape)}")


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a (C, H, W) image to (C, height, width), antialiased when shrinking.

    A uint8 image is resized in float32 and rounded and clamped back to uint8; other dtypes are kept.
    """
    if image.shape[-2:] == (height, width):
        # A copy, not a view: a view of a larger image would carry its whole storage across process queues.
        return image.clone()
    out = F.interpolate(
        image.unsqueeze(0).float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    ).squeeze(0)
    if image.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(image.dtype)


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Draw the box of a random resized crop in an image of `height` x `width` pixels.

    The box's area is a uniform fraction in `scale` of the image's, its aspect ratio (width / height) is
    log-uniform in `ratio`, so that a ratio r and 1/r are equally likely. A drawn box that does not fit is
    drawn again, up to ten times; after that the box is the largest central one whose aspect ratio is the
    image's clamped into `ratio` (the area bound is then not kept).

    Returns:
        (top, left, box_height, box_width) in pixels.
    """
    if not (0 < scale[0] <= scale[1]):
        raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_MAX_TRIES):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        box_width = round(math.sqrt(target_area * aspect))
        box_height = round(math.sqrt(target_area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = _randint(height - box_height, generator)
            left = _randint(width - box_width, generator)
            return top, left, box_height, box_width

    # fallback: a very elongated image (or a scale above 1) leaves no room for a box with these bounds
    image_ratio = width / height
    box_height, box_width = height, width
    if image_ratio < ratio[0]:
        box_height = max(1, round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        box_width = max(1, round(height * ratio[1]))
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def random_resized_crop(
    image: torch.Tensor,
    size: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random box (see `sample_crop_box`) of a (C, H, W) image and resize it to (C, size, size)."""
    _check_image(image)
    top, left, box_height, box_width = sample_crop_box(image.shape[1], image.shape[2], scale, ratio, generator)
    return resize(image[:, top : top + box_height, left : left + box_width], size, size)


def random_hflip(image: torch.Tensor, *, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a (C, H, W) image left to right with probability `p`."""
    # One draw whatever `p` is, so that a generator advances the same way for every setting.
    flip = float(torch.rand((), generator=generator)) < p
    return image.flip(-1) if flip else image


def resize_center_crop(image: torch.Tensor, size: int, *, crop_fraction: float = 0.875) -> torch.Tensor:
    """Evaluation transform: resize the shorter side to round(size / crop_fraction), aspect kept, then take
    the central size x size crop (0.875 is 224 of 256)."""
    _check_image(image)
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    height, width = image.shape[1], image.shape[2]
    shorter = round(size / crop_fraction)
    if height <= width:
        new_height, new_width = shorter, round(width * shorter / height)
    else:
        new_height, new_width = round(height * shorter / width), shorter
    resized = resize(image, new_height, new_width)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized[:, top : top + size, left : left + size].contiguous()


def pad_random_crop(
    image: torch.Tensor, size: int, *, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """CIFAR-style crop: zero-pad a (C, H, W) image by `padding` on every side, then take a random
    size x size crop of the padded image."""
    _check_image(image)
    padded = F.pad(image, (padding, padding, padding, padding))
    slack_height, slack_width = padded.shape[1] - size, padded.shape[2] - size
    if slack_height < 0 or slack_width < 0:
        raise ValueError(f"crop size {size} exceeds the padded image {tuple(padded.shape[1:])}")
    top, left = _randint(slack_height, generator), _randint(slack_width, generator)
    return padded[:, top : top + size, left : left + size].contiguous()


def normalize(
    batch: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    *,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Map a uint8 batch (B, C, H, W) to (x / 255 - mean) / std per channel, on the batch's device.

    Args:
        batch: uint8 images on any device.
        mean: per-channel mean of the images scaled to [0, 1].
        std: per-channel standard deviation of the images scaled to [0, 1].
        channels_last: return a tensor contiguous in channels_last memory format (else in the default one).
        dtype: floating dtype of the result; the arithmetic runs in float32 either way.
    """
    if batch.ndim != 4 or batch.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 batch (B, C, H, W), got {batch.dtype} of shape {tuple(batch.shape)}")
    if not len(mean) == len(std) == batch.shape[1]:
        raise ValueError(f"{batch.shape[1]} channels but {len(mean)} means and {len(std)} standard deviations")
    # The layout is changed on the uint8 batch, a quarter of the float bytes; the arithmetic below keeps it.
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batch = batch.contiguous(memory_format=memory_format)
    # (x / 255 - mean) / std folded into one subtraction and one division by 255-scaled statistics.
    # as_tensor: statistics already on the device (the trainer keeps them there) are not copied each step
    shift = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1) * 255
    scale = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1) * 255
    out = (batch.float() - shift) / scale
    return out.to(dtype).contiguous(memory_format=memory_format)


# Padding of the CIFAR-style crop, and the area range of the ImageNet-style one (the usual settings).
_PAD_CROP_PADDING = 4
_RESIZED_CROP_SCALE = (0.08, 1.0)


@dataclass(frozen=True)
class TrainTransform:
    """The augmentation of a split's training samples, chosen by name (`data.train_transform`).

    Attributes:
        kind: "none" returns the stored image; "pad_crop_flip" pads by 4, crops `size` and flips (CIFAR);
            "resized_crop_flip" takes a random resized crop to `size` and flips (ImageNet).
        size: output side in pixels; ignored by "none", which keeps the stored size.
    """

    kind: Literal["none", "pad_crop_flip", "resized_crop_flip"]
    size: int

    def __post_init__(self) -> None:
        if self.kind not in ("none", "pad_crop_flip", "resized_crop_flip"):
            raise ValueError(f"unknown train transform {self.kind!r}; choose none, pad_crop_flip, resized_crop_flip")
        if self.kind != "none" and self.size < 1:
            raise ValueError(f"train transform {self.kind!r} needs an output size >= 1, got {self.size}")

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment one uint8 (C, H, W) image with draws from `generator`."""
        if self.kind == "pad_crop_flip":
            image = pad_random_crop(image, self.size, padding=_PAD_CROP_PADDING, generator=generator)
        elif self.kind == "resized_crop_flip":
            image = random_resized_crop(image, self.size, scale=_RESIZED_CROP_SCALE, generator=generator)
        else:
            return image
        return random_hflip(image, generator=generator)


@dataclass(frozen=True)
class EvalTransform:
    """The deterministic transform of evaluated samples, chosen by name (`data.eval_transform`).

    Attributes:
        kind: "none" returns the stored image; "resize_center_crop" resizes the shorter side to
            size / 0.875 and takes the central `size` x `size` crop.
        size: output side in pixels; ignored by "none".
    """

    kind: Literal["none", "resize_center_crop"]
    size: int

    def __post_init__(self) -> None:
        if self.kind not in ("none", "resize_center_crop"):
            raise ValueError(f"unknown eval transform {self.kind!r}; choose none, resize_center_crop")
        if self.kind != "none" and self.size < 1:
            raise ValueError(f"eval transform {self.kind!r} needs an output size >= 1, got {self.size}")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Transform one uint8 (C, H, W) image."""
        if self.kind == "resize_center_crop":
            return resize_center_crop(image, self.size)
        return image
