"""Properties that need a (briefly) trained model: honest file sizes, ROI bit allocation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.codec.coding import decode, encode
from pipeline.eval.metrics import roi_psnr
from pipeline.train.loss import bits_per_pixel as estimated_bpp

from conftest import image_and_mask

IMAGES = range(900, 908)


# swin's 1000 training steps take ~2 minutes on 2 cores: its checks run with `make test-extended`
TRAINED = ["sft", pytest.param("swin", marks=pytest.mark.extended)]


@pytest.mark.parametrize("variant", TRAINED)
@pytest.mark.parametrize("rate", [0.5, 1.0])
def test_file_size_is_honest(trained, rate, variant):
    """Real file bits (header included) / bits the likelihoods estimate <= 1.02 at 512x512."""
    model = trained(variant)
    x, _ = image_and_mask(512, 512, seed=7)
    with torch.no_grad():
        out = model(x, None, 1.0, rate)
    estimate = float(estimated_bpp(out["likelihoods"], 512 * 512)) * 512 * 512
    real = 8 * len(encode(model, x, None, 1.0, rate))
    assert real / estimate <= 1.02, (real, estimate)


@pytest.mark.parametrize("variant", TRAINED)
def test_rate_knob_orders_file_sizes(trained, variant):
    model = trained(variant)
    x, m = image_and_mask(128, 128, seed=4)
    sizes = [len(encode(model, x, m, 0.5, r)) for r in (0.0, 0.5, 1.0)]
    assert sizes[0] < sizes[1] < sizes[2]


def roi_and_background_bits(model, x: torch.Tensor, m: torch.Tensor, q: float, rate: float) -> tuple[float, float]:
    """Estimated bits of y in the ROI and in the background (each latent cell split by its share of ROI pixels)."""
    with torch.no_grad():
        bits = -torch.log2(model(x, m, q, rate)["likelihoods"]["y"]).sum(1, keepdim=True)
    share = F.adaptive_avg_pool2d(m, bits.shape[-2:])
    return float((bits * share).sum()), float((bits * (1 - share)).sum())


@pytest.mark.parametrize("variant", TRAINED)
@pytest.mark.parametrize("rate", [0.3, 0.7])
def test_lower_roi_quality_takes_bits_from_the_background_only(trained, rate, variant):
    """Same model, same rate: --roi-quality 0.1 instead of 1 codes the background's latents
    with a step of 10, so the file shrinks to well under half, the bits it loses are the
    background's, the ROI keeps its PSNR and the background loses some.

    (Before the background's quantisation steps, the same test held the file size fixed and
    saw ROI +0.34 / +0.40 dB for x1.02 ROI bits: the knob moved little. Now, at rate 0.3 /
    0.7, sft: file x0.28 / x0.31, ROI -0.04 / +0.25 dB, non-ROI -8.2 / -4.3 dB; at Q = 0.1
    even rate 1's file is smaller than the uniform one at rate 0.3, so a fixed file size is
    out of reach.) A tiny model trained for 1000 steps is noisy image by image, so the claim
    is checked on the mean over 8 images.
    """
    model = trained(variant)
    roi_change, nonroi_loss, size_ratio, roi_bits, background_bits = [], [], [], [], []
    for seed in IMAGES:
        x, m = image_and_mask(256, 256, seed=seed, n_objects=3)
        uniform, focused = encode(model, x, m, 1.0, rate), encode(model, x, m, 0.1, rate)
        roi_u, non_u = roi_psnr(x, decode(model, uniform), m)
        roi_f, non_f = roi_psnr(x, decode(model, focused), m)
        roi_change.append(roi_f - roi_u)
        nonroi_loss.append(non_u - non_f)
        size_ratio.append(len(focused) / len(uniform))
        bits_u, bits_f = (roi_and_background_bits(model, x, m, q, rate) for q in (1.0, 0.1))
        roi_bits.append(bits_f[0] / bits_u[0])
        background_bits.append(bits_f[1] / bits_u[1])
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(size_ratio) < 0.5, size_ratio
    assert mean(background_bits) < 0.3 and mean(roi_bits) > 0.7, (roi_bits, background_bits)
    assert mean(nonroi_loss) > 1.0, nonroi_loss
    assert mean(roi_change) > -0.3, roi_change
