"""Raw datasets a scenario is cut from: images as uint8 arrays and integer labels."""

from collections.abc import Callable

import numpy as np
import sklearn.datasets


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Scikit-learn's bundled 8x8 digits (no network): uint8 images (N, 8, 8) in 0..255, int64 labels (N,)."""
    bunch = sklearn.datasets.load_digits()
    # the bundled pixels are counts 0..16 of a 4x4 block; stretch them to the usual 8-bit range
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    return images, labels


SOURCES: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {"digits": load_digits}


def load_source(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Load the source `name` from `SOURCES`; an unknown name raises ValueError listing the choices."""
    if name not in SOURCES:
        raise ValueError(f"data.source must be one of {sorted(SOURCES)}, got {name!r}")
    return SOURCES[name]()
