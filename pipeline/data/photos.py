"""Real photographs every machine can have: scikit-image's bundled sample images.

No download: the images ship inside scikit-image's wheel (``pip install roicodec[bench]``).
The split into training and held-out photos is fixed here, chosen before any model was
trained on them, by content: one held-out photo of each kind the training set also has
(a portrait, an animal, an object on a table, an outdoor scene with a man-made object,
a grayscale portrait, grayscale objects, a grayscale texture); the stereo pair's two
views stay together on the training side. Grayscale photos are repeated into three
channels; every photo is downscaled (Lanczos) to at most ``max_side`` pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HELD_OUT = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "gravel")
TRAIN = ("hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left", "motorcycle_right",
         "brick", "cell", "clock", "grass", "moon", "page", "text")


def _load(name: str) -> np.ndarray:
    try:
        import skimage.data as data
    except ImportError:
        raise RuntimeError("the sample photographs come with scikit-image: pip install 'roicodec[bench]'") from None
    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(data, name)()


def photo(name: str, max_side: int = 512) -> np.ndarray:
    """One sample photo as an HxWx3 uint8 RGB array, the longer side at most ``max_side``."""
    arr = _load(name)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    img = Image.fromarray(np.ascontiguousarray(arr[:, :, :3]).astype(np.uint8))
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    return np.asarray(img)


def photos(split: str, max_side: int = 512) -> dict[str, np.ndarray]:
    """``{name: photo}`` of the ``"train"`` or ``"held_out"`` split."""
    names = {"train": TRAIN, "held_out": HELD_OUT}.get(split)
    if names is None:
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    return {name: photo(name, max_side) for name in names}
