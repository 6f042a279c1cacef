"""Tests for the per-sample augmentations and the batch normalisation of iil_dist.data.augment."""

import math
import pickle

import pytest
import torch

from iil_dist.data.augment import (
    EvalTransform,
    TrainTransform,
    normalize,
    pad_random_crop,
    random_hflip,
    random_resized_crop,
    resize_center_crop,
    sample_crop_box,
)


def _image(channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=generator)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("height", "width"), [(40, 40), (30, 50), (64, 36)])
def test_output_shapes_and_dtype(channels: int, height: int, width: int) -> None:
    """Guards against a transform that drops the channel dimension of grayscale images, mixes up height and
    width of non-square images, or returns float pixels to a loader that stacks uint8."""
    image = _image(channels, height, width)
    outputs = [
        random_resized_crop(image, 24, generator=_seeded(0)),
        resize_center_crop(image, 24),
        pad_random_crop(image, 24, generator=_seeded(0)),
        TrainTransform("pad_crop_flip", 24)(image, _seeded(0)),
        TrainTransform("resized_crop_flip", 24)(image, _seeded(0)),
        EvalTransform("resize_center_crop", 24)(image),
    ]
    for out in outputs:
        assert out.shape == (channels, 24, 24) and out.dtype == torch.uint8 and out.is_contiguous()
    assert random_hflip(image, generator=_seeded(0)).shape == image.shape
    # "none" keeps the stored image and its size whatever `size` says.
    assert torch.equal(TrainTransform("none", 24)(image, _seeded(0)), image)
    assert torch.equal(EvalTransform("none", 24)(image), image)


@pytest.mark.parametrize("kind", ["pad_crop_flip", "resized_crop_flip"])
def test_seeded_generator_reproduces_crops(kind: str) -> None:
    """Guards against randomness drawn outside the generator (global RNG, Python's random): a sample read
    twice with the same seed, e.g. by another loader process or after a resume, must get the same crop,
    and other seeds other crops."""
    transform = TrainTransform(kind, 24)
    image = _image(3, 32, 40)
    torch.manual_seed(1)
    first = transform(image, _seeded(7))
    torch.manual_seed(2)  # the global RNG must not matter
    assert torch.equal(transform(image, _seeded(7)), first)
    others = [transform(image, _seeded(seed)) for seed in range(8, 12)]
    assert not any(torch.equal(other, first) for other in others)


