"""Entropy families: the distribution y's elements are coded with, given parameters.

A family owns everything that depends on the distribution and nothing else: how many
parameters per latent channel the hyper-decoder (or a context network) predicts and how they
are laid out (one split: scales, means, then shape logits when there are any), the likelihood
used in training, the CDF tables and their integer-exact table index on the coding path, and
how CompressAI's Gaussian hyperprior weights are adapted to it. The latent structures
(:mod:`pipeline.codec.latent`) call it; the transforms never see it.

- ``gaussian``: CompressAI's ``GaussianConditional`` (mean, scale), 256 scale levels.
- ``generalized_gaussian``: mean, scale and shape ``beta`` (:mod:`.generalized_gaussian`),
  the shape per element (``beta_mode="element"``, predicted) or per channel (``"channel"``,
  learned), bounded to [0.5, 3].
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from compressai.models.base import get_scale_table
from torch import Tensor, nn

from pipeline.codec.entropy.compact import CompactGaussianConditional
from pipeline.codec.entropy.generalized_gaussian import GeneralizedGaussianConditional, std_factor
from pipeline.codec.integer import GaussianTableIndex, GeneralizedGaussianTableIndex

# CompressAI's default 64-level scale table costs ~3% extra bits on low-scale latents
# (a table scale up to 13% wider than predicted); 256 levels (3% apart) cut that to ~1%.
SCALE_TABLE_LEVELS = 256

Params = tuple[Tensor, Tensor, "Tensor | None"]  # scales, means, shape logits (or None)


class EntropyFamily(nn.Module):
    """Base of the families; ``conditional`` is the CompressAI entropy model that codes y."""

    name: ClassVar[str]
    conditional: nn.Module
    legacy_name: ClassVar[str]  # the conditional's attribute name in checkpoints before the parts

    def __init__(self, M: int) -> None:
        super().__init__()
        self.M = M

    @property
    def params_per_channel(self) -> int:
        return 2

    @property
    def config(self) -> dict[str, Any]:
        """The family's own options (what rebuilds it besides M)."""
        return {}

    def split(self, params: Tensor) -> Params:
        """Entropy parameters laid out as ``[scales | means | shape logits]`` along channels."""
        parts = params.chunk(self.params_per_channel, 1)
        return parts[0], parts[1], parts[2] if len(parts) == 3 else None

    def forward(self, y: Tensor, scales: Tensor, means: Tensor, extra: Tensor | None,
                first: int = 0, end: int | None = None) -> tuple[Tensor, Tensor]:
        """CompressAI's ``(y_hat, likelihoods)`` of channels ``first..end`` of y (noise in train mode)."""
        raise NotImplementedError

    # -- the coding path -------------------------------------------------------------
    def update(self, force: bool = False) -> bool:
        """Build the CDF tables."""
        raise NotImplementedError

    def coding_ready(self) -> bool:
        return self.conditional._offset.numel() > 0

    def make_table_index(self, channels: int) -> nn.Module:
        """An (unbuilt) integer table index for ``channels`` latent channels."""
        raise NotImplementedError

    def build_table_index(self, index: nn.Module, frac: int, first: int, end: int) -> None:
        """Build ``index`` for integer parameters with ``frac`` fraction bits, channels first..end."""
        raise NotImplementedError

    def table_indexes(self, index: nn.Module, scales_int: Tensor, extra_int: Tensor | None) -> Tensor:
        """Table indexes of integer parameters (exact)."""
        raise NotImplementedError

    def float_indexes(self, scales: Tensor, extra: Tensor | None) -> Tensor:
        """Table indexes from float parameters: the pre-portability path, kept for comparison."""
        raise NotImplementedError

    # -- warm start from CompressAI's Gaussian mean-scale hyperprior -------------------
    def adapt_hyper_output(self, value: Tensor, is_weight: bool) -> tuple[Tensor, str | None]:
        """A Gaussian hyper-decoder's last layer (``[scales | means]`` outputs) for this family."""
        return value, None

    def finish_warm_start(self, adapted: dict[str, str], prefix: str) -> None:
        """Set what the Gaussian weights lack (recorded in ``adapted`` under ``prefix``)."""


class GaussianFamily(EntropyFamily):
    """The mean-scale Gaussian (CompressAI's ``GaussianConditional``)."""

    name = "gaussian"
    legacy_name = "gaussian_conditional"

    def __init__(self, M: int) -> None:
        super().__init__(M)
        self.conditional = CompactGaussianConditional(None)

    def forward(self, y: Tensor, scales: Tensor, means: Tensor, extra: Tensor | None,
                first: int = 0, end: int | None = None) -> tuple[Tensor, Tensor]:
        return self.conditional(y, scales, means=means)

    def update(self, force: bool = False) -> bool:
        return self.conditional.update_scale_table(get_scale_table(levels=SCALE_TABLE_LEVELS), force=force)

    def make_table_index(self, channels: int) -> nn.Module:
        return GaussianTableIndex(SCALE_TABLE_LEVELS)

    def build_table_index(self, index: nn.Module, frac: int, first: int, end: int) -> None:
        index.build(self.conditional.scale_table, frac)

    def table_indexes(self, index: nn.Module, scales_int: Tensor, extra_int: Tensor | None) -> Tensor:
        return index(scales_int)

    def float_indexes(self, scales: Tensor, extra: Tensor | None) -> Tensor:
        return self.conditional.build_indexes(scales)


