"""Perceptual evaluation metrics (pipeline.eval.perceptual): texture ratio, HaarPSI, GMSD, masked
LPIPS on a random-init VGG-16 (no weights), their place in quality(), the RD outputs and the
comparison pictures. Small crops of skimage's photos, seeded noise."""

from __future__ import annotations

import argparse
import csv
import json
import math

import lpips as lpips_package
import numpy as np
import pytest
import torch
from conftest import TINY, image_and_mask
from PIL import Image
from skimage import data
from torchvision.transforms.functional import gaussian_blur

from pipeline.codec.checkpoint import save_checkpoint
from pipeline.codec.models import build_model
from pipeline.eval import rd
from pipeline.eval.cli import add_evaluate_arguments, run_evaluate_command
from pipeline.eval.evaluate import METRICS, EvaluationError, mean_entry, quality
from pipeline.eval.perceptual import (
    LPIPS_KEYS,
    WEIGHT_FREE,
    PerceptualWeightsError,
    gmsd,
    haarpsi,
    load_lpips,
    lpips_map,
    perceptual_quality,
    texture_ratio,
)
from pipeline.eval.pictures import (
    CAPTION_HEIGHT,
    GAP,
    _stats,
    comparison,
    write_comparison,
)


pytestmark = pytest.mark.usefixtures("one_thread_empty_hub")


def photo(size: int = 96) -> torch.Tensor:
    """A textured (1,3,size,size) crop of skimage's astronaut (her suit and the flag), in [0,1]."""
    arr = data.astronaut()[200:200 + size, 150:150 + size]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float() / 255.0


