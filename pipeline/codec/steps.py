"""Spatial quantisation steps: the ROI's latents quantised finely, the background's coarsely.

The non-ROI value Q sets one quantisation step for every latent cell outside the ROI,
``1 / Q`` times the ROI's (in quarters, at most :data:`MAX_QUARTERS` / 4 = 16); a cell is ROI
when any of its 16x16 pixels has a mask value >= 0.5. The entropy model then codes
``(y - mean) / step`` under ``scale / step`` and the decoder rebuilds ``symbol * step + mean``
(variable-rate quantisation per region, as a quality map does in spatially adaptive codecs):
with Q = 0.1 most background symbols are 0 and cost almost nothing, whatever the transforms
learned. Q = 1 (or no mask) is step 1 everywhere, the plain codec.

The decoder needs the map of ROI cells, so it travels in the ``.roic`` file: one bit per
cell, packed and deflated (:func:`pack_cells`); the step comes from Q in the header. Steps
are whole quarters so that the table index (``scale_int * 4 // quarters``) and the context
model's fixed-point latent (``symbol * quarters * 2^frac / 4 + mean``) stay integer-exact.

Graded quality maps (``graded=True``) generalise this: the per-pixel quality ``m + (1 - m) Q`` (a
soft mask's ramps kept, or a quality map given as is with Q = 0) sets each cell's step from the
cell's mean quality, snapped to :data:`LEVEL_QUARTERS`, octave steps 1, 2, 4, 8, 16 (the mean and
the octaves measured best on the training photos' saliency maps, against the max and half
octaves: docs/architecture.md). Any step map travels as a *level map* (:mod:`pipeline.codec.level_map`, ``.roic``
version 4): the whole-quarter steps in use, then each cell's index among them coded from its
neighbours; a binary map is its two-level case. Version 3's one-bit cell maps (:func:`pack_cells`)
still decode.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from compressai.ops import quantize_ste
from torch import Tensor

STEP_ONE = 4  # quarters in a step of 1
MAX_QUARTERS = 64  # the coarsest background step: 16
CELL = 16  # pixels per latent cell side (the analysis transform's stride)
ROI_THRESHOLD = 0.5
# the graded maps' levels: steps 2^k for k = 0..4, in whole quarters (1, 2, 4, 8, 16)
LEVEL_QUARTERS = (4, 8, 16, 32, 64)


def background_quarters(roi_quality: float | Tensor) -> Tensor:
    """The background's step in quarters for each Q: ``round(4 / Q)`` within ``[4, 64]`` (int64)."""
    q = torch.as_tensor(roi_quality, dtype=torch.float64).reshape(-1)
    return torch.round(STEP_ONE / q.clamp_min(STEP_ONE / MAX_QUARTERS)).clamp(STEP_ONE, MAX_QUARTERS).long()


def roi_cells(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Which latent cells hold ROI (B,1,h,w bool): any pixel of the cell at >= 0.5."""
    pooled = F.adaptive_max_pool2d(mask.float(), grid)
    return pooled >= ROI_THRESHOLD


@dataclass(frozen=True)
class QuantSteps:
    """Quantisation steps per latent cell, in whole quarters of a step of 1: the one form the
    steps take everywhere (``quarters``: a (B,1,h,w) tensor of whole numbers). ``None`` in their
    place means step 1 everywhere (the plain codec)."""

    quarters: Tensor

    def sizes(self, dtype: torch.dtype) -> Tensor:
        """The step sizes (exact: whole quarters)."""
        return (self.quarters / STEP_ONE).to(dtype)

    def divide_scales(self, scales_int: Tensor) -> Tensor:
        """Integer scale parameters divided by the step, truncated: ``scale_int * 4 // quarters`` (exact)."""
        return torch.div(scales_int * STEP_ONE, self.quarters.to(scales_int.dtype), rounding_mode="trunc")

    def times(self, symbols: Tensor) -> Tensor:
        """``symbols * step`` for integer symbols (float64, exact)."""
        return symbols * self.quarters.to(torch.float64) / STEP_ONE


def step_map(cells: Tensor, roi_quality: float | Tensor) -> QuantSteps | None:
    """The steps of the ROI cells' map (B,1,h,w bool): 4 quarters in the ROI cells, the
    background's step elsewhere; None when every step is 1 (no mask effect: the plain codec)."""
    background = background_quarters(roi_quality).to(cells.device)
    if bool((background == STEP_ONE).all()) or bool(cells.all()):
        return None
    background = background.view(-1, 1, 1, 1).to(torch.float32).expand(cells.shape[0], 1, 1, 1)
    return QuantSteps(torch.where(cells, torch.full_like(background, float(STEP_ONE)), background))


def stepped(entropy_model: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]], y: Tensor, scales: Tensor,
            means: Tensor, steps: QuantSteps | None) -> tuple[Tensor, Tensor]:
    """``entropy_model(y, scales, means) -> (y_hat, likelihoods)`` with quantisation ``steps``
    (None: 1): it sees ``(y - means) / step`` under ``scales / step`` (a location-scale
    family, so a bin of width 1 there is a bin of width ``step`` around the mean), and
    ``y_hat`` is mapped back."""
    if steps is None:
        return entropy_model(y, scales, means)
    step = steps.sizes(y.dtype)
    y_hat, likelihoods = entropy_model((y - means) / step, scales / step, torch.zeros_like(means))
    return y_hat * step + means, likelihoods