class GeneralizedGaussianFamily(EntropyFamily):
    """The generalized Gaussian: shape per element (predicted) or per channel (learned)."""

    name = "generalized_gaussian"
    legacy_name = "gg_conditional"
    GAUSSIAN_BETA = 2.0
    BETA_MODES = ("element", "channel")

    def __init__(self, M: int, beta_mode: str = "element") -> None:
        if beta_mode not in self.BETA_MODES:
            raise ValueError("beta_mode must be 'element' or 'channel'")
        super().__init__(M)
        self.beta_mode = beta_mode
        self.conditional = GeneralizedGaussianConditional()
        if beta_mode == "channel":
            self.beta_logits = nn.Parameter(torch.zeros(1, M, 1, 1))

    @property
    def params_per_channel(self) -> int:
        return 3 if self.beta_mode == "element" else 2

    @property
    def config(self) -> dict[str, Any]:
        return {"beta_mode": self.beta_mode}

    def _betas(self, extra: Tensor | None, first: int, end: int | None, like: Tensor) -> Tensor:
        raw = extra if extra is not None else self.beta_logits[:, first:end].expand_as(like)
        return self.conditional.bound_beta(raw)

    def forward(self, y: Tensor, scales: Tensor, means: Tensor, extra: Tensor | None,
                first: int = 0, end: int | None = None) -> tuple[Tensor, Tensor]:
        return self.conditional(y, scales, self._betas(extra, first, end, scales), means=means)

    def update(self, force: bool = False) -> bool:
        return self.conditional.update(force=force)

    def make_table_index(self, channels: int) -> nn.Module:
        return GeneralizedGaussianTableIndex(len(get_scale_table()), self.conditional.beta_levels, channels)

    def build_table_index(self, index: nn.Module, frac: int, first: int, end: int) -> None:
        gg = self.conditional
        betas = gg.bound_beta(self.beta_logits[:, first:end]) if self.beta_mode == "channel" else None
        index.build(gg.scale_table, gg.beta_table, gg.beta_range, frac, std_factor, betas)

    def table_indexes(self, index: nn.Module, scales_int: Tensor, extra_int: Tensor | None) -> Tensor:
        return index(scales_int, extra_int)

    def float_indexes(self, scales: Tensor, extra: Tensor | None) -> Tensor:
        return self.conditional.build_indexes(scales, self._betas(extra, 0, None, scales))

    def _gaussian_raw_beta(self) -> float:
        """The pre-sigmoid shape whose bounded beta is 2 (the Gaussian)."""
        low, high = self.conditional.beta_range
        return math.log((self.GAUSSIAN_BETA - low) / (high - self.GAUSSIAN_BETA))

    def adapt_hyper_output(self, value: Tensor, is_weight: bool) -> tuple[Tensor, str | None]:
        # A Gaussian of std sigma is the generalized Gaussian of beta 2 and scale sigma * sqrt(2).
        scales, means = value.chunk(2, 0)
        parts = [scales * math.sqrt(2.0), means]
        if self.beta_mode == "element":
            parts.append(torch.full_like(scales, 0.0 if is_weight else self._gaussian_raw_beta()))
        return torch.cat(parts, 0), "generalized Gaussian at beta 2 (scale outputs x sqrt 2, shape outputs beta 2)"

    @torch.no_grad()
    def finish_warm_start(self, adapted: dict[str, str], prefix: str) -> None:
        if self.beta_mode == "channel":
            self.beta_logits.fill_(self._gaussian_raw_beta())
            adapted[prefix + "beta_logits"] = "beta 2 (the Gaussian the weights were trained with)"


FAMILIES: dict[str, type[EntropyFamily]] = {f.name: f for f in (GaussianFamily, GeneralizedGaussianFamily)}


def build_family(name: str, M: int, **options: Any) -> EntropyFamily:
    """A family by name, e.g. ``build_family("generalized_gaussian", 192, beta_mode="channel")``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown entropy family {name!r}; choose from {sorted(FAMILIES)}")
    try:
        return FAMILIES[name](M, **options)
    except TypeError:
        raise ValueError(f"entropy family {name} takes no option(s) {', '.join(sorted(options))}") from None
