"""A U-Net discriminator conditioned on the decoded latent, and its BCE losses.

As Schönfeld et al.'s U-Net GAN (2020): an encoder (a full-resolution stem, then strided
convolutions) whose bottleneck gives one logit per image (global realness), and a decoder with
skip connections giving one logit per pixel; every layer is spectrally normalised. The condition
is the codec's ``y_hat``, projected by a 1x1 convolution, upsampled (nearest) to the image and
concatenated with it, as HiFiC conditions its discriminator. The condition is detached: the codec
learns from the adversarial term only through ``x_hat``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


def _conv(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Module:
    return spectral_norm(nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2))


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class UNetDiscriminator(nn.Module):
    """``disc(y_hat, x) -> (global_logits (B,1), pixel_logits (B,1,H,W))`` for images in [0,1];
    H and W multiples of ``2**depth``."""

    def __init__(self, in_ch: int = 3, latent_ch: int = 192, base: int = 32, depth: int = 4) -> None:
        super().__init__()
        cond_ch = max(base // 2, 1)
        self.cond = _conv(latent_ch, cond_ch, 1)
        self.stem = nn.Sequential(_conv(in_ch + cond_ch, base), _act())
        chans = [base * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList(nn.Sequential(_conv(a, b, 4, 2), _act()) for a, b in zip(chans[:-1], chans[1:]))
        self.global_head = spectral_norm(nn.Linear(chans[-1], 1))
        self.up = nn.ModuleList(nn.Sequential(_conv(a + b, b), _act()) for a, b in zip(chans[:0:-1], chans[-2::-1]))
        self.pixel_head = _conv(base, 1, 1)

    def forward(self, y_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        cond = F.interpolate(self.cond(y_hat), size=x.shape[-2:], mode="nearest")
        skips = [self.stem(torch.cat([2 * x - 1, cond], dim=1))]
        for block in self.down:
            skips.append(block(skips[-1]))
        h = skips.pop()
        global_logits = self.global_head(h.mean(dim=(2, 3)))
        for block in self.up:
            skip = skips.pop()
            h = block(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        return global_logits, self.pixel_head(h)


def _bce(logits: tuple[Tensor, Tensor], real: bool) -> Tensor:
    """BCE-with-logits of both heads against one label, summed over the heads."""
    return sum(F.binary_cross_entropy_with_logits(t, torch.full_like(t, float(real))) for t in logits)


def generator_adv_loss(disc: UNetDiscriminator, y_hat: Tensor, x_hat: Tensor) -> Tensor:
    """``-log D(y_hat, x_hat)`` on both heads (gradients reach the codec through ``x_hat``; step only
    the codec's optimiser on it, the discriminator's gradients from it are to be discarded)."""
    return _bce(disc(y_hat.detach(), x_hat), real=True)


def discriminator_loss(disc: UNetDiscriminator, y_hat: Tensor, x_hat: Tensor, x: Tensor) -> Tensor:
    """``-log(1 - D(y_hat, x_hat)) - log D(y_hat, x)`` on both heads (codec outputs detached)."""
    y_hat = y_hat.detach()
    return _bce(disc(y_hat, x_hat.detach()), real=False) + _bce(disc(y_hat, x), real=True)


@torch.no_grad()
def discriminator_accuracy(disc: UNetDiscriminator, y_hat: Tensor, x_hat: Tensor, x: Tensor) -> float:
    """Fraction of the real and decoded images the global head classifies right (logit > 0: real)."""
    fake, _ = disc(y_hat, x_hat)
    real, _ = disc(y_hat, x)
    return float(((real > 0).sum() + (fake < 0).sum()) / (real.numel() + fake.numel()))
