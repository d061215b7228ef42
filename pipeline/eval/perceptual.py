"""Perceptual quality metrics of a decoded image, whole and inside / outside the ROI.

Images are float tensors (1,3,H,W) in [0,1] (clamped here), masks (1,1,H,W) in [0,1] with
ROI = ``mask >= 0.5``. Weight-free metrics, always computed:

- ``haarpsi``: piq's HaarPSI of the whole image (higher is better, 1 = identical);
- ``gmsd``: piq's GMSD of the whole image (lower is better, 0 = identical);
- ``texture_roi`` / ``texture_nonroi``: :func:`texture_ratio` inside / outside the ROI,
  the decoded image's fine-band (Laplacian) energy over the original's: 1 = as detailed as
  the original, < 1 smoother (blur, smear), > 1 noisier (or invented detail).

With an LPIPS model (:func:`load_lpips`: VGG-16 weights from ``--vgg-weights`` or torchvision's
cache, never downloaded): ``lpips`` (the whole image) and ``lpips_roi`` / ``lpips_nonroi``
(LPIPS's spatial map, as ``lpips.LPIPS(spatial=True)`` makes it, averaged inside / outside the ROI).
An empty region, or an image smaller than a metric needs, gives ``nan``.
"""

from __future__ import annotations

import math
from pathlib import Path

import piq
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.train.perceptual.losses import (
    VGG16_FILE,
    LPIPSDistance,
    PerceptualWeightsError,
    VGGFeatures,
    laplacian_pyramid,
    vgg16_cache_path,
)

WEIGHT_FREE = ("haarpsi", "gmsd", "texture_roi", "texture_nonroi")
LPIPS_KEYS = ("lpips", "lpips_roi", "lpips_nonroi")
TEXTURE_BANDS = 3
HAARPSI_MIN_SIDE = 16  # piq's haarpsi with 3 scales: kernels of 2^(3+1) px
GMSD_MIN_SIDE = 4  # piq's gmsd halves the image, then 3x3 Prewitt gradients
LPIPS_MIN_SIDE = 16  # VGG-16's relu5_3 is 1/16 of the image
_NO_ENERGY = 1e-10  # mean squared band value per weighted pixel below which a region has no texture


def texture_ratio(x: Tensor, x_hat: Tensor, weight: Tensor, bands: int = TEXTURE_BANDS) -> float:
    """Energy (sum of squares) of ``x_hat``'s ``bands`` finest Laplacian-pyramid bands over
    ``x``'s, under the pixel weight ``weight`` (1,1,H,W).

    The 3 finest bands hold detail 1-2, 2-4 and 4-8 px across: the grain, fine texture and
    edges a codec smooths away at low rates (or a generative decoder invents), where PSNR
    says little; coarser bands are shading and structure PSNR already tracks, and their
    coarse grid would smear the region's boundary. Band j lies on the image downsampled by
    2^j, so its weight is ``weight`` area-downsampled to that grid. 1 = as detailed as the
    original, < 1 smoother, > 1 noisier; ``nan`` when the region is empty or the original has
    no energy there.
    """
    return texture_ratios(x, x_hat, [weight], bands)[0]


def texture_ratios(x: Tensor, x_hat: Tensor, weights: list[Tensor], bands: int = TEXTURE_BANDS) -> list[float]:
    """:func:`texture_ratio` under each of ``weights``, the pyramids built once."""
    pyr_x = laplacian_pyramid(x.float().clamp(0, 1), bands)[:bands]
    pyr_hat = laplacian_pyramid(x_hat.float().clamp(0, 1), bands)[:bands]
    out = []
    for weight in weights:
        weight = weight.float().to(x.device)
        e_x = e_hat = area = 0.0
        for band_x, band_hat in zip(pyr_x, pyr_hat):
            w = weight if band_x.shape[-2:] == weight.shape[-2:] else F.interpolate(weight, size=band_x.shape[-2:],
                                                                                  mode="area")
            e_x += float((band_x.square() * w).sum(dtype=torch.float64))
            e_hat += float((band_hat.square() * w).sum(dtype=torch.float64))
            area += float(w.sum(dtype=torch.float64)) * band_x.shape[1]
        out.append(e_hat / e_x if area > 0 and e_x > _NO_ENERGY * area else float("nan"))
    return out


