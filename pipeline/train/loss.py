"""ROI-weighted rate-distortion loss with a per-pixel lambda map.

``lambda_i = alpha * exp(omega * m_i)`` where ``m`` is the effective mask (non-ROI
pixels already set to the user's value Q), scaled by one of two normalisations:

- ``"roi"`` (the default): divided by ``exp(omega)``, i.e. ``alpha * exp(-omega (1 - m_i))``.
  ROI pixels get the rate point's lambda ``alpha`` whatever Q is, and the background
  ``alpha * exp(-omega (1 - Q))``: the rate sets the ROI's quality and Q how much of it
  the background keeps (Q = 1 is a plain codec at ``alpha``; Q = 0.1 with omega = 3
  weighs the background 15x less). At a fixed file size (``--target-bpp``) a lower Q
  moves bits into the ROI, whatever the ROI's share of the image.
- ``"mean"``: divided by its per-image mean, so the map's mean is ``alpha`` and Q moves
  bits at a similar total rate. With a small ROI (a few percent of the pixels) the
  background's weight then hardly changes with Q, so the knob is weak there.

``alpha`` is the rate point's lambda (CompressAI's convention: distortion is
``lambda * 255^2 * MSE``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pytorch_msssim import ms_ssim
from torch import nn


def rate_lambdas(n_rates: int, low: float = 0.0035, high: float = 0.0483) -> list[float]:
    """Geometrically spaced lambdas, one per trained rate point (low rate first)."""
    if n_rates == 1:
        return [high]
    return [low * (high / low) ** (k / (n_rates - 1)) for k in range(n_rates)]


NORMALIZATIONS = ("roi", "mean")


def lambda_map(mask: torch.Tensor, alpha: float | torch.Tensor, omega: float,
               normalize: str = "roi") -> torch.Tensor:
    """Per-pixel lambda ``alpha * exp(omega * m)`` (B,1,H,W) under a normalisation of
    :data:`NORMALIZATIONS` (see the module docstring)."""
    if normalize == "roi":
        weights = torch.exp(omega * (mask - 1.0))
    elif normalize == "mean":
        weights = torch.exp(omega * mask)
        weights = weights / weights.mean(dim=(1, 2, 3), keepdim=True)
    else:
        raise ValueError(f"lambda normalisation must be one of {NORMALIZATIONS}, got {normalize!r}")
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.view(-1, 1, 1, 1)
    return alpha * weights


def bits_per_pixel(likelihoods: dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Estimated bpp from the model's likelihoods (sum of -log2 p over all latents)."""
    return sum(torch.log(lk).sum() for lk in likelihoods.values()) / (-math.log(2) * num_pixels)


class ROIRateDistortionLoss(nn.Module):
    """``bpp + mean_i(lambda_i * 255^2 * mse_i)`` (+ optional weighted MS-SSIM term)."""

    def __init__(self, omega: float = 3.0, normalize: str = "roi", ms_ssim_weight: float = 0.0) -> None:
        super().__init__()
        self.omega, self.normalize, self.ms_ssim_weight = omega, normalize, ms_ssim_weight

    def forward(self, output: dict[str, Any], target: torch.Tensor, mask: torch.Tensor,
                alpha: float | torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = target.shape
        x_hat = output["x_hat"]
        bpp = bits_per_pixel(output["likelihoods"], n * h * w)
        mse_map = (x_hat - target).pow(2).mean(dim=1, keepdim=True)
        lam = lambda_map(mask, alpha, self.omega, self.normalize)
        distortion = (lam * 255.0 ** 2 * mse_map).mean()
        result = {"bpp": bpp, "mse": mse_map.mean(), "distortion": distortion}
        loss = bpp + distortion
        if self.ms_ssim_weight > 0:
            # MS-SSIM needs images of at least ~160 px a side at its default 5 scales.
            msssim = ms_ssim(x_hat.clamp(0, 1), target, data_range=1.0, size_average=True)
            mean_alpha = alpha.mean() if isinstance(alpha, torch.Tensor) else alpha
            loss = loss + self.ms_ssim_weight * mean_alpha * 255.0 ** 2 * (1 - msssim) / 100.0
            result["ms_ssim"] = msssim
        result["loss"] = loss
        return result
