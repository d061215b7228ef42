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


def test_target_bpp_bisects_to_the_budget_or_says_it_cannot(trained, tmp_path, capsys):
    """``--target-bpp`` between the sizes at rate 0 and 1: the file is at most the target and the
    rate one bisection step (2^-12) up makes a larger one, so the search ended on the budget's
    edge. Measured (128x128, 0.151-0.336 bpp): targets 0.2065 / 0.2808 bpp gave 0.2056 / 0.2798,
    0.5% under, and one step up is 4 bytes (0.002 bpp) more: asserted within 2%.
    Below rate 0's size: a ValueError naming the smallest bpp, and the command says so in one
    line, writes no file and exits 1 (it used to write rate 0's file over budget, exit 0)."""
    from pipeline.cli import main
    from pipeline.codec.checkpoint import save_checkpoint
    from pipeline.codec.coding import bits_per_pixel, encode_at_target_bpp, tensor_to_image

    model = trained("sft")
    x, m = image_and_mask(128, 128, seed=5)

    def bpp(data: bytes) -> float:
        return bits_per_pixel(data, 128, 128)

    smallest, largest = (bpp(encode(model, x, m, 0.3, r)) for r in (0.0, 1.0))
    for share in (0.3, 0.7):
        target = smallest + share * (largest - smallest)
        data, rate = encode_at_target_bpp(model, x, m, 0.3, target)
        assert 0.0 < rate < 1.0 and data == encode(model, x, m, 0.3, rate)
        one_step_up = bpp(encode(model, x, m, 0.3, rate + 2 ** -12))
        assert bpp(data) <= target < one_step_up, (bpp(data), target, one_step_up)
        assert bpp(data) >= 0.98 * target, (bpp(data), target)
    with pytest.raises(ValueError, match=f"smallest file .* is {smallest:.4f} bpp"):
        encode_at_target_bpp(model, x, m, 0.3, 0.9 * smallest)

    ckpt = save_checkpoint(model, tmp_path / "sft.pt")
    tensor_to_image(x).save(tmp_path / "in.png")
    tensor_to_image(m.expand(1, 3, -1, -1)).save(tmp_path / "mask.png")
    common = ["compress", str(tmp_path / "in.png"), "--checkpoint", str(ckpt), "--mask", str(tmp_path / "mask.png"),
              "--roi-quality", "0.3", "-o", str(tmp_path / "out.roic")]
    assert main([*common, "--target-bpp", f"{0.5 * smallest:.4f}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("roicodec: error: no rate meets") and "smallest file" in lines[0]
    assert not (tmp_path / "out.roic").exists()
    target = round((smallest + largest) / 2, 4)
    assert main([*common, "--target-bpp", str(target)]) == 0
    assert 0.98 * target <= bpp((tmp_path / "out.roic").read_bytes()) <= target
