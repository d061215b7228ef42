"""Properties that need a (briefly) trained model: honest file sizes, ROI bit allocation."""

from __future__ import annotations

import pytest
import torch

from pipeline.codec.coding import decode, encode
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
    """Same model, same rate: --roi-quality 0.1 instead of 1 raises ROI PSNR, lowers non-ROI
    PSNR and keeps the file size about the same (bits move, they are not just added).

    A tiny model trained for 1500 steps is noisy image by image, so the claim is checked on
    the mean over 8 images (on 3 training seeds the means were +0.2..0.5 dB ROI and
    -0.3..-0.6 dB non-ROI).
    """
    model = trained("sft")
    roi_gain, nonroi_loss, size_ratio = [], [], []
    for seed in IMAGES:
        x, m = image_and_mask(256, 256, seed=seed, n_objects=3)
        uniform, focused = encode(model, x, m, 1.0, rate), encode(model, x, m, 0.1, rate)
        roi_u, non_u = roi_psnr(x, decode(model, uniform), m)
        roi_f, non_f = roi_psnr(x, decode(model, focused), m)
        roi_gain.append(roi_f - roi_u)
        nonroi_loss.append(non_u - non_f)
        size_ratio.append(len(focused) / len(uniform))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    # seen with the 1000-step fixture: ROI +0.40 dB, non-ROI -0.80..0.86 dB, size ratio 1.01..1.02
    assert mean(roi_gain) > 0.05, roi_gain
    assert mean(nonroi_loss) > 0.05, nonroi_loss
    assert 0.9 < mean(size_ratio) < 1.1, size_ratio