def haarpsi(x: Tensor, x_hat: Tensor) -> float:
    """HaarPSI (piq, 3 scales) of the whole image: 1 = identical, lower = worse; ``nan`` under
    16 px a side."""
    if min(x.shape[-2:]) < HAARPSI_MIN_SIDE:
        return float("nan")
    with torch.no_grad():
        value = float(piq.haarpsi(x.float().clamp(0, 1), x_hat.float().clamp(0, 1), data_range=1.0))
    return min(value, 1.0) if math.isfinite(value) else float("nan")  # float32 rounding: 1 + 2e-7


def gmsd(x: Tensor, x_hat: Tensor) -> float:
    """GMSD (piq) of the whole image: 0 = identical, higher = worse; ``nan`` under 4 px a side."""
    if min(x.shape[-2:]) < GMSD_MIN_SIDE:
        return float("nan")
    with torch.no_grad():
        value = float(piq.gmsd(x.float().clamp(0, 1), x_hat.float().clamp(0, 1), data_range=1.0))
    return value if math.isfinite(value) else float("nan")


def load_lpips(vgg_weights: str | Path | None = None, allow_random: bool = False) -> LPIPSDistance:
    """LPIPS (VGG-16, v0.1) in eval mode, its trunk from ``vgg_weights`` (torchvision's
    ``vgg16-397923af.pth``) or, when None, torchvision's cache; nothing is downloaded.

    Missing weights raise :class:`PerceptualWeightsError` (one line naming ``--vgg-weights``);
    ``allow_random`` (tests only) uses a random trunk when there are none.
    """
    hint = f"pass --vgg-weights FILE (torchvision's {VGG16_FILE}) for LPIPS, or leave LPIPS out"
    if vgg_weights is not None and not Path(vgg_weights).is_file():
        raise PerceptualWeightsError(f"VGG-16 weights {vgg_weights} not found: {hint}")
    if vgg_weights is None and not allow_random and not vgg16_cache_path().is_file():
        raise PerceptualWeightsError(f"no VGG-16 weights (none at {vgg16_cache_path()}): {hint}")
    return LPIPSDistance(VGGFeatures(vgg_weights, allow_random=allow_random)).eval()


def lpips_map(model: LPIPSDistance, x: Tensor, x_hat: Tensor) -> tuple[float, Tensor]:
    """(LPIPS of the whole image, its spatial map (1,1,H,W)): each layer's distance map
    upsampled bilinearly to the image and summed, as ``lpips.LPIPS(spatial=True)``."""
    size, device = x.shape[-2:], next(model.parameters()).device
    with torch.no_grad():
        feats = model.features(torch.cat([x_hat, x]).float().clamp(0, 1).to(device))
        total, spatial = 0.0, torch.zeros(1, 1, *size)
        for lin, f in zip(model.lins, feats):
            a, b = F.normalize(f[:1], dim=1, eps=1e-10), F.normalize(f[1:], dim=1, eps=1e-10)
            d = lin((a - b) ** 2)
            total += float(d.mean())
            spatial = spatial + F.interpolate(d, size=size, mode="bilinear", align_corners=False).cpu()
    return total, spatial


def _region_mean(values: Tensor, region: Tensor) -> float:
    area = float(region.sum())
    return float((values * region).sum()) / area if area > 0 else float("nan")


def perceptual_quality(x: Tensor, x_hat: Tensor, mask: Tensor | None,
                       lpips: LPIPSDistance | None = None) -> dict[str, float]:
    """{haarpsi, gmsd, texture_roi, texture_nonroi} (+ lpips, lpips_roi, lpips_nonroi with an
    LPIPS model) of a reconstruction; no mask: all ROI (the non-ROI values are ``nan``)."""
    roi = torch.ones_like(x[:, :1]) if mask is None else (mask >= 0.5).to(x.dtype)
    out = {"haarpsi": haarpsi(x, x_hat), "gmsd": gmsd(x, x_hat),
           **dict(zip(("texture_roi", "texture_nonroi"), texture_ratios(x, x_hat, [roi, 1 - roi])))}
    if lpips is not None and min(x.shape[-2:]) < LPIPS_MIN_SIDE:
        out.update(dict.fromkeys(LPIPS_KEYS, float("nan")))
    elif lpips is not None:
        whole, spatial = lpips_map(lpips, x, x_hat)
        region = roi.cpu().float()
        out.update({"lpips": whole, "lpips_roi": _region_mean(spatial, region),
                    "lpips_nonroi": _region_mean(spatial, 1 - region)})
    return out
