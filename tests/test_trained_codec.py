"""Properties that need a (briefly) trained model: honest file sizes, ROI bit allocation."""

from __future__ import annotations

import pytest
import torch

from pipeline.codec.coding import bits_per_pixel, decode, encode, encode_at_target_bpp
from pipeline.eval.metrics import roi_psnr
from pipeline.train.loss import bits_per_pixel as estimated_bpp

from conftest import image_and_mask

IMAGES = range(900, 908)


@pytest.mark.parametrize("rate", [0.5, 1.0])
def test_file_size_is_honest(trained, rate):
    """Real file bits (header included) / bits the likelihoods estimate <= 1.02 at 512x512."""
    model = trained("sft")
    x, _ = image_and_mask(512, 512, seed=7)
    with torch.no_grad():
        out = model(x, None, 1.0, rate)
    estimate = float(estimated_bpp(out["likelihoods"], 512 * 512)) * 512 * 512
    real = 8 * len(encode(model, x, None, 1.0, rate))
    assert real / estimate <= 1.02, (real, estimate)


def test_rate_knob_orders_file_sizes(trained):
    model = trained("sft")
    x, m = image_and_mask(128, 128, seed=4)
    sizes = [len(encode(model, x, m, 0.5, r)) for r in (0.0, 0.5, 1.0)]
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("rate", [0.3, 0.7])
def test_lower_roi_quality_moves_bits_into_the_roi(trained, rate):
    """Same model, same file size: --roi-quality 0.1 instead of 1 raises ROI PSNR and lowers
    non-ROI PSNR (bits move into the ROI, they are not just added or removed).

    The uniform file is encoded at ``rate``; the focused one at the rate whose file is the
    largest not above the uniform file's size (``--target-bpp``). A tiny model trained for
    1000 steps is noisy image by image, so the claim is checked on the mean over 8 images
    (seen: ROI +0.34 / +0.40 dB, non-ROI -0.39 / -0.36 dB at rate 0.3 / 0.7).
    """
    model = trained("sft")
    roi_gain, nonroi_loss, size_ratio = [], [], []
    for seed in IMAGES:
        x, m = image_and_mask(256, 256, seed=seed, n_objects=3)
        uniform = encode(model, x, m, 1.0, rate)
        focused, _ = encode_at_target_bpp(model, x, m, 0.1, bits_per_pixel(uniform, 256, 256))
        roi_u, non_u = roi_psnr(x, decode(model, uniform), m)
        roi_f, non_f = roi_psnr(x, decode(model, focused), m)
        roi_gain.append(roi_f - roi_u)
        nonroi_loss.append(non_u - non_f)
        size_ratio.append(len(focused) / len(uniform))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(roi_gain) > 0.15, roi_gain
    assert mean(nonroi_loss) > 0.15, nonroi_loss
    assert 0.9 < mean(size_ratio) <= 1.0, size_ratio
