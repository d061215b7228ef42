"""What every transforms kind provides: analysis, synthesis, the hyper-analysis, their options,
how CompressAI's mean-scale hyperprior weights map onto them, and their names in checkpoints
written before the codec was composed from parts."""

from __future__ import annotations

from typing import Any, ClassVar

from compressai.layers import GDN
from compressai.models.utils import conv, deconv
from torch import Tensor, nn


def analysis_layers(in_ch: int, N: int, M: int) -> nn.Sequential:
    """MeanScaleHyperprior's ``g_a`` (four stride-2 convolutions with GDN), ``in_ch`` inputs."""
    return nn.Sequential(conv(in_ch, N), GDN(N), conv(N, N), GDN(N), conv(N, N), GDN(N), conv(N, M))


def synthesis_layers(N: int, M: int) -> nn.Sequential:
    """MeanScaleHyperprior's ``g_s``."""
    return nn.Sequential(deconv(M, N), GDN(N, inverse=True), deconv(N, N), GDN(N, inverse=True),
                         deconv(N, N), GDN(N, inverse=True), deconv(N, 3))


class Transforms:
    """A kind of analysis/synthesis transforms, built for ``N``, ``M`` and its options.

    ``g_a(x, m) -> y`` takes the image and the effective mask (non-ROI pixels at Q);
    ``g_s(y_hat, z_hat) -> x_hat`` may use the decoded hyper-latent (never the mask);
    ``h_a(y) -> z``, when not None, replaces the latent structure's hyper-analysis (which is
    MeanScaleHyperprior's). ``config`` holds the options that rebuild it.
    """

    name: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, int]] = {"N": 128, "M": 192}
    # what the small configuration of CPU runs (tests, the demo, smoke runs) adds to N, M, n_rates
    SMALL: ClassVar[dict[str, Any]] = {}
    # whether CompressAI's MeanScaleHyperprior weights fit (its g_a/g_s/h_a layers are ours)
    warm_startable: ClassVar[bool] = True
    # where MeanScaleHyperprior's modules live here, {its module: ours}
    warm_start_names: ClassVar[dict[str, str]] = {}
    # the names of our modules in checkpoints written before the parts, {old module: new}
    legacy_names: ClassVar[dict[str, str]] = {}

    g_a: nn.Module
    g_s: nn.Module
    h_a: nn.Module | None = None
    config: dict[str, Any]

    def adapt_warm_start(self, name: str, value: Tensor) -> tuple[Tensor, str | None]:
        """The pretrained ``value`` for our tensor ``name`` (under ``g_a.``/``g_s.``), and why it
        was changed (None: as is)."""
        return value, None


class ConvSynthesis(nn.Module):
    """MeanScaleHyperprior's synthesis; the hyper-latent is not used."""

    def __init__(self, N: int, M: int) -> None:
        super().__init__()
        self.net = synthesis_layers(N, M)

    def forward(self, y_hat: Tensor, z_hat: Tensor) -> Tensor:
        return self.net(y_hat)

