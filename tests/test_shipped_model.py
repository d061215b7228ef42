"""The default model installed with the package (``pipeline/models/roicodec-default.pt``,
docs/models.md): the file is the one recorded here, it round-trips a photo, and on a photo held
out of its training it beats JPEG at the same file size at its lowest rate."""

from __future__ import annotations

import os

import pytest
from PIL import Image
from skimage import data

from pipeline.codec.checkpoint import fingerprint, load_checkpoint
from pipeline.codec.coding import bits_per_pixel, decode, encode, image_to_tensor
from pipeline.codec.default_model import ENV, default_checkpoint
from pipeline.eval.baselines import jpeg_at_bpp
from pipeline.eval.evaluate import quantize8
from pipeline.eval.metrics import psnr

# docs/models.md: the run, step and date of the shipped weights. A better model replaces the
# file and this line.
FINGERPRINT = "05d6a24d8570b535"
MAX_MB = 25


@pytest.fixture(scope="module")
def shipped():
    if os.environ.get(ENV):
        pytest.fail(f"${ENV} is set: this test checks the installed file")
    path = default_checkpoint()
    return path, load_checkpoint(path)


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
    ours = psnr(x, quantize8(decoded))
    jpeg = jpeg_at_bpp(photo, bits_per_pixel(roic, photo.width, photo.height))  # the nearest size
    assert ours > psnr(x, jpeg.x_hat) + 1.0, (ours, psnr(x, jpeg.x_hat), jpeg.bpp)
