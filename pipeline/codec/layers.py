"""ROI conditioning layers: gain units, SFT blocks and their conditions, latent mask attention, mask pooling.

Built on CompressAI's ``conv``/``deconv`` helpers; each layer is small and cheap next
to the analysis/synthesis transforms it conditions (see ``benchmarks/codec_speed.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from compressai.models.utils import conv, deconv
from torch import nn

RateLike = float | torch.Tensor


def pool_mask(mask: torch.Tensor, size: tuple[int, int], smooth_kernel: int = 1) -> torch.Tensor:
    """The ROI map of a (B,1,H,W) mask on a latent grid of ``size``, smoothed by average pooling.

    A latent cell takes the largest mask value of the pixels it covers (max pooling): the
    cell decodes those pixels, so an object smaller than the 16-pixel stride (a face in a
    crowd, a licence plate) keeps its full ROI value instead of being averaged away with
    the background around it. The map is then smoothed by a ``smooth_kernel`` box average
    (same-size output, borders averaged over valid cells only) that only ever raises a
    cell: ROI cells stay ROI, and their neighbours get a soft transition instead of a hard
    block edge.
    """
    pooled = F.adaptive_max_pool2d(mask, size)
    if smooth_kernel > 1:
        smooth = F.avg_pool2d(pooled, smooth_kernel, stride=1, padding=smooth_kernel // 2,
                              count_include_pad=False)
        pooled = torch.maximum(pooled, smooth)
    return pooled


class GainUnits(nn.Module):
    """Per-channel gain vectors for ``n_rates`` trained rate points (Cui et al., CVPR 2021).

    ``rate`` in [0, 1] picks a continuous position on the scale: between two trained
    points the gain is the geometric interpolation ``g_l^(1-t) * g_{l+1}^t``, so one
    model covers every rate in between. Rate 1 is the finest quantisation.
    """

    def __init__(self, n_rates: int, channels: int, low: float = 0.5, high: float = 2.0) -> None:
        super().__init__()
        if n_rates < 1:
            raise ValueError("n_rates must be at least 1")
        self.n_rates = n_rates
        init = torch.logspace(math.log10(low), math.log10(high), n_rates) if n_rates > 1 \
            else torch.ones(1)
        self.gain = nn.Parameter(init[:, None].repeat(1, channels))
        self.inverse_gain = nn.Parameter(1.0 / init[:, None].repeat(1, channels))

    def _interpolate(self, table: torch.Tensor, rate: RateLike, batch: int) -> torch.Tensor:
        rate_t = torch.as_tensor(rate, dtype=table.dtype, device=table.device).reshape(-1)
        if rate_t.numel() == 1:
            rate_t = rate_t.expand(batch)
        if bool(((rate_t < 0) | (rate_t > 1)).any()):
            raise ValueError("rate must lie in [0, 1]")
        pos = rate_t * (self.n_rates - 1)
        lower = pos.floor().long().clamp(max=self.n_rates - 1)
        upper = (lower + 1).clamp(max=self.n_rates - 1)
        t = (pos - lower.to(pos.dtype))[:, None]
        logs = table.abs().clamp_min(1e-6).log()
        vec = torch.exp(logs[lower] * (1 - t) + logs[upper] * t)
        return vec[:, :, None, None]

    def forward(self, y: torch.Tensor, rate: RateLike) -> torch.Tensor:
        """Scale the latent for ``rate`` (before quantisation)."""
        return y * self._interpolate(self.gain, rate, y.shape[0])

    def inverse(self, y_hat: torch.Tensor, rate: RateLike) -> torch.Tensor:
        """Undo the gain after decoding (the decoder knows the rate from the file)."""
        return y_hat * self._interpolate(self.inverse_gain, rate, y_hat.shape[0])


class SFT(nn.Module):
    """Spatially-adaptive feature transform: ``x * (1 + gamma) + beta``.

    gamma and beta are 1x1 projections of a condition feature map that is resized
    to ``x``'s resolution; they start at zero so an untrained block is the identity.
    """

    def __init__(self, channels: int, cond_channels: int) -> None:
        super().__init__()
        self.gamma = nn.Conv2d(cond_channels, channels, 1)
        self.beta = nn.Conv2d(cond_channels, channels, 1)
        for layer in (self.gamma, self.beta):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[-2:] != x.shape[-2:]:
            cond = F.interpolate(cond, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # x + x*gamma + beta in two passes over x instead of three (speed on CPU)
        return torch.addcmul(self.beta(cond).add_(x), x, self.gamma(cond))


class MaskImageCondition(nn.Module):
    """Encoder-side SFT condition at one scale: pooled mask concatenated with the pooled image."""

    def __init__(self, hidden: int, downscale: int) -> None:
        super().__init__()
        self.downscale = downscale
        self.net = nn.Sequential(conv(4, hidden, 3, 1), nn.LeakyReLU(inplace=True),
                                 conv(hidden, hidden, 1, 1), nn.LeakyReLU(inplace=True))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        k = self.downscale
        return self.net(torch.cat([F.avg_pool2d(x, k), F.avg_pool2d(mask, k)], dim=1))


def hyper_condition(N: int, channels: int) -> nn.Sequential:
    """Decoder-side SFT condition: the decoded hyper-latent z_hat (N channels) upsampled to y's grid."""
    return nn.Sequential(deconv(N, channels), nn.LeakyReLU(inplace=True),
                         deconv(channels, channels), nn.LeakyReLU(inplace=True))


class LatentMaskAttention(nn.Module):
    """Latent mask attention: fuse a mask embedding with an importance map predicted from y.

    ``a = 2 * sigmoid(prior(RM) + embed(RM) + importance(y))`` rescales every latent
    element, RM being the mask's ROI map on y's grid (:func:`pool_mask`). The learned
    branches start at zero; the fixed prior makes the untrained block the TLIC scaling
    ``a = (RM + alpha) / (1 + alpha)`` (1 in the ROI, ``alpha / (1 + alpha)`` where the
    mask is 0), so a lower non-ROI value costs the background bits from the first step
    and training refines the allocation. ``prior_alpha=None`` drops the prior (a = 1).
    """

    def __init__(self, channels: int, hidden: int = 32, smooth_kernel: int = 3,
                 prior_alpha: float | None = 0.1) -> None:
        super().__init__()
        self.smooth_kernel = smooth_kernel
        self.prior_alpha = prior_alpha
        self.embed = nn.Sequential(conv(1, hidden, 3, 1), nn.LeakyReLU(inplace=True),
                                   conv(hidden, channels, 1, 1))
        self.importance = conv(channels, channels, 1, 1)
        for layer in (self.embed[-1], self.importance):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def prior(self, roi_map: torch.Tensor) -> torch.Tensor:
        """The logit whose ``2 * sigmoid`` is ``(RM + alpha) / (1 + alpha)`` (0 without a prior)."""
        if self.prior_alpha is None:
            return torch.zeros_like(roi_map)
        half_scale = (roi_map + self.prior_alpha) / (2.0 * (1.0 + self.prior_alpha))
        return torch.logit(half_scale)

    def forward(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        roi_map = pool_mask(mask, y.shape[-2:], self.smooth_kernel)
        logits = self.prior(roi_map) + self.embed(roi_map) + self.importance(y)
        return y * 2 * torch.sigmoid(logits)
