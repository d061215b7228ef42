"""The mean-scale hyperprior: y's entropy parameters from the hyper-latent alone."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.codec.entropy import EntropyFamily, pad_for_decoding
from pipeline.codec.latent.base import HYPER_LEGACY_NAMES, LatentStructure
from pipeline.codec.steps import QuantSteps, stepped


class HyperpriorLatent(LatentStructure):
    """Every element of y coded under the family's distribution with parameters from ``h_s``."""

    name = "hyperprior"
    legacy_names = {**HYPER_LEGACY_NAMES, "table_index": "latent_codec.table_index"}

    def __init__(self, N: int, M: int, family: EntropyFamily) -> None:
        super().__init__(N, M, family)
        self.table_index = family.make_table_index(M)

    def forward_y(self, y: Tensor, side: Tensor, steps: QuantSteps | None) -> tuple[Tensor, Tensor]:
        scales, means, extra = self.family.split(side)
        return stepped(lambda v, s, m: self.family(v, s, m, extra), y, scales, means, steps)

    def build_y_path(self, side: Tensor) -> None:
        self.family.build_table_index(self.table_index, self.hyper_int.output_frac, 0, self.M)

    def y_path_ready(self) -> bool:
        return True  # the table index is built with the integer hyper-decoder

    def entropy_parameters(self, side_int: Tensor, steps: QuantSteps | None, dtype: torch.dtype
                           ) -> tuple[Tensor, Tensor]:
        """y's table indexes (integer-exact; for the scales over the steps when given) and means."""
        scales_int, means_int, extra_int = self.family.split(side_int)
        if steps is not None:
            scales_int = steps.divide_scales(scales_int)
        return self.family.table_indexes(self.table_index, scales_int, extra_int), self.from_fixed(means_int, dtype)

    def float_entropy_parameters(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """The pre-portability path, kept for comparison: table indexes from the float
        hyper-decoder, which can differ between machines."""
        scales, means, extra = self.family.split(self.h_s(z_hat))
        return self.family.float_indexes(scales, extra), means

    def code_y(self, side_int: Tensor, dtype: torch.dtype, steps: QuantSteps | None, y: Tensor | None = None,
               strings: list[bytes] | None = None) -> dict[str, Any]:
        indexes, means = self.entropy_parameters(side_int, steps, dtype)
        coder = self.family.conditional
        step = 1.0 if steps is None else steps.sizes(dtype)
        if strings is None:
            means = means.to(y.dtype)
            symbols = torch.round((y - means) / step)
            strings = (coder.compress(y, indexes, means=means) if steps is None
                       else coder.compress((y - means) / step, indexes))
        else:
            padded = [pad_for_decoding(s, indexes[0].numel()) for s in strings]
            symbols = coder.decompress(padded, indexes, dtype)
        return {"strings": strings, "y_hat": symbols * step + means, "indexes": indexes, "symbols": symbols.double()}
