"""Spatially-adaptive feature transforms (SFT) in both transforms (the ``sft`` and ``ggm`` presets).

Encoder: an SFT block at each scale from 1/4 down to the latent (after the second and third
GDN stages and on y itself), whose condition is the mask concatenated with the image,
average-pooled to that scale. Decoder: the condition is computed from the decoded hyper-latent
z_hat (on y's grid, resized to each scale) and applied to y_hat and after the first two
inverse-GDN stages, so no mask is transmitted. The 1/2 scale has no SFT block: there it would
cost ~35% of the analysis transform's time on CPU (an N-channel tensor at a quarter of the
image's pixels) for detail the 1/16 latent grid cannot carry anyway.
"""

from __future__ import annotations

from compressai.layers import GDN
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

from pipeline.codec.layers import SFT, MaskImageCondition, hyper_condition
from pipeline.codec.transforms.base import Transforms


class SFTAnalysis(nn.Module):
    def __init__(self, N: int, M: int, c: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([conv(3, N), conv(N, N), conv(N, N), conv(N, M)])
        self.gdns = nn.ModuleList([GDN(N) for _ in range(3)])
        self.conds = nn.ModuleList([MaskImageCondition(c, 2 ** k) for k in (2, 3, 4)])
        self.sfts = nn.ModuleList([SFT(N, c), SFT(N, c), SFT(M, c)])

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.gdns[0](self.convs[0](x))
        for conv_k, gdn, cond, sft in zip(self.convs[1:], [*self.gdns[1:], None], self.conds, self.sfts):
            h = conv_k(h)
            h = sft(gdn(h) if gdn is not None else h, cond(x, mask))
        return h


class SFTSynthesis(nn.Module):
    def __init__(self, N: int, M: int, c: int) -> None:
        super().__init__()
        self.hyper_cond = hyper_condition(N, c)
        self.convs = nn.ModuleList([deconv(M, N), deconv(N, N), deconv(N, N), deconv(N, 3)])
        self.gdns = nn.ModuleList([GDN(N, inverse=True) for _ in range(3)])
        self.sfts = nn.ModuleList([SFT(M, c), SFT(N, c), SFT(N, c)])

    def forward(self, y_hat: Tensor, z_hat: Tensor) -> Tensor:
        cond = self.hyper_cond(z_hat)
        h = y_hat
        for deconv_k, gdn, sft in zip(self.convs, self.gdns, self.sfts):
            h = gdn(deconv_k(sft(h, cond)))
        return self.convs[-1](h)


class SFTTransforms(Transforms):
    """SFT blocks conditioned on mask + image (encoder) and on the hyper-latent (decoder)."""

    name = "sft"
    warm_start_names = {**{f"g_a.{2 * i}": f"g_a.convs.{i}" for i in range(4)},
                        **{f"g_a.{2 * i + 1}": f"g_a.gdns.{i}" for i in range(3)},
                        **{f"g_s.{2 * i}": f"g_s.convs.{i}" for i in range(4)},
                        **{f"g_s.{2 * i + 1}": f"g_s.gdns.{i}" for i in range(3)}}
    legacy_names = {"enc_convs": "g_a.convs", "enc_gdns": "g_a.gdns", "enc_conds": "g_a.conds",
                    "enc_sfts": "g_a.sfts", "hyper_cond": "g_s.hyper_cond", "dec_convs": "g_s.convs",
                    "dec_gdns": "g_s.gdns", "dec_sfts": "g_s.sfts"}

    def __init__(self, N: int, M: int, cond_channels: int = 32) -> None:
        self.g_a = SFTAnalysis(N, M, cond_channels)
        self.g_s = SFTSynthesis(N, M, cond_channels)
        self.config = {"cond_channels": cond_channels}
