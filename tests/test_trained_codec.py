"""Properties that need a (briefly) trained model: honest file sizes, ROI bit allocation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.codec.coding import bits_per_pixel, decode, encode, encode_at_target_bpp
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
def test_lower_roi_quality_moves_bits_into_the_roi(trained, rate, variant):
    """Same model, same file size: --roi-quality 0.1 instead of 1 spends more of the latent's
    bits in the ROI and fewer in the background, raises ROI PSNR and lowers non-ROI PSNR (bits
    move into the ROI, they are not just added or removed).

    The uniform file is encoded at ``rate``; the focused one at the rate whose file is the
    largest not above the uniform file's size (``--target-bpp``). A tiny model trained for
    1000 steps is noisy image by image, so the claim is checked on the mean over 8 images.
    Seen at rate 0.3 / 0.7: sft ROI +0.34 / +0.40 dB, non-ROI -0.39 / -0.36 dB, ROI bits
    x1.022 / x1.026, background bits x0.998 / x0.995; swin ROI +0.12 / +0.05 dB, non-ROI
    -0.87 / -0.85 dB, ROI bits x1.10 / x1.03, background x0.985 / x0.996 (its steps learn less:
    after 1000 of them its ROI PSNR barely rises with the rate, so the ROI's extra bits buy
    little PSNR yet; sft is held to the stronger 0.15 dB).
    """
    model = trained(variant)
    roi_gain, nonroi_loss, size_ratio, roi_bits, background_bits = [], [], [], [], []
    for seed in IMAGES:
        x, m = image_and_mask(256, 256, seed=seed, n_objects=3)
        uniform = encode(model, x, m, 1.0, rate)
        focused, focused_rate = encode_at_target_bpp(model, x, m, 0.1, bits_per_pixel(uniform, 256, 256))
        roi_u, non_u = roi_psnr(x, decode(model, uniform), m)
        roi_f, non_f = roi_psnr(x, decode(model, focused), m)
        roi_gain.append(roi_f - roi_u)
        nonroi_loss.append(non_u - non_f)
        size_ratio.append(len(focused) / len(uniform))
        bits_u, bits_f = roi_and_background_bits(model, x, m, 1.0, rate), roi_and_background_bits(
            model, x, m, 0.1, focused_rate)
        roi_bits.append(bits_f[0] / bits_u[0])
        background_bits.append(bits_f[1] / bits_u[1])
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert 0.9 < mean(size_ratio) <= 1.0, size_ratio
    assert mean(roi_bits) > 1.0 and mean(background_bits) < 1.0, (roi_bits, background_bits)
    assert mean(nonroi_loss) > 0.15, nonroi_loss
    assert mean(roi_gain) > (0.15 if variant == "sft" else 0.0), roi_gain
