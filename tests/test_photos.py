"""The real-photo split (scikit-image's bundled sample images) used by the benchmarks."""

from __future__ import annotations

import pytest

from pipeline.data.photos import HELD_OUT, TRAIN, photo, photos


def test_split_is_fixed_disjoint_and_keeps_the_stereo_pair_together():
    assert not set(TRAIN) & set(HELD_OUT) and len(HELD_OUT) == 7 and len(TRAIN) == 12
    assert {"motorcycle_left", "motorcycle_right"} <= set(TRAIN)


def test_photos_are_rgb_and_at_most_max_side():
    held_out = photos("held_out", max_side=256)
    assert list(held_out) == list(HELD_OUT)
    for name, arr in held_out.items():
        assert arr.dtype.name == "uint8" and arr.ndim == 3 and arr.shape[2] == 3, name
        assert max(arr.shape[:2]) <= 256, name
    assert photo("retina").shape == (512, 512, 3)  # 1411 px, downscaled
    assert photo("camera", max_side=1024).shape == (512, 512, 3)  # grayscale, never upscaled
    with pytest.raises(ValueError, match="split must be"):
        photos("test")
