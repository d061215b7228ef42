"""The hyper path every latent structure shares: ``y -> z`` (``h_a``), the entropy bottleneck
that codes z, and ``z_hat -> entropy parameters`` (``h_s``, with its integer-exact twin
``hyper_int`` on the coding path), computed once per call. Subclasses say how y is coded given
those parameters (:mod:`.hyperprior`, :mod:`.context`), through an entropy family
(:mod:`pipeline.codec.entropy.families`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

from pipeline.codec.entropy import EntropyFamily, pad_for_decoding
from pipeline.codec.integer import IntegerHyperSynthesis, hyper_latent_samples
from pipeline.codec.steps import QuantSteps

# our modules' names in checkpoints written before the codec was composed from parts, {old: new}
HYPER_LEGACY_NAMES = {"h_a": "latent_codec.h_a", "h_s": "latent_codec.h_s",
                      "entropy_bottleneck": "latent_codec.entropy_bottleneck", "hyper_int": "latent_codec.hyper_int"}


def hyper_analysis_layers(N: int, M: int) -> nn.Sequential:
    """MeanScaleHyperprior's ``h_a``."""
    return nn.Sequential(conv(M, N, stride=1, kernel_size=3), nn.LeakyReLU(inplace=True),
                         conv(N, N), nn.LeakyReLU(inplace=True), conv(N, N))


def hyper_synthesis_layers(N: int, M: int, out_channels: int) -> nn.Sequential:
    """MeanScaleHyperprior's ``h_s`` with ``out_channels`` entropy parameters."""
    return nn.Sequential(deconv(N, M), nn.LeakyReLU(inplace=True), deconv(M, M * 3 // 2), nn.LeakyReLU(inplace=True),
                         conv(M * 3 // 2, out_channels, stride=1, kernel_size=3))


class LatentStructure(nn.Module):
    """``y`` and its hyper-latent ``z``: training likelihoods, and the integer-exact coding path.

    Args:
        N, M: hyper-latent and latent channels.
        family: the entropy family that codes y.

    ``h_a`` is MeanScaleHyperprior's; transforms with their own hyper-analysis replace it
    (``swin``). The construction order (and so what a seed initialises) is the one the codec
    had before it was composed from parts: the same seed gives the same initial weights.
    """

    name: ClassVar[str]
    legacy_names: ClassVar[dict[str, str]] = {}

    def __init__(self, N: int, M: int, family: EntropyFamily) -> None:
        super().__init__()
        self.N, self.M = N, M
        self.family = family
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.h_a: nn.Module = hyper_analysis_layers(N, M)
        self.h_s = hyper_synthesis_layers(N, M, family.params_per_channel * M)
        self.hyper_int = IntegerHyperSynthesis(self.h_s, N)

    @property
    def config(self) -> dict[str, Any]:
        """The structure's own options."""
        return {}

    # -- what a structure adds -----------------------------------------------------------
    def forward_y(self, y: Tensor, side: Tensor, steps: QuantSteps | None) -> tuple[Tensor, Tensor]:
        """``(y_hat, likelihoods)`` in training, given the float side parameters ``h_s(z_hat)``."""
        raise NotImplementedError

    def code_y(self, side_int: Tensor, dtype: torch.dtype, steps: QuantSteps | None, y: Tensor | None = None,
               strings: list[bytes] | None = None) -> dict[str, Any]:
        """Encode ``y`` or decode ``strings`` on the integer path: ``strings`` (encoding), ``y_hat``
        (what the synthesis sees), and the coded state ``indexes`` and ``symbols``."""
        raise NotImplementedError

    def build_y_path(self, side: Tensor) -> None:
        """Build y's integer path from typical float side parameters (calibration, table indexes)."""
        raise NotImplementedError

    def y_path_ready(self) -> bool:
        raise NotImplementedError

    # -- training ------------------------------------------------------------------------
    def forward(self, y: Tensor, steps: QuantSteps | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(y_hat, {"y": ..., "z": ...} likelihoods, z_hat)``; the entropy models in float32."""
        z = self.h_a(y)
        with torch.autocast(y.device.type, enabled=False):
            z_hat, z_likelihoods = self.entropy_bottleneck(z.float())
            y_hat, y_likelihoods = self.forward_y(y, self.h_s(z_hat), steps)
        return y_hat, {"y": y_likelihoods, "z": z_likelihoods}, z_hat

    # -- coding --------------------------------------------------------------------------
    def hyper_symbols(self, z_hat: Tensor) -> Tensor:
        """The integer symbols ``round(z_hat - median)`` of a decoded hyper-latent (float64)."""
        medians = self.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
        return torch.round(z_hat.to(torch.float64) - medians.to(torch.float64))

    def side_int(self, z_hat: Tensor) -> Tensor:
        """The integer side parameters of the coding path (``hyper_int.output_frac`` fraction bits)."""
        return self.hyper_int(self.hyper_symbols(z_hat))

    def from_fixed(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        return (values * math.ldexp(1.0, -self.hyper_int.output_frac)).to(dtype)

    @torch.no_grad()
    def compress(self, y: Tensor, steps: QuantSteps | None = None) -> dict[str, Any]:
        """``{"y": strings, "z": strings, "shape": z's grid}``, one string per batch item each."""
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.size()[-2:])
        state = self.code_y(self.side_int(z_hat), z_hat.dtype, steps, y=y)
        return {"y": state["strings"], "z": z_strings, "shape": z.size()[-2:]}

    @torch.no_grad()
    def decompress(self, y_strings: list[bytes], z_strings: list[bytes], shape: tuple[int, int] | torch.Size,
                   steps: QuantSteps | None = None) -> dict[str, Any]:
        """The decoded ``z_hat``, ``y_hat`` and coded state (``indexes``, ``symbols``) of the strings."""
        z_strings = [pad_for_decoding(s, self.N * shape[0] * shape[1]) for s in z_strings]
        z_hat = self.entropy_bottleneck.decompress(z_strings, shape)
        state = self.code_y(self.side_int(z_hat), z_hat.dtype, steps, strings=y_strings)
        return {**state, "z_hat": z_hat}

    def update(self, force: bool = False, update_quantiles: bool = False) -> bool:
        """Build the coding state: both entropy models' CDF tables and the integer-exact path."""
        updated_z = self.entropy_bottleneck.update(force=force, update_quantiles=update_quantiles)
        updated_y = self.family.update(force=force)
        if updated_z or updated_y or not self.coding_ready():
            self.build_integer_path()
            return True
        return False

    def coding_ready(self) -> bool:
        """Whether the tables and the integer networks are built (``update()`` has run)."""
        return (self.entropy_bottleneck._offset.numel() > 0 and self.family.coding_ready()
                and bool(self.hyper_int.ready) and self.y_path_ready())

    @torch.no_grad()
    def build_integer_path(self) -> None:
        """Integerise ``h_s`` (calibrated on hyper-latents drawn from the bottleneck's own tables),
        then y's path."""
        eb = self.entropy_bottleneck
        medians = eb._get_medians().detach().reshape(-1)
        symbols, bound = hyper_latent_samples(eb)
        calibration = symbols + medians.cpu().double()[None, :, None, None]
        self.build_y_path(self.hyper_int.build(self.h_s, medians, calibration, bound))
