"""Name -> builder registry, so a config names its model and new models need one entry here."""

from collections.abc import Callable

from torch import nn

from iil_dist.models.resnet import resnet18_cifar
from iil_dist.models.resnet_imagenet import resnet18, resnet34, resnet50
from iil_dist.models.small_cnn import SmallCNN

ModelBuilder = Callable[..., nn.Module]

# Insertion order is the order the choices are listed in error messages.
_BUILDERS: dict[str, ModelBuilder] = {
    "small_cnn": SmallCNN,
    "resnet18_cifar": resnet18_cifar,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """Build the model registered under `name`; it returns logits of shape (batch, num_classes).

    Raises:
        ValueError: if `name` is not registered; the message names `model.name` and the choices.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown model.name {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return builder(num_classes=num_classes, in_channels=in_channels)
