"""The Swin-transformer ROI codec's transforms (Li, Liang, Fu, Han, ICASSP 2023), the ``swin`` preset.

Analysis: a 5x5 stride-2 convolution and GDN, then four Swin stages (1/2, 1/4, 1/8 and the
latent's 1/16, patch merging in between; ``window`` x ``window`` windows), each followed by an
SFT block conditioned on the mask concatenated with the image, average-pooled to that scale.
Synthesis mirrors it (patch splitting, inverse GDN, a 5x5 stride-2 transposed convolution),
every stage's SFT condition computed from the decoded hyper-latent, so no mask travels. The
hyper-encoder is Swin too (``hyper_window``); the hyper-decoder stays convolutional because it
selects the coding tables and must have an integer-exact twin (:mod:`pipeline.codec.integer`).

``dims``: the widths of the 1/2, 1/4 and 1/8 stages (default N each; the latent stage has M);
``depths``: Swin blocks per analysis stage, the synthesis takes them reversed. The defaults are
the paper's size (15.67M parameters); :attr:`SwinTransforms.SMALL` is a configuration for CPU runs.
"""

from __future__ import annotations

from typing import Any

from compressai.layers import GDN
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

from pipeline.codec.layers import SFT, MaskImageCondition, hyper_condition
from pipeline.codec.transforms.base import Transforms
from pipeline.codec.transforms.swin_blocks import Downsample, PatchSplit, SwinHyperAnalysis, SwinStage


class SwinAnalysis(nn.Module):
    def __init__(self, widths: list[int], depths: list[int], window: int, c: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(conv(3, widths[0], kernel_size=5), GDN(widths[0]))
        self.stages = nn.ModuleList([SwinStage(w, d, window) for w, d in zip(widths, depths)])
        self.merges = nn.ModuleList([Downsample(a, b) for a, b in zip(widths, widths[1:])])
        self.conds = nn.ModuleList([MaskImageCondition(c, 2 ** k) for k in (1, 2, 3, 4)])
        self.sfts = nn.ModuleList([SFT(w, c) for w in widths])

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.embed(x)
        for i, (stage, cond, sft) in enumerate(zip(self.stages, self.conds, self.sfts)):
            if i:
                h = self.merges[i - 1](h)
            h = sft(stage(h), cond(x, mask))
        return h


class SwinSynthesis(nn.Module):
    def __init__(self, N: int, widths: list[int], depths: list[int], window: int, c: int) -> None:
        super().__init__()
        back = widths[::-1]
        self.hyper_cond = hyper_condition(N, c)
        self.sfts = nn.ModuleList([SFT(w, c) for w in back])
        self.stages = nn.ModuleList([SwinStage(w, d, window) for w, d in zip(back, depths[::-1])])
        self.splits = nn.ModuleList([PatchSplit(a, b) for a, b in zip(back, back[1:])])
        self.out = nn.Sequential(GDN(widths[0], inverse=True), deconv(widths[0], 3, kernel_size=5))

    def forward(self, y_hat: Tensor, z_hat: Tensor) -> Tensor:
        cond = self.hyper_cond(z_hat)
        h = y_hat
        for i, (sft, stage) in enumerate(zip(self.sfts, self.stages)):
            h = stage(sft(h, cond))
            if i < len(self.splits):
                h = self.splits[i](h)
        return self.out(h)


class SwinTransforms(Transforms):
    """Swin stages with an SFT block at every stage."""

    name = "swin"
    DEFAULTS = {"N": 128, "M": 320}
    SMALL: dict[str, Any] = {"depths": [1, 1, 2, 1]}
    warm_startable = False
    legacy_names = {"enc_embed": "g_a.embed", "enc_stages": "g_a.stages", "enc_merges": "g_a.merges",
                    "enc_conds": "g_a.conds", "enc_sfts": "g_a.sfts", "hyper_cond": "g_s.hyper_cond",
                    "dec_sfts": "g_s.sfts", "dec_stages": "g_s.stages", "dec_splits": "g_s.splits",
                    "dec_out": "g_s.out"}

    def __init__(self, N: int, M: int, dims: list[int] | None = None,
                 depths: list[int] | tuple[int, ...] = (2, 2, 6, 2), window: int = 8,
                 hyper_depths: list[int] | tuple[int, ...] = (1, 1), hyper_window: int = 4,
                 cond_channels: int = 32) -> None:
        dims = list(dims) if dims is not None else [N, N, N]
        depths, hyper_depths = list(depths), list(hyper_depths)
        if len(dims) != 3 or len(depths) != 4 or len(hyper_depths) != 2:
            raise ValueError("swin takes 3 stage widths (dims), 4 stage depths and 2 hyper depths")
        if min(dims) < 1 or min(depths + hyper_depths) < 1 or min(window, hyper_window) < 1:
            raise ValueError("swin's widths, depths and windows must be positive")
        widths = [*dims, M]
        self.g_a = SwinAnalysis(widths, depths, window, cond_channels)
        self.h_a = SwinHyperAnalysis(M, N, hyper_depths, hyper_window)
        self.g_s = SwinSynthesis(N, widths, depths, window, cond_channels)
        self.config = {"dims": dims, "depths": depths, "window": window, "hyper_depths": hyper_depths,
                       "hyper_window": hyper_window, "cond_channels": cond_channels}