@pytest.mark.parametrize(
    ("height", "width", "scale", "ratio"),
    [(300, 400, (0.08, 1.0), (3 / 4, 4 / 3)), (500, 500, (0.25, 0.5), (0.5, 2.0)), (400, 300, (0.6, 0.9), (1, 1))],
)
def test_crop_box_stays_in_bounds(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> None:
    """Guards against random_resized_crop boxes that leave the image or break the area and aspect bounds
    (e.g. a ratio drawn uniformly instead of log-uniformly, or height and width swapped)."""
    generator = _seeded(0)
    areas, log_ratios = [], []
    for _ in range(2000):
        top, left, box_height, box_width = sample_crop_box(height, width, scale, ratio, generator)
        assert 0 <= top and top + box_height <= height and 0 <= left and left + box_width <= width
        areas.append(box_height * box_width / (height * width))
        log_ratios.append(math.log(box_width / box_height))
    # Boxes are rounded to whole pixels, hence the 2% slack at these sizes.
    assert scale[0] * 0.98 <= min(areas) and max(areas) <= scale[1] * 1.02
    assert math.log(ratio[0]) - 0.02 <= min(log_ratios) and max(log_ratios) <= math.log(ratio[1]) + 0.02
    # Log-uniform ratios: as many boxes wider than the middle ratio as narrower. Checked on the square image,
    # where every drawn box fits; elsewhere redrawing boxes that do not fit favours the longer side.
    middle = (math.log(ratio[0]) + math.log(ratio[1])) / 2
    if height == width:
        wider = sum(r > middle for r in log_ratios) / len(log_ratios)
        assert 0.45 < wider < 0.55


@pytest.mark.parametrize(("height", "width", "expected"), [(10, 1000, (0, 493, 10, 13)), (1000, 10, (493, 0, 13, 10))])
def test_crop_box_fallback(height: int, width: int, expected: tuple[int, int, int, int]) -> None:
    """Guards against a crop that fails, loops or leaves the image when no random box fits: an image far
    more elongated than `ratio` allows gets the central box of the clamped ratio (4/3 wide, 3/4 tall)."""
    box = sample_crop_box(height, width, (0.08, 1.0), (3 / 4, 4 / 3), _seeded(0))
    assert box == expected
    crop = random_resized_crop(_image(3, height, width), 16, generator=_seeded(0))
    assert crop.shape == (3, 16, 16)


def test_hflip_probability_extremes() -> None:
    """Guards against a flip on the wrong axis (vertical, or channels) and against p being ignored."""
    image = _image(3, 8, 10)
    for seed in range(5):
        assert torch.equal(random_hflip(image, p=1.0, generator=_seeded(seed)), image.flip(-1))
        assert torch.equal(random_hflip(image, p=0.0, generator=_seeded(seed)), image)
    flips = [torch.equal(random_hflip(image, generator=_seeded(seed)), image.flip(-1)) for seed in range(200)]
    assert 60 < sum(flips) < 140


def test_resize_center_crop_identity_and_centre() -> None:
    """Guards against an eval transform that shifts or rescales an image already of the right shape, and
    against an off-centre crop of a larger one."""
    image = _image(3, 24, 24)
    assert torch.equal(resize_center_crop(image, 24, crop_fraction=1.0), image)
    # 24x40 at crop_fraction 1: no resize (the shorter side is already 24), the central 24 columns.
    wide = _image(1, 24, 40)
    assert torch.equal(resize_center_crop(wide, 24, crop_fraction=1.0), wide[:, :, 8:32])


@pytest.mark.parametrize(("height", "width"), [(64, 128), (128, 64)])
def test_resize_center_crop_scales_shorter_side(height: int, width: int) -> None:
    """Guards against resizing the longer side instead of the shorter one, distorting the aspect ratio or
    cropping off-centre: size 28 at crop_fraction 0.875 takes the shorter side to 32, then the middle 28."""
    image = _image(3, height, width)
    new_height, new_width = (32, 64) if height < width else (64, 32)
    resized = torch.nn.functional.interpolate(
        image[None].float(), size=(new_height, new_width), mode="bilinear", antialias=True, align_corners=False
    )[0]
    top, left = (new_height - 28) // 2, (new_width - 28) // 2
    expected = resized[:, top : top + 28, left : left + 28].round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(resize_center_crop(image, 28), expected)


def test_pad_random_crop_keeps_content() -> None:
    """Guards against a CIFAR crop that shifts content without zero padding or picks offsets unevenly: every
    crop is a window of the zero-padded image, all offsets occur, and the offset equal to the padding gives
    back the original."""
    image = (torch.arange(64, dtype=torch.uint8) + 1).view(1, 8, 8)  # unique non-zero pixels
    padded = torch.zeros(1, 16, 16, dtype=torch.uint8)
    padded[:, 4:12, 4:12] = image
    assert torch.equal(pad_random_crop(image, 8, padding=0, generator=_seeded(0)), image)
    offsets = set()
    generator = _seeded(0)
    for _ in range(1000):
        crop = pad_random_crop(image, 8, padding=4, generator=generator)
        matches = [
            (t, lft) for t in range(9) for lft in range(9) if torch.equal(crop, padded[:, t : t + 8, lft : lft + 8])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
        if matches[0] == (4, 4):
            assert torch.equal(crop, image)
    assert len(offsets) == 81


@pytest.mark.parametrize("channels", [1, 3])
def test_normalize_matches_hand_computation(channels: int) -> None:
    """Guards against normalising with the wrong scale (0-255 vs 0-1), the wrong channel order or
    broadcasting the statistics over the wrong dimension."""
    batch = torch.randint(0, 256, (4, channels, 5, 6), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406][:channels], [0.229, 0.224, 0.225][:channels]
    expected = torch.empty(batch.shape)
    for c in range(channels):
        expected[:, c] = (batch[:, c].double() / 255 - mean[c]) / std[c]
    out = normalize(batch, mean, std)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_normalize_channels_last_and_bf16() -> None:
    """Guards against normalize losing the channels_last format the models expect when the recipe asks for
    it, or ignoring the requested dtype."""
    batch = torch.randint(0, 256, (2, 3, 7, 9), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    reference = normalize(batch, mean, std)
    out = normalize(batch, mean, std, channels_last=True, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)
    # A channels_last input comes back in the default format unless asked otherwise.
    assert normalize(batch.contiguous(memory_format=torch.channels_last), mean, std).is_contiguous()
    with pytest.raises(ValueError, match="3 channels but 1 means"):
        normalize(batch, [0.5], [0.2])


@pytest.mark.parametrize("value", [0, 1, 128, 254, 255])
def test_resize_keeps_constant_images(value: int) -> None:
    """Guards against resampling weights that do not sum to one or ring at borders: a constant image must
    stay constant, to within one level, when shrunk (antialiased) or enlarged."""
    image = torch.full((3, 37, 53), value, dtype=torch.uint8)
    for out in [
        random_resized_crop(image, 16, generator=_seeded(0)),
        random_resized_crop(image, 96, generator=_seeded(1)),
        resize_center_crop(image, 20),
    ]:
        assert int(out.min()) >= value - 1 and int(out.max()) <= value + 1


def test_transforms_validate_and_pickle() -> None:
    """Guards against a typo in the config reaching the loader processes as a silent no-op, and against
    transforms that cannot be sent to loader processes started by spawn (they are pickled)."""
    with pytest.raises(ValueError, match="unknown train transform"):
        TrainTransform("random_crop", 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown eval transform"):
        EvalTransform("center_crop", 32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output size"):
        TrainTransform("resized_crop_flip", 0)
    transform = TrainTransform("resized_crop_flip", 24)
    clone = pickle.loads(pickle.dumps(transform))
    image = _image(3, 40, 30)
    assert clone == transform and torch.equal(clone(image, _seeded(3)), transform(image, _seeded(3)))
