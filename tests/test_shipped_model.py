"""The default model installed with the package (``pipeline/models/roicodec-default.pt``,
docs/models.md): the file is the one recorded here, it round-trips a photo, and on a photo held
out of its training it beats JPEG at the same file size at its lowest rate."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipeline.codec.checkpoint import fingerprint, load_checkpoint
from pipeline.codec.coding import decode, encode, image_to_tensor
from pipeline.codec.default_model import ENV, default_checkpoint

# docs/models.md: the run, step and date of the shipped weights. A better model replaces the
# file and this line.
FINGERPRINT = "bb37400e1bf313c1"
MAX_MB = 25


@pytest.fixture(scope="module")
def shipped():
    import os

    if os.environ.get(ENV):
        pytest.fail(f"${ENV} is set: this test checks the installed file")
    path = default_checkpoint()
    return path, load_checkpoint(path)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_the_installed_model_is_the_recorded_one_and_fits_the_budget(shipped):
    path, model = shipped
    assert path.stat().st_size <= MAX_MB * 2 ** 20
    assert fingerprint(model).hex() == FINGERPRINT


def test_it_beats_jpeg_at_the_same_size_on_a_held_out_photo(shipped):
    _, model = shipped
    photo = Image.fromarray(data.astronaut()).convert("RGB")  # held out of its training (manifest)
    photo.thumbnail((512, 512), Image.LANCZOS)
    x = image_to_tensor(photo)
    roic = encode(model, x, rate=0.0)  # uniform quality, the lowest rate
    decoded = decode(model, roic)
    again = decode(load_checkpoint(default_checkpoint()), roic)
    assert decoded.equal(again)  # a fresh load decodes the file to the same image
    ours = _psnr(np.asarray(photo), (decoded[0].permute(1, 2, 0).numpy() * 255).round())
    jpeg = None
    for quality in range(1, 96):  # the best JPEG no larger than our file
        buf = io.BytesIO()
        photo.save(buf, "JPEG", quality=quality)
        if buf.tell() <= len(roic):
            jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert jpeg is not None
    assert ours > _psnr(np.asarray(photo), jpeg) + 1.0, (ours, _psnr(np.asarray(photo), jpeg))