def quantize_stepped(y: Tensor, means: Tensor, steps: QuantSteps | None) -> Tensor:
    """``round((y - means) / step) * step + means`` with a straight-through gradient."""
    if steps is None:
        return quantize_ste(y - means) + means
    step = steps.sizes(y.dtype)
    return quantize_ste((y - means) / step) * step + means


def pack_cells(cells: Tensor) -> bytes:
    """One image's ROI cells (1,h,w or h,w bool) as deflated packed bits."""
    bits = np.packbits(cells.reshape(-1).cpu().numpy().astype(np.uint8))
    return zlib.compress(bits.tobytes(), 9)


def unpack_cells(data: bytes, grid: tuple[int, int]) -> Tensor:
    """The (1,1,h,w) bool map of :func:`pack_cells`; ``ValueError`` for data that is not one."""
    h, w = grid
    expected = (h * w + 7) // 8
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, expected + 1)  # never inflates more than one map's worth
    except zlib.error as exc:
        raise ValueError(f"ROI cell map does not inflate ({exc})") from exc
    if len(raw) != expected or not inflater.eof or inflater.unused_data:
        raise ValueError(f"ROI cell map of {len(raw)} bytes, expected {expected} for {h}x{w} cells")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:h * w]
    return torch.from_numpy(bits.astype(bool)).reshape(1, 1, h, w)


def graded_steps(quality: Tensor, grid: tuple[int, int]) -> QuantSteps | None:
    """Steps of a per-pixel quality map (B,1,H,W in [0,1], 1 = best) on a latent ``grid``: each
    cell's mean quality q gives the level ``round(log2(1/q))`` of :data:`LEVEL_QUARTERS` (0..4:
    q = 1 step 1, q = 0.5 step 2, q = 0.1 step 8, q <= 1/16 step 16); None when every step is 1.
    Encoder side only (the level map travels in the file)."""
    cell_quality = F.adaptive_avg_pool2d(quality.double().clamp(0, 1), grid).clamp_min(1.0 / 16)
    levels = torch.round(-torch.log2(cell_quality)).long().clamp(0, len(LEVEL_QUARTERS) - 1)
    quarters = torch.tensor(LEVEL_QUARTERS, device=quality.device)[levels]
    if bool((quarters == STEP_ONE).all()):
        return None
    return QuantSteps(quarters.float())


def quantisation_steps(mask: Tensor | None, roi_quality: float | Tensor, grid: tuple[int, int],
                       graded: bool = False) -> QuantSteps | None:
    """The steps of a mask (B,1,H,W in [0,1]) and Q on a latent ``grid``: binary (a cell is ROI when
    any pixel is >= 0.5, step 1; the background's step from Q) or ``graded`` (:func:`graded_steps`
    of the quality ``m + (1 - m) Q``); None without a mask or when every step is 1."""
    if mask is None:
        return None
    if graded:
        q = torch.as_tensor(roi_quality, dtype=mask.dtype, device=mask.device).reshape(-1, 1, 1, 1)
        return graded_steps(mask.clamp(0, 1) + (1 - mask.clamp(0, 1)) * q, grid)
    return step_map(roi_cells(mask, grid), roi_quality)

