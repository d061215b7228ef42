"""Image quality metrics on [0,1] tensors: PSNR, ROI / non-ROI PSNR, quality-weighted PSNR, MS-SSIM.

PSNR of identical images (MSE = 0) is capped at ``PSNR_CAP`` dB rather than infinite,
so means over images stay finite. An empty region (no ROI pixel) gives ``nan``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as _ms_ssim

PSNR_CAP = 100.0


def _psnr_from_mse(mse: float) -> float:
    if math.isnan(mse):
        return float("nan")
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else -10.0 * math.log10(mse)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of two same-shape images in [0,1] (capped at ``PSNR_CAP``)."""
    return _psnr_from_mse(float(F.mse_loss(x.double(), y.double())))


def masked_psnr(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> float:
    """PSNR over the pixels selected by ``weight`` (B,1,H,W in [0,1]); MSE averaged over them."""
    err = (x.double() - y.double()).pow(2).mean(dim=1, keepdim=True)
    w = weight.double().expand_as(err)
    total = float(w.sum())
    return _psnr_from_mse(float((err * w).sum()) / total) if total > 0 else float("nan")


def roi_psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5
             ) -> tuple[float, float]:
    """(ROI PSNR, non-ROI PSNR): the mask is binarised at ``threshold`` (white = ROI)."""
    roi = (mask >= threshold).to(x.dtype)
    return masked_psnr(x, y, roi), masked_psnr(x, y, 1 - roi)


def quality_weighted_psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                          roi_quality: float = 0.0) -> float:
    """PSNR with each pixel's squared error weighted by its quality ``m + (1 - m) Q`` (the map a
    graded file is coded from: a quality map is ``mask`` with Q = 0); plain PSNR without a mask."""
    if mask is None:
        return psnr(x, y)
    m = mask.double().clamp(0, 1)
    return masked_psnr(x, y, m + (1 - m) * float(roi_quality))


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """MS-SSIM (pytorch-msssim, 5 scales). Images of 160 px a side or less use a smaller
    Gaussian window (pytorch-msssim needs ``side > 16 * (window - 1)``); ``nan`` at 32 px or less."""
    side = min(x.shape[-2:])
    win = 11 if side > 160 else (side - 1) // 16 + 1
    win -= 1 - win % 2  # odd
    if win < 3:
        return float("nan")
    return float(_ms_ssim(x.float(), y.float(), data_range=1.0, win_size=win))
