"""Swin transformer stages for the ``swin`` variant, on timm's Swin blocks.

timm's :class:`~timm.models.swin_transformer.SwinTransformerBlock` (window attention with
relative position bias, shifted windows, LayerNorm residuals and a feed-forward network)
and :class:`~timm.models.swin_transformer.PatchMerging` do the work; this module only
adapts them to the codec's (B,C,H,W) feature maps of any size (a map is zero-padded to whole
windows for a stage and cropped after it; ``always_partition`` keeps the window fixed, the
shift mask follows the padded size) and adds patch splitting, patch merging's mirror for the
decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import nn

HEAD_DIM = 32


def heads_for(dim: int) -> int:
    """Attention heads for a stage of width ``dim``: one per 32 channels (at least one)."""
    return max(1, dim // HEAD_DIM)


class SwinStage(nn.Module):
    """``depth`` Swin blocks on a (B,C,H,W) map, windows alternately plain and shifted by half."""

    def __init__(self, dim: int, depth: int, window: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, (window, window), num_heads=heads_for(dim), window_size=window,
                                 shift_size=0 if i % 2 == 0 else window // 2, always_partition=True,
                                 dynamic_mask=True, mlp_ratio=mlp_ratio)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # whole windows before the cyclic shift, so the shift mask matches what wrapped around
        h = F.pad(x, (0, -width % self.window, 0, -height % self.window)).permute(0, 2, 3, 1)
        for block in self.blocks:
            h = block(h)
        return h.permute(0, 3, 1, 2)[..., :height, :width].contiguous()


class Downsample(nn.Module):
    """Patch merging (2x2 neighbours concatenated, LayerNorm, linear) on a (B,C,H,W) map."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.merge = PatchMerging(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


class PatchSplit(nn.Module):
    """Patch splitting, patch merging's mirror: LayerNorm, a linear map to ``4 * out_dim``
    channels and a 2x depth-to-space, on a (B,C,H,W) map."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.expand = nn.Linear(dim, 4 * out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(self.norm(x.permute(0, 2, 3, 1)))
        return F.pixel_shuffle(h.permute(0, 3, 1, 2), 2)


class SwinHyperAnalysis(nn.Module):
    """The hyper-encoder: Swin stages (small windows) and two patch mergings, y -> z (1/4 of y's grid)."""

    def __init__(self, M: int, N: int, depths: tuple[int, int], window: int) -> None:
        super().__init__()
        self.stages = nn.Sequential(SwinStage(M, depths[0], window), Downsample(M, N),
                                    SwinStage(N, depths[1], window), Downsample(N, N))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.stages(y)
