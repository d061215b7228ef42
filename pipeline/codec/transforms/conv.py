"""MeanScaleHyperprior's convolutional transforms with the TLIC and TMA ROI conditioning.

- ``tlic``: the ROI map RM is the mask max-pooled to the latent grid, then box-smoothed
  (:func:`~pipeline.codec.layers.pool_mask`); channels ``K..M`` of y are scaled by
  ``(RM + alpha) / (1 + alpha)`` so non-ROI latents shrink and quantise to fewer bits; the first
  ``K`` channels are protected (kept whole) so the decoder still sees the background's structure.
- ``tma``: the effective mask (non-ROI pixels at Q) is a fourth input channel of the
  encoder, and :class:`~pipeline.codec.layers.LatentMaskAttention` fuses its pooled embedding
  with an importance map predicted from y to rescale y; it starts as the TLIC scaling with
  ``alpha = attention_prior`` on every channel (None: no prior).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.codec.layers import LatentMaskAttention, pool_mask
from pipeline.codec.transforms.base import ConvSynthesis, Transforms, analysis_layers

# MeanScaleHyperprior's g_a / g_s are ours, one level down
CONV_WARM_START = {"g_a": "g_a.net", "g_s": "g_s.net"}


class ScaledAnalysis(nn.Module):
    """TLIC's analysis: the convolutional ``g_a``, then the ROI latent scaling."""

    def __init__(self, N: int, M: int, alpha: float, protected: int, smooth_kernel: int) -> None:
        super().__init__()
        self.net = analysis_layers(3, N, M)
        self.alpha, self.protected, self.smooth_kernel = alpha, protected, smooth_kernel

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.net(x)
        rm = pool_mask(mask, y.shape[-2:], self.smooth_kernel)
        scale = (rm + self.alpha) / (1 + self.alpha)
        k = self.protected
        return torch.cat([y[:, :k], y[:, k:] * scale], dim=1)


class TLICTransforms(Transforms):
    """ROI latent scaling with protected channels."""

    name = "tlic"
    warm_start_names = CONV_WARM_START
    legacy_names = {"g_a": "g_a.net", "g_s": "g_s.net"}

    def __init__(self, N: int, M: int, alpha: float = 0.1, protected: int | None = None,
                 smooth_kernel: int = 3) -> None:
        protected = M // 4 if protected is None else protected
        if not 0 <= protected <= M:
            raise ValueError("protected channels must lie in [0, M]")
        self.g_a = ScaledAnalysis(N, M, alpha, protected, smooth_kernel)
        self.g_s = ConvSynthesis(N, M)
        self.config = {"alpha": alpha, "protected": protected, "smooth_kernel": smooth_kernel}


class MaskInputAnalysis(nn.Module):
    """TMA's analysis: the mask as a fourth input channel, then latent mask attention."""

    def __init__(self, net: nn.Sequential, attention: LatentMaskAttention) -> None:
        super().__init__()
        self.net, self.attention = net, attention

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.attention(self.net(torch.cat([x, mask], dim=1)), mask)


class TMATransforms(Transforms):
    """The customizable variant: user-set non-ROI value + latent mask attention."""

    name = "tma"
    warm_start_names = CONV_WARM_START
    legacy_names = {"g_a": "g_a.net", "g_s": "g_s.net", "attention": "g_a.attention"}

    def __init__(self, N: int, M: int, attention_hidden: int = 32, attention_prior: float | None = 0.1) -> None:
        net = analysis_layers(4, N, M)
        self.g_s = ConvSynthesis(N, M)  # built before the attention: the order a seed initialised before the parts
        self.g_a = MaskInputAnalysis(net, LatentMaskAttention(M, attention_hidden, prior_alpha=attention_prior))
        self.config = {"attention_hidden": attention_hidden, "attention_prior": attention_prior}

    def adapt_warm_start(self, name: str, value: Tensor) -> tuple[Tensor, str | None]:
        if name == "g_a.net.0.weight" and value.shape[1] == 3:
            return torch.cat([value, torch.zeros_like(value[:, :1])], 1), "mask input channel at zero"
        return value, None