def left_half(x: torch.Tensor) -> torch.Tensor:
    """ROI mask (1,1,H,W): the left half of the image."""
    m = torch.zeros_like(x[:, :1])
    m[..., : x.shape[-1] // 2] = 1.0
    return m


def blur(x: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    return gaussian_blur(x, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)


def noisy(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)
    return load_lpips(None, allow_random=True)  # the hub is empty: a random trunk


# -- texture ratio ---------------------------------------------------------------------------
def test_texture_ratio_is_one_for_identical_images():
    x = photo()
    roi = left_half(x)
    assert texture_ratio(x, x.clone(), roi) == pytest.approx(1.0, abs=1e-9)
    assert texture_ratio(x, x.clone(), 1 - roi) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("blurred", ["nonroi", "roi"])
def test_blurring_one_region_lowers_only_its_texture_ratio(blurred):
    x = photo()
    roi = left_half(x)
    keep = roi if blurred == "nonroi" else 1 - roi
    x_hat = x * keep + blur(x) * (1 - keep)
    q = perceptual_quality(x, x_hat, roi)
    smooth, intact = (q["texture_nonroi"], q["texture_roi"]) if blurred == "nonroi" else \
        (q["texture_roi"], q["texture_nonroi"])
    assert smooth < 0.3  # sigma 2 removes most detail finer than 8 px
    assert intact == pytest.approx(1.0, abs=0.1)  # only the border's few pixels see the other region


def test_noise_raises_the_texture_ratio_and_more_noise_raises_it_more():
    x = photo()
    roi = left_half(x)
    light, heavy = (texture_ratio(x, noisy(x, s), 1 - roi) for s in (0.02, 0.08))
    assert 1.0 < light < heavy


def test_texture_ratio_of_an_empty_or_flat_region_is_nan():
    x = photo()
    assert math.isnan(texture_ratio(x, noisy(x, 0.05), torch.zeros_like(x[:, :1])))
    flat = torch.full_like(x, 0.5)
    assert math.isnan(texture_ratio(flat, noisy(flat, 0.05), torch.ones_like(x[:, :1])))
    q = perceptual_quality(x, blur(x), None)  # no mask: all ROI, no background
    assert math.isnan(q["texture_nonroi"]) and q["texture_roi"] < 0.3


def test_texture_ratio_weights_follow_the_bands_on_odd_sizes():
    """45x67: the bands' grids are 45x67, 23x34, 12x17; the weight is area-downsampled to each."""
    x = photo(96)[..., :45, :67]
    roi = left_half(x)
    x_hat = x * roi + blur(x) * (1 - roi)
    assert texture_ratio(x, x_hat, roi) == pytest.approx(1.0, abs=0.1)
    assert texture_ratio(x, x_hat, 1 - roi) < 0.3


def test_texture_ratio_clamps_its_inputs():
    x = photo()
    over = x + 0.5  # mostly above 1: clamped to a flat white, no texture left
    assert texture_ratio(x, over, torch.ones_like(x[:, :1])) == pytest.approx(
        texture_ratio(x, over.clamp(0, 1), torch.ones_like(x[:, :1])))


# -- HaarPSI and GMSD ------------------------------------------------------------------------
def test_haarpsi_and_gmsd_of_identical_and_degraded_images():
    x = photo()
    assert haarpsi(x, x.clone()) == pytest.approx(1.0, abs=1e-5) and haarpsi(x, x.clone()) <= 1.0
    assert gmsd(x, x.clone()) == pytest.approx(0.0, abs=1e-6)
    mild, strong = blur(x, 0.8), blur(x, 3.0)
    h_mild, h_strong = haarpsi(x, mild), haarpsi(x, strong)
    g_mild, g_strong = gmsd(x, mild), gmsd(x, strong)
    assert 0.0 < h_strong < h_mild < 0.99
    assert 0.01 < g_mild < g_strong
    assert haarpsi(x, noisy(x, 0.08)) < haarpsi(x, noisy(x, 0.02)) < 1.0
    assert gmsd(x, noisy(x, 0.08)) > gmsd(x, noisy(x, 0.02)) > 0.0


def test_haarpsi_and_gmsd_clamp_inputs_and_are_nan_on_tiny_images():
    x = photo()
    out_of_range = x * 1.4 - 0.2  # below 0 and above 1: piq would refuse it unclamped
    assert haarpsi(x, out_of_range) == pytest.approx(haarpsi(x, out_of_range.clamp(0, 1)))
    assert gmsd(x, out_of_range) == pytest.approx(gmsd(x, out_of_range.clamp(0, 1)))
    assert math.isnan(haarpsi(x[..., :15, :40], x[..., :15, :40]))
    assert math.isfinite(haarpsi(x[..., :16, :16], x[..., :16, :16]))
    assert math.isnan(gmsd(x[..., :3, :40], x[..., :3, :40]))
    tiny = x[..., :8, :8]
    q = quality(tiny, tiny, None)  # every metric answers, the ones that cannot with nan
    assert set(WEIGHT_FREE) <= set(q) and math.isnan(q["haarpsi"])


# -- quality() and LPIPS ---------------------------------------------------------------------
def test_quality_carries_the_perceptual_metrics(lpips_model):
    x = photo(64)
    roi = left_half(x)
    x_hat = x * roi + blur(x) * (1 - roi)
    q = quality(x, x_hat, roi)
    assert set(METRICS) - {"bpp"} == set(q)  # no LPIPS without a model
    assert set(WEIGHT_FREE) <= set(METRICS)
    assert q["texture_nonroi"] < 0.5 < q["texture_roi"] and q["haarpsi"] < 1.0 and q["gmsd"] > 0.0
    with_lpips = quality(x, x_hat, roi, lpips_model)
    assert set(with_lpips) == set(q) | set(LPIPS_KEYS)
    assert {k: with_lpips[k] for k in q} == q
    tiny = quality(x[..., :12, :12], x_hat[..., :12, :12], roi[..., :12, :12], lpips_model)
    assert all(math.isnan(tiny[k]) for k in LPIPS_KEYS)  # too small for VGG-16: nan, no error


def test_masked_lpips_is_zero_for_identical_images_and_larger_where_degraded(lpips_model):
    x = photo(96)
    roi = left_half(x)
    same = perceptual_quality(x, x.clone(), roi, lpips_model)
    assert max(abs(same[k]) for k in LPIPS_KEYS) < 1e-6
    for degraded in ("nonroi", "roi"):
        keep = roi if degraded == "nonroi" else 1 - roi
        q = perceptual_quality(x, x * keep + noisy(x, 0.15) * (1 - keep), roi, lpips_model)
        worse, better = (q["lpips_nonroi"], q["lpips_roi"]) if degraded == "nonroi" else \
            (q["lpips_roi"], q["lpips_nonroi"])
        assert worse > 2 * better > 0
        assert min(q["lpips_roi"], q["lpips_nonroi"]) < q["lpips"] < max(q["lpips_roi"], q["lpips_nonroi"])


@pytest.mark.slow  # the package builds torchvision's whole VGG-16, classifier included (~3 s)
def test_lpips_map_matches_the_lpips_package_spatial_mode(lpips_model):
    x = photo(64)
    x_hat = noisy(x, 0.1)
    reference = lpips_package.LPIPS(net="vgg", pretrained=True, pnet_rand=True, spatial=True, verbose=False)
    trunk = lpips_model.features.layers.state_dict()
    reference.net.load_state_dict({k: trunk[k.split(".", 1)[1]] for k in reference.net.state_dict()})
    whole, spatial = lpips_map(lpips_model, x, x_hat)
    with torch.no_grad():
        theirs = reference(x_hat, x, normalize=True)
    assert spatial.shape == theirs.shape == (1, 1, 64, 64)
    assert torch.allclose(spatial, theirs, rtol=1e-4, atol=1e-6)
    assert whole == pytest.approx(float(lpips_model(x_hat, x)), rel=1e-5)


def test_load_lpips_without_weights_is_one_line_naming_the_option(tmp_path):
    for make in (lambda: load_lpips(tmp_path / "none.pth"), lambda: load_lpips(None)):
        with pytest.raises(PerceptualWeightsError) as info:
            make()
        message = str(info.value)
        assert "--vgg-weights" in message and "\n" not in message and "--no-vgg-losses" not in message
    p = argparse.ArgumentParser()
    add_evaluate_arguments(p)
    base = ["--checkpoint", "c.pt", "--images", "i", "--json", str(tmp_path / "o.json")]
    with pytest.raises(PerceptualWeightsError, match="--vgg-weights"):
        run_evaluate_command(p.parse_args([*base, "--vgg-weights", str(tmp_path / "none.pth")]))
    with pytest.raises(EvaluationError, match="not --task-annotations"):
        run_evaluate_command(p.parse_args([*base, "--vgg-weights", "w.pth", "--task-annotations", "a.json"]))


# -- means and RD outputs --------------------------------------------------------------------
def point(setting: float, bpp: float, texture: float, lpips: bool = False) -> dict:
    p = {"setting": setting, "bpp": bpp, "psnr": 20 + 10 * bpp, "roi_psnr": 22 + 10 * bpp,
         "nonroi_psnr": 18 + 10 * bpp, "ms_ssim": 0.9, "haarpsi": 0.5 + 0.2 * bpp, "gmsd": 0.1 / (1 + bpp),
         "texture_roi": 0.9, "texture_nonroi": texture, "n_images": 2}
    if lpips:
        p.update({"lpips": 0.3, "lpips_roi": 0.2, "lpips_nonroi": 0.4})
    return p


def test_rd_outputs_carry_and_plot_the_perceptual_metrics(tmp_path, monkeypatch):
    curves = {"roicodec": {"kind": "learned", "roi_quality": 0.3,
                           "points": [point(0.0, 0.2, 0.3, True), point(1.0, 0.8, 0.7, True)]},
              "jpeg": {"kind": "baseline", "roi_quality": None,
                       "points": [point(10, 0.3, 0.6), point(90, 1.5, 0.95)]}}
    result = {"variant": "tlic", "n_images": 2, "masks_dir": "m", "curves": curves, "bd": {}, "bd_by_curve": {}}
    path = rd.plot_rd(result, "texture_nonroi", tmp_path / "texture.png", reference=1.0)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100
    drawn = {}

    def plot_rd(res, metric, path, bd_key=None, reference=None):  # the plots' list, not their pixels
        drawn[metric] = reference
        return path
    monkeypatch.setattr(rd, "plot_rd", plot_rd)
    files = rd.write_rd_outputs(result, tmp_path / "out")
    assert drawn == {"roi_psnr": None, "psnr": None, "weighted_psnr": None, "nonroi_psnr": None, "ms_ssim": None,
                     "haarpsi": None, "texture_nonroi": 1.0}
    assert {p.split("/")[-1] for p in files["plots"]} >= {"rd_haarpsi.png", "rd_texture_nonroi.png"}
    with open(files["points_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {*WEIGHT_FREE, *LPIPS_KEYS} <= set(rows[0])
    assert float(rows[1]["texture_nonroi"]) == pytest.approx(0.7) and rows[2]["lpips"] == ""
    metrics = rd.evaluation_metrics(result)
    assert metrics["eval/rd/roicodec/texture_nonroi_at_1"] == pytest.approx(0.7)
    assert metrics["eval/rd/roicodec/lpips_roi_at_0"] == pytest.approx(0.2)
    drawn.clear()
    rd.write_rd_outputs({**result, "masks_dir": None}, tmp_path / "no_masks")  # no background
    assert "texture_nonroi" not in drawn and "nonroi_psnr" not in drawn and "haarpsi" in drawn


def test_mean_entry_averages_the_perceptual_and_lpips_metrics():
    a, b = point(0.5, 0.2, 0.4, True), point(0.5, 0.4, 0.8, True)
    images = [{**a, "roi_fraction": 0.5, "jpeg": point(5, 0.2, 0.2)},
              {**b, "roi_fraction": 0.5, "jpeg": point(5, 0.4, float("nan"))}]
    mean = mean_entry(images, ["roicodec", "jpeg"])
    assert mean["texture_nonroi"] == pytest.approx(0.6) and mean["lpips_nonroi"] == pytest.approx(0.4)
    assert mean["jpeg"]["texture_nonroi"] == pytest.approx(0.2)  # nan ignored
    assert mean["jpeg"]["haarpsi"] == pytest.approx(0.56)
    assert "lpips" not in mean["jpeg"]  # only where some row has it


# -- pictures --------------------------------------------------------------------------------
def test_comparison_has_four_panels_and_the_numbers_of_its_captions(tmp_path):
    x = photo(64)
    roi = left_half(x)
    image = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0  # the 8-bit original
    mse, perceptual = x * roi + blur(x) * (1 - roi), x * roi + noisy(x, 0.04) * (1 - roi)
    picture, numbers = comparison(image, roi, [("MSE model", mse, 1.0), ("perceptual model", perceptual, 1.1)])
    assert picture.size == (4 * 64 + 3 * GAP, 64 + CAPTION_HEIGHT)
    assert [n["title"] for n in numbers] == ["MSE model", "perceptual model", "JPEG, same file size"]
    assert [n["bpp"] for n in numbers[:2]] == [1.0, 1.1] and 0.5 < numbers[2]["bpp"] < 2.0  # JPEG near 1 bpp
    for n, x_hat in zip(numbers[:2], (mse, perceptual)):
        assert n["roi_psnr"] == quality(x, x_hat, roi)["roi_psnr"] == 100.0  # ROI untouched
        assert n["texture_nonroi"] == pytest.approx(quality(x, x_hat, roi)["texture_nonroi"])
    assert numbers[0]["texture_nonroi"] < 1.0 < numbers[1]["texture_nonroi"]
    lines = _stats(numbers[0]["bpp"], numbers[0])
    assert lines == [f"1.000 bpp  ROI 100.00 dB  all {numbers[0]['psnr']:.2f} dB",
                     f"background texture {numbers[0]['texture_nonroi']:.2f}"]
    assert _stats(1.0, {**numbers[0], "texture_nonroi": float("nan")})[1] == "background texture n/a"
    # the middle of the MSE panel's caption is drawn (black text on white)
    caption = np.asarray(picture)[64:, 64 + GAP:2 * 64 + GAP]
    assert (caption < 100).any() and (caption > 250).any()
    image.save(tmp_path / "cat.png")
    path = write_comparison(tmp_path / "cat.png", roi, [("MSE", mse, 1.0), ("perceptual", perceptual, 1.1)],
                            tmp_path / "pictures")
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.width == 4 * 64 + 3 * GAP


def test_evaluate_with_vgg_weights_reports_lpips_for_every_codec(lpips_model, tmp_path):
    """``roicodec evaluate --vgg-weights FILE``: LPIPS (here a random trunk saved as torchvision's
    file) next to the weight-free metrics, per image, per codec and in the mean."""
    torch.manual_seed(0)
    model = build_model("tlic", **TINY).eval()
    model.update(force=True)
    ckpt = save_checkpoint(model, tmp_path / "ckpt.pt")
    weights = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in lpips_model.features.layers.state_dict().items()}, weights)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    x, m = image_and_mask(48, 64, seed=5)
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "images/a.png")
    Image.fromarray((m[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "masks/a.png")
    p = argparse.ArgumentParser()
    add_evaluate_arguments(p)
    out = tmp_path / "eval.json"
    args = ["--checkpoint", str(ckpt), "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
            "--json", str(out), "--baselines", "jpeg", "--no-progress", "--no-mlflow"]
    assert run_evaluate_command(p.parse_args([*args, "--vgg-weights", str(weights)])) == 0
    res = json.loads(out.read_text())
    for entry in (res["images"][0], res["mean"]):
        for codec in (entry, entry["jpeg"], entry["learned_uniform"]):
            assert all(isinstance(codec[k], float) for k in (*WEIGHT_FREE, *LPIPS_KEYS))
            assert codec["lpips"] > 0
    assert run_evaluate_command(p.parse_args(args)) == 0  # without the option: no LPIPS
    res = json.loads(out.read_text())
    assert "lpips" not in res["images"][0] and "lpips" not in res["mean"]["jpeg"]
    assert isinstance(res["images"][0]["texture_nonroi"], float)


def test_evaluate_pictures_show_two_checkpoints_and_jpeg_at_one_file_size(tmp_path):
    """``roicodec evaluate --pictures DIR --pictures-against MSE``: one picture per image the
    evaluation read (an unreadable one is an error row and has none), four panels wide."""
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("tlic", **TINY).eval()
        model.update(force=True)
        ckpts.append(save_checkpoint(model, tmp_path / f"run{seed}" / "checkpoint_000001" / "model.pt"))
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    x, m = image_and_mask(48, 64, seed=7)
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "images/a.png")
    Image.fromarray((m[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "masks/a.png")
    (tmp_path / "images/broken.png").write_bytes(b"not a png")
    p = argparse.ArgumentParser()
    add_evaluate_arguments(p)
    base = ["--checkpoint", str(ckpts[1].parent), "--images", str(tmp_path / "images"), "--masks",
            str(tmp_path / "masks"), "--json", str(tmp_path / "eval.json"), "--baselines", "jpeg", "--no-progress",
            "--no-mlflow"]
    pictures = tmp_path / "pictures"
    assert run_evaluate_command(p.parse_args([*base, "--pictures", str(pictures),
                                              "--pictures-against", str(ckpts[0])])) == 0
    assert [f.name for f in pictures.iterdir()] == ["a.png"]
    with Image.open(pictures / "a.png") as im:
        assert im.size == (4 * 64 + 3 * GAP, 48 + CAPTION_HEIGHT)
    assert json.loads((tmp_path / "eval.json").read_text())["errors"][0]["image"] == "broken.png"
    with pytest.raises(EvaluationError, match="needs --pictures"):
        run_evaluate_command(p.parse_args([*base, "--pictures-against", str(ckpts[0])]))
    with pytest.raises(EvaluationError, match="single operating point"):
        run_evaluate_command(p.parse_args([*base[:-4], "--sweep", "--pictures", str(pictures)]))
