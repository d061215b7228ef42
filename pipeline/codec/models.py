"""ROI codec variants on CompressAI's mean-scale hyperprior, registered by name.

Every variant takes ``(x, mask, roi_quality, rate)``:

- ``mask``: (B,1,H,W) in [0,1], 1 = ROI; ``None`` means all ROI (uniform quality).
- ``roi_quality`` Q in [0,1]: the value every non-ROI pixel takes before the mask
  conditions the encoder (``m + (1 - m) Q``); Q = 1 is uniform quality.
- ``rate`` in [0,1]: the position on the continuous rate scale of the gain units.

The decoder never needs the mask: ``decompress(strings, shape, rate)`` rebuilds the
image from the bitstream and the rate alone (the rate travels in the file header).

Variants:
- ``tlic``: smoothed ROI map scales all but the first K latent channels,
  ``y * (RM + alpha) / (1 + alpha)``.
- ``sft``: SFT blocks at the 1/4, 1/8 and latent scales conditioned on mask + image; the
  decoder's SFT condition comes from the decoded hyper-latent.
- ``tma``: the mask (with the user's non-ROI value) enters the encoder as a fourth
  input channel, and a latent mask attention block rescales y.
- ``ggm``: ``sft`` with a generalized Gaussian entropy model (learned shape beta).
- ``swin``: Swin transformer transforms (timm's blocks) with SFT blocks at every stage, the
  decoder's condition from the decoded hyper-latent.

Every variant codes y with one of two entropy models (``entropy=``): ``"hyperprior"``
(mean-scale, parameters from the hyper-latent alone) or ``"context"`` (channel groups with a
checkerboard context, :mod:`pipeline.codec.context`).

Coding (``compress``/``decompress``) selects y's CDF tables with integer-exact networks
(:mod:`pipeline.codec.integer`, built by ``update()``), so files decode the same on every
machine; training (``forward``) uses the float networks they came from.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import GDN
from compressai.models import CompressionModel
from compressai.models.base import get_scale_table
from compressai.models.utils import conv, deconv
from torch import nn

from pipeline.codec.context import ContextLatentCodec, default_groups, split_params
from pipeline.codec.entropy import (CompactGaussianConditional, GeneralizedGaussianConditional, pad_for_decoding,
                                    std_factor)
from pipeline.codec.integer import (GaussianTableIndex, GeneralizedGaussianTableIndex, IntegerHyperSynthesis,
                                    hyper_latent_samples)
from pipeline.codec.layers import (SFT, GainUnits, LatentMaskAttention, MaskImageCondition,
                                   RateLike, hyper_condition, pool_mask)
from pipeline.codec.steps import (CELL, pack_cells, roi_cells, step_map, stepped, stepped_scales, to_steps,
                                  unpack_cells)
from pipeline.codec.swin import Downsample, PatchSplit, SwinHyperAnalysis, SwinStage
from pipeline.masks.ops import assign_nonroi_value

MODELS: dict[str, type["ROICodec"]] = {}
ENTROPY_MODELS = ("hyperprior", "context")

# CompressAI's default 64-level scale table costs ~3% extra bits on low-scale latents
# (a table scale up to 13% wider than predicted); 256 levels (3% apart) cut that to ~1%.
SCALE_TABLE_LEVELS = 256


def register_model(name: str) -> Callable[[type["ROICodec"]], type["ROICodec"]]:
    """Class decorator: make a variant buildable by name."""
    def wrap(cls: type[ROICodec]) -> type[ROICodec]:
        cls.variant = name
        MODELS[name] = cls
        return cls
    return wrap


def build_model(variant: str, **config: Any) -> "ROICodec":
    """Build a registered variant, e.g. ``build_model("tlic", N=64, M=96)``."""
    if variant not in MODELS:
        raise ValueError(f"unknown codec variant {variant!r}; choose from {sorted(MODELS)}")
    return MODELS[variant](**config)


def pad_to_multiple(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom/right of a (B,C,H,W) tensor to a multiple of ``multiple``."""
    h, w = t.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(t, (0, pw, 0, ph), mode="replicate") if ph or pw else t


def _analysis_layers(in_ch: int, N: int, M: int) -> nn.Sequential:
    return nn.Sequential(conv(in_ch, N), GDN(N), conv(N, N), GDN(N), conv(N, N), GDN(N),
                         conv(N, M))


def _synthesis_layers(N: int, M: int) -> nn.Sequential:
    return nn.Sequential(deconv(M, N), GDN(N, inverse=True), deconv(N, N), GDN(N, inverse=True),
                         deconv(N, N), GDN(N, inverse=True), deconv(N, 3))


class ROICodec(CompressionModel):
    """Mean-scale hyperprior with ROI conditioning hooks and gain units for variable rate.

    Subclasses implement :meth:`analysis` (x, effective mask -> y) and may override
    :meth:`synthesis` (y_hat, z_hat -> x_hat) and the latent entropy model hooks.
    """

    variant: ClassVar[str] = "base"
    stride: ClassVar[int] = 64  # 16 (g_a) x 4 (h_a)
    # what the small configuration of CPU runs (tests, the demo, smoke runs) adds to N, M, n_rates
    SMALL: ClassVar[dict[str, Any]] = {}
    # whether g_a/g_s are MeanScaleHyperprior's convolutions, so CompressAI's weights can warm-start them
    warm_startable: ClassVar[bool] = True

    def __init__(self, N: int = 128, M: int = 192, n_rates: int = 4, entropy: str = "hyperprior",
                 groups: list[int] | None = None, context_hidden: int | None = None) -> None:
        super().__init__()
        if entropy not in ENTROPY_MODELS:
            raise ValueError(f"unknown entropy model {entropy!r}; choose from {list(ENTROPY_MODELS)}")
        self.N, self.M, self.n_rates, self.entropy = N, M, n_rates, entropy
        self.entropy_bottleneck = EntropyBottleneck(N)
        self._make_latent_entropy_model()
        self.h_a = nn.Sequential(conv(M, N, stride=1, kernel_size=3), nn.LeakyReLU(inplace=True),
                                 conv(N, N), nn.LeakyReLU(inplace=True), conv(N, N))
        self.h_s = nn.Sequential(deconv(N, M), nn.LeakyReLU(inplace=True),
                                 deconv(M, M * 3 // 2), nn.LeakyReLU(inplace=True),
                                 conv(M * 3 // 2, self._entropy_param_channels(), stride=1,
                                      kernel_size=3))
        self.gain = GainUnits(n_rates, M)
        self.hyper_int = IntegerHyperSynthesis(self.h_s, N)
        self.context: ContextLatentCodec | None = None
        if entropy == "context":
            groups = list(groups) if groups is not None else default_groups(M)
            if sum(groups) != M or min(groups) < 1:
                raise ValueError(f"channel groups {groups} must be positive and sum to M={M}")
            self.context = ContextLatentCodec(groups, self._entropy_param_channels(), self._params_per_channel(),
                                              [self._make_table_index(g) for g in groups],
                                              hidden=context_hidden or N)
        else:
            self.table_index = self._make_table_index(M)

    # -- configuration ---------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild the model with :func:`build_model`
        (the entropy model only when it is not the hyperprior, so older checkpoints keep
        their fingerprint)."""
        config: dict[str, Any] = {"N": self.N, "M": self.M, "n_rates": self.n_rates}
        if self.context is not None:
            config.update(entropy=self.entropy, groups=self.context.groups, context_hidden=self.context.hidden)
        return config

    # -- variant hooks ---------------------------------------------------------------
    def analysis(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # warm start from CompressAI's MeanScaleHyperprior (pipeline.codec.warm_start)
    @classmethod
    def warm_start_names(cls) -> dict[str, str]:
        """Where this variant keeps MeanScaleHyperprior's layers: ``{its module: ours}``, identity if absent."""
        return {}

    def adapt_warm_start(self, name: str, value: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        """The pretrained ``value`` for our tensor ``name``, and why it was changed (None: as is)."""
        return value, None

    def finish_warm_start(self, adapted: dict[str, str]) -> None:
        """Set what the pretrained weights lack but must match them (recorded in ``adapted``)."""

    def synthesis(self, y_hat: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        return self.g_s(y_hat)  # variants without their own synthesis define ``g_s``

    # the latent entropy model (the hooks ggm overrides)
    def _make_latent_entropy_model(self) -> None:
        self.gaussian_conditional = CompactGaussianConditional(None)

    def _entropy_param_channels(self) -> int:
        return 2 * self.M

    def _params_per_channel(self) -> int:
        return self._entropy_param_channels() // self.M

    def _make_table_index(self, channels: int) -> nn.Module:
        return GaussianTableIndex(SCALE_TABLE_LEVELS)

    def _build_group_index(self, index: nn.Module, frac: int, first: int, end: int) -> None:
        """Build a table index for integer parameters with ``frac`` fraction bits, channels first..end."""
        index.build(self.gaussian_conditional.scale_table, frac)

    def _group_indexes(self, index: nn.Module, scales_int: torch.Tensor, raw_int: torch.Tensor | None
                       ) -> torch.Tensor:
        return index(scales_int)

    def context_likelihood(self, y: torch.Tensor, scales: torch.Tensor, means: torch.Tensor,
                           raw: torch.Tensor | None, first: int, end: int) -> torch.Tensor:
        """Likelihoods of channels ``first..end`` of y under the entropy model (context model, training)."""
        return self.gaussian_conditional(y, scales, means=means)[1]

    def _hyperprior_forward(self, y: torch.Tensor, z_hat: torch.Tensor, steps: torch.Tensor | None = None):
        scales, means = self.h_s(z_hat).chunk(2, 1)
        return stepped(lambda v, s, m: self.gaussian_conditional(v, s, means=m), y, scales, means, steps)

    def _latent_forward(self, y: torch.Tensor, z_hat: torch.Tensor, steps: torch.Tensor | None = None):
        """``(y_hat, likelihoods)``; ``steps`` the quantisation steps per latent cell (None: 1)."""
        if self.context is not None:
            return self.context(y, self.h_s(z_hat), self.context_likelihood, steps)
        return self._hyperprior_forward(y, z_hat, steps)

    @property
    def latent_entropy_model(self) -> nn.Module:
        """The entropy model that codes y (its ``compress``/``decompress`` take table indexes)."""
        return self.gaussian_conditional

    def float_entropy_parameters(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-portability path, kept for comparison: table indexes from the float
        hyper-decoder, which can differ between machines."""
        scales, means = self.h_s(z_hat).chunk(2, 1)
        return self.gaussian_conditional.build_indexes(scales), means

    def _from_fixed(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (values * math.ldexp(1.0, -self.hyper_int.output_frac)).to(dtype)

    def hyper_symbols(self, z_hat: torch.Tensor) -> torch.Tensor:
        """The integer symbols ``round(z_hat - median)`` of a decoded hyper-latent (float64)."""
        medians = self.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
        return torch.round(z_hat.to(torch.float64) - medians.to(torch.float64))

    def _context_code(self, z_hat: torch.Tensor, **kw: Any) -> dict[str, Any]:
        side = self.hyper_int(self.hyper_symbols(z_hat))
        return self.context.code(side, self.hyper_int.output_frac, self.latent_entropy_model, self._group_indexes,
                                 dtype=z_hat.dtype, **kw)

    def _entropy_parameters(self, z_hat: torch.Tensor, quarters: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """y's table indexes (integer-exact, for the scales over ``quarters / 4`` when given) and
        means, from the integer hyper-decoder."""
        params = self.hyper_int(self.hyper_symbols(z_hat))
        scales_int, means_int, raw_int = split_params(params, self._params_per_channel())
        if quarters is not None:
            scales_int = stepped_scales(scales_int, quarters)
        return self._group_indexes(self.table_index, scales_int, raw_int), self._from_fixed(means_int, z_hat.dtype)

    def _latent_compress(self, y: torch.Tensor, z_hat: torch.Tensor, quarters: torch.Tensor | None = None
                         ) -> list[bytes]:
        """y's strings (one per batch item); ``quarters`` the quantisation steps (None: 1)."""
        if self.context is not None:
            return self._context_code(z_hat, y=y, quarters=quarters)["strings"]
        indexes, means = self._entropy_parameters(z_hat, quarters)
        means = means.to(y.dtype)
        if quarters is None:
            return self.latent_entropy_model.compress(y, indexes, means=means)
        return self.latent_entropy_model.compress((y - means) / to_steps(quarters, y.dtype), indexes)

    def decode_latent(self, strings: list[bytes], z_hat: torch.Tensor, quarters: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
        """y from its strings: ``y_hat`` and the coded state (``indexes``, ``symbols``)."""
        if self.context is not None:
            return self._context_code(z_hat, strings=strings, quarters=quarters)
        indexes, means = self._entropy_parameters(z_hat, quarters)
        strings = [pad_for_decoding(s, indexes[0].numel()) for s in strings]
        symbols = self.latent_entropy_model.decompress(strings, indexes, z_hat.dtype)
        step = 1.0 if quarters is None else to_steps(quarters, z_hat.dtype)
        return {"y_hat": symbols * step + means, "indexes": indexes, "symbols": symbols.double()}

    # -- shared plumbing -------------------------------------------------------------
    def update(self, scale_table: torch.Tensor | None = None, force: bool = False,
               update_quantiles: bool = False) -> bool:
        """Build the coding state: the entropy coders' CDF tables (a finer scale table than
        CompressAI's) and the integer-exact hyper-decoder that selects y's tables.

        Floating-point work, done once when a checkpoint is written; it travels in the
        checkpoint's buffers and :func:`~pipeline.codec.checkpoint.load_checkpoint` never redoes it.
        """
        if scale_table is None:
            scale_table = get_scale_table(levels=SCALE_TABLE_LEVELS)
        updated = super().update(scale_table, force=force, update_quantiles=update_quantiles)
        updated = self._update_latent_tables(force) or updated
        if updated or not bool(self.hyper_int.ready):
            self._build_integer_path()
            updated = True
        return updated

    def _update_latent_tables(self, force: bool) -> bool:
        return False  # CompressAI's update() already built the GaussianConditional's tables

    def coding_ready(self) -> bool:
        """Whether the tables and the integer networks are built (``update()`` has run)."""
        models = (self.entropy_bottleneck, self.latent_entropy_model)
        ready = all(m._offset.numel() > 0 for m in models) and bool(self.hyper_int.ready)
        return ready and (self.context is None or bool(self.context.ready))

    @torch.no_grad()
    def _build_integer_path(self) -> None:
        eb = self.entropy_bottleneck
        medians = eb._get_medians().detach().reshape(-1)
        symbols, bound = hyper_latent_samples(eb)
        calibration = symbols + medians.cpu().double()[None, :, None, None]
        side = self.hyper_int.build(self.h_s, medians, calibration, bound)
        if self.context is None:
            self._build_group_index(self.table_index, self.hyper_int.output_frac, 0, self.M)
            return
        self.context.build(side, self.hyper_int.output_frac, self._build_group_index)

    @staticmethod
    def effective_mask(x: torch.Tensor, mask: torch.Tensor | None,
                       roi_quality: RateLike) -> torch.Tensor:
        """The mask that conditions the encoder: non-ROI pixels take the value Q."""
        if mask is None:
            mask = torch.ones_like(x[:, :1])
        if mask.shape[-2:] != x.shape[-2:] or mask.shape[1] != 1:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match image {tuple(x.shape)}")
        return assign_nonroi_value(mask.clamp(0, 1), roi_quality)

    def _encode_latent(self, x: torch.Tensor, mask: torch.Tensor | None, roi_quality: RateLike,
                       rate: RateLike) -> torch.Tensor:
        m = self.effective_mask(x, mask, roi_quality)
        return self.gain(self.analysis(x, m), rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                roi_quality: RateLike = 1.0, rate: RateLike = 1.0) -> dict[str, Any]:
        """CompressAI-style forward: ``x_hat`` and ``likelihoods`` (noise in train mode,
        rounding around the predicted means in eval mode)."""
        y = self._encode_latent(x, mask, roi_quality, rate).float()
        z = self.h_a(y)
        quarters = None if mask is None else step_map(roi_cells(mask, y.shape[-2:]), roi_quality)
        with torch.autocast(x.device.type, enabled=False):  # entropy models in float32
            z_hat, z_likelihoods = self.entropy_bottleneck(z.float())
            y_hat, y_likelihoods = self._latent_forward(y, z_hat, None if quarters is None
                                                        else to_steps(quarters, y.dtype))
        x_hat = self.synthesis(self.gain.inverse(y_hat, rate), z_hat)
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    @torch.no_grad()
    def compress(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                 roi_quality: RateLike = 1.0, rate: RateLike = 1.0) -> dict[str, Any]:
        """Entropy-code x: ``{"strings": [y_strings, z_strings, cell_strings], "shape": z_hw}``.

        x of any size is replicate-padded to the stride; crop the decoded image. The third
        group is each image's map of ROI cells (:mod:`pipeline.codec.steps`), empty when every
        latent is quantised with step 1 (no mask, or Q = 1).
        """
        x = pad_to_multiple(x, self.stride)
        if mask is not None:
            mask = pad_to_multiple(mask, self.stride)
        y = self._encode_latent(x, mask, roi_quality, rate)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.size()[-2:])
        cells = None if mask is None else roi_cells(mask, y.shape[-2:])
        quarters = None if cells is None else step_map(cells, roi_quality)
        cell_strings = [b""] * len(x) if quarters is None else [pack_cells(c) for c in cells]
        return {"strings": [self._latent_compress(y, z_hat, quarters), z_strings, cell_strings],
                "shape": z.size()[-2:]}

    def coded_steps(self, strings: list[list[bytes]], shape: tuple[int, int] | torch.Size,
                    roi_quality: RateLike) -> torch.Tensor | None:
        """The quantisation steps (in quarters) of the coded ROI cell maps (the third string
        group) on a hyper-latent grid of ``shape``; None without a map (step 1 everywhere)."""
        cell_strings = strings[2] if len(strings) > 2 else []
        if all(not s for s in cell_strings):
            return None
        grid = (shape[0] * self.stride // CELL, shape[1] * self.stride // CELL)
        cells = torch.cat([unpack_cells(s, grid) for s in cell_strings])
        return step_map(cells.to(self.entropy_bottleneck.quantiles.device), roi_quality)

    @torch.no_grad()
    def decompress(self, strings: list[list[bytes]], shape: tuple[int, int] | torch.Size,
                   rate: RateLike = 1.0, roi_quality: RateLike = 1.0) -> dict[str, torch.Tensor]:
        """Rebuild the (padded) image from the strings (two groups: no ROI cell map, step 1
        everywhere); no mask needed, ``roi_quality`` the file's Q (its background step)."""
        z_strings = [pad_for_decoding(s, self.N * shape[0] * shape[1]) for s in strings[1]]
        z_hat = self.entropy_bottleneck.decompress(z_strings, shape)
        quarters = self.coded_steps(strings, shape, roi_quality)
        y_hat = self.decode_latent(strings[0], z_hat, quarters)["y_hat"]
        x_hat = self.synthesis(self.gain.inverse(y_hat, rate), z_hat).clamp_(0, 1)
        return {"x_hat": x_hat}


@register_model("tlic")
class TLIC(ROICodec):
    """ROI latent scaling with protected channels and gain units.

    The ROI map RM is the mask max-pooled to the latent grid, then box-smoothed (:func:`pool_mask`).
    Channels ``K..M`` are scaled by ``(RM + alpha) / (1 + alpha)`` so non-ROI latents
    shrink and quantise to fewer bits; the first ``K`` channels are protected (kept
    whole) so the decoder still sees the background's structure.
    """

    def __init__(self, N: int = 128, M: int = 192, n_rates: int = 4, alpha: float = 0.1,
                 protected: int | None = None, smooth_kernel: int = 3, **entropy: Any) -> None:
        super().__init__(N, M, n_rates, **entropy)
        self.alpha = alpha
        self.protected = M // 4 if protected is None else protected
        if not 0 <= self.protected <= M:
            raise ValueError("protected channels must lie in [0, M]")
        self.smooth_kernel = smooth_kernel
        self.g_a = _analysis_layers(3, N, M)
        self.g_s = _synthesis_layers(N, M)

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "alpha": self.alpha, "protected": self.protected,
                "smooth_kernel": self.smooth_kernel}

    def analysis(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.g_a(x)
        rm = pool_mask(mask, y.shape[-2:], self.smooth_kernel)
        scale = (rm + self.alpha) / (1 + self.alpha)
        k = self.protected
        return torch.cat([y[:, :k], y[:, k:] * scale], dim=1)


@register_model("sft")
class SFTCodec(ROICodec):
    """Spatially-adaptive feature transforms in both transforms.

    Encoder: an SFT block at each scale from 1/4 down to the latent (after the second
    and third GDN stages and on y itself), whose condition is the mask concatenated with
    the image, average-pooled to that scale. Decoder: the condition is computed from the
    decoded hyper-latent z_hat (on y's grid, resized to each scale) and applied to y_hat
    and after the first two inverse-GDN stages, so no mask is transmitted. The 1/2 scale
    has no SFT block: there it would cost ~35% of the analysis transform's time on CPU
    (an N-channel tensor at a quarter of the image's pixels) for detail the 1/16 latent
    grid cannot carry anyway.
    """

    def __init__(self, N: int = 128, M: int = 192, n_rates: int = 4, cond_channels: int = 32,
                 **entropy: Any) -> None:
        super().__init__(N, M, n_rates, **entropy)
        self.cond_channels = cond_channels
        c = cond_channels
        self.enc_convs = nn.ModuleList([conv(3, N), conv(N, N), conv(N, N), conv(N, M)])
        self.enc_gdns = nn.ModuleList([GDN(N) for _ in range(3)])
        self.enc_conds = nn.ModuleList([MaskImageCondition(c, 2 ** k) for k in (2, 3, 4)])
        self.enc_sfts = nn.ModuleList([SFT(N, c), SFT(N, c), SFT(M, c)])
        self.hyper_cond = hyper_condition(N, c)
        self.dec_convs = nn.ModuleList([deconv(M, N), deconv(N, N), deconv(N, N), deconv(N, 3)])
        self.dec_gdns = nn.ModuleList([GDN(N, inverse=True) for _ in range(3)])
        self.dec_sfts = nn.ModuleList([SFT(M, c), SFT(N, c), SFT(N, c)])

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "cond_channels": self.cond_channels}

    @classmethod
    def warm_start_names(cls) -> dict[str, str]:
        names = {f"g_a.{2 * i}": f"enc_convs.{i}" for i in range(4)}
        names.update({f"g_a.{2 * i + 1}": f"enc_gdns.{i}" for i in range(3)})
        names.update({f"g_s.{2 * i}": f"dec_convs.{i}" for i in range(4)})
        names.update({f"g_s.{2 * i + 1}": f"dec_gdns.{i}" for i in range(3)})
        return names

    def analysis(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.enc_gdns[0](self.enc_convs[0](x))
        for conv_k, gdn, cond, sft in zip(self.enc_convs[1:], [*self.enc_gdns[1:], None],
                                          self.enc_conds, self.enc_sfts):
            h = conv_k(h)
            h = sft(gdn(h) if gdn is not None else h, cond(x, mask))
        return h

    def synthesis(self, y_hat: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        cond = self.hyper_cond(z_hat)
        h = y_hat
        for deconv_k, gdn, sft in zip(self.dec_convs, self.dec_gdns, self.dec_sfts):
            h = gdn(deconv_k(sft(h, cond)))
        return self.dec_convs[-1](h)


@register_model("tma")
class TMA(ROICodec):
    """The customizable variant: user-set non-ROI value + latent mask attention.

    The effective mask (non-ROI pixels set to Q) is a fourth input channel of the
    encoder, and :class:`~pipeline.codec.layers.LatentMaskAttention` fuses its pooled
    embedding with an importance map predicted from y to rescale y; it starts as the
    TLIC scaling with ``alpha = attention_prior`` on every channel (None: no prior).
    """

    def __init__(self, N: int = 128, M: int = 192, n_rates: int = 4, attention_hidden: int = 32,
                 attention_prior: float | None = 0.1, **entropy: Any) -> None:
        super().__init__(N, M, n_rates, **entropy)
        self.attention_hidden = attention_hidden
        self.attention_prior = attention_prior
        self.g_a = _analysis_layers(4, N, M)
        self.g_s = _synthesis_layers(N, M)
        self.attention = LatentMaskAttention(M, attention_hidden, prior_alpha=attention_prior)

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "attention_hidden": self.attention_hidden,
                "attention_prior": self.attention_prior}

    def analysis(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attention(self.g_a(torch.cat([x, mask], dim=1)), mask)

    def adapt_warm_start(self, name: str, value: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        if name == "g_a.0.weight" and value.shape[1] == 3:
            return torch.cat([value, torch.zeros_like(value[:, :1])], 1), "mask input channel at zero"
        return value, None


@register_model("ggm")
class GGMCodec(SFTCodec):
    """``sft`` conditioning with a generalized Gaussian entropy model for y.

    The hyper-decoder predicts mean, scale and shape per element (``beta_mode="element"``),
    or mean and scale per element with one learned shape per channel
    (``beta_mode="channel"``). Shapes are bounded to [0.5, 3] by a sigmoid.
    """

    def __init__(self, N: int = 128, M: int = 192, n_rates: int = 4, cond_channels: int = 32,
                 beta_mode: str = "element", **entropy: Any) -> None:
        if beta_mode not in ("element", "channel"):
            raise ValueError("beta_mode must be 'element' or 'channel'")
        self.beta_mode = beta_mode  # read by _entropy_param_channels during super().__init__
        super().__init__(N, M, n_rates, cond_channels, **entropy)
        if beta_mode == "channel":
            self.beta_logits = nn.Parameter(torch.zeros(1, M, 1, 1))

    def _make_latent_entropy_model(self) -> None:
        self.gg_conditional = GeneralizedGaussianConditional()

    def _make_table_index(self, channels: int) -> nn.Module:
        return GeneralizedGaussianTableIndex(len(get_scale_table()), self.gg_conditional.beta_levels, channels)

    def _build_group_index(self, index: nn.Module, frac: int, first: int, end: int) -> None:
        gg = self.gg_conditional
        betas = gg.bound_beta(self.beta_logits[:, first:end]) if self.beta_mode == "channel" else None
        index.build(gg.scale_table, gg.beta_table, gg.beta_range, frac, std_factor, betas)

    def _group_indexes(self, index: nn.Module, scales_int: torch.Tensor, raw_int: torch.Tensor | None
                       ) -> torch.Tensor:
        return index(scales_int, raw_int)

    def context_likelihood(self, y: torch.Tensor, scales: torch.Tensor, means: torch.Tensor,
                           raw: torch.Tensor | None, first: int, end: int) -> torch.Tensor:
        raw = raw if raw is not None else self.beta_logits[:, first:end].expand_as(scales)
        return self.gg_conditional(y, scales, self.gg_conditional.bound_beta(raw), means=means)[1]

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "beta_mode": self.beta_mode}

    def _entropy_param_channels(self) -> int:
        return (3 if self.beta_mode == "element" else 2) * self.M

    GAUSSIAN_BETA = 2.0

    def _gaussian_raw_beta(self) -> float:
        """The pre-sigmoid shape whose bounded beta is 2 (the Gaussian)."""
        low, high = self.gg_conditional.beta_range
        return math.log((self.GAUSSIAN_BETA - low) / (high - self.GAUSSIAN_BETA))

    def adapt_warm_start(self, name: str, value: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        last = f"h_s.{len(self.h_s) - 1}."
        if not name.startswith(last) or value.shape[0] != 2 * self.M:
            return value, None
        # A Gaussian of std sigma is the generalized Gaussian of beta 2 and scale sigma * sqrt(2).
        scales, means = value.chunk(2, 0)
        parts = [scales * math.sqrt(2.0), means]
        if self.beta_mode == "element":
            fill = 0.0 if name.endswith("weight") else self._gaussian_raw_beta()
            parts.append(torch.full_like(scales, fill))
        return torch.cat(parts, 0), "generalized Gaussian at beta 2 (scale outputs x sqrt 2, shape outputs beta 2)"

    @torch.no_grad()
    def finish_warm_start(self, adapted: dict[str, str]) -> None:
        if self.beta_mode == "channel":
            self.beta_logits.fill_(self._gaussian_raw_beta())
            adapted["beta_logits"] = "beta 2 (the Gaussian the weights were trained with)"

    def _gg_params(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = self.h_s(z_hat)
        if self.beta_mode == "element":
            scales, means, raw = params.chunk(3, 1)
        else:
            (scales, means), raw = params.chunk(2, 1), self.beta_logits.expand_as(params[:, :self.M])
        return scales, means, self.gg_conditional.bound_beta(raw)

    def _hyperprior_forward(self, y: torch.Tensor, z_hat: torch.Tensor, steps: torch.Tensor | None = None):
        scales, means, betas = self._gg_params(z_hat)
        return stepped(lambda v, s, m: self.gg_conditional(v, s, betas, means=m), y, scales, means, steps)

    @property
    def latent_entropy_model(self) -> nn.Module:
        return self.gg_conditional

    def float_entropy_parameters(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scales, means, betas = self._gg_params(z_hat)
        return self.gg_conditional.build_indexes(scales, betas), means

    def _update_latent_tables(self, force: bool) -> bool:
        return self.gg_conditional.update(force=force)


@register_model("swin")
class SwinCodec(ROICodec):
    """The Swin-transformer ROI codec (Li, Liang, Fu, Han, ICASSP 2023).

    Analysis: a 5x5 stride-2 convolution and GDN, then four Swin stages (1/2, 1/4, 1/8 and
    the latent's 1/16, patch merging in between; ``window`` x ``window`` windows), each
    followed by an SFT block conditioned on the mask concatenated with the image,
    average-pooled to that scale. Synthesis mirrors it (patch splitting, inverse GDN, a 5x5
    stride-2 transposed convolution), every stage's SFT condition computed from the decoded
    hyper-latent, so no mask travels. The hyper-encoder is Swin too (``hyper_window``); the
    hyper-decoder stays convolutional because it selects the coding tables and must have an
    integer-exact twin (:mod:`pipeline.codec.integer`).

    ``dims``: the widths of the 1/2, 1/4 and 1/8 stages (default N each; the latent stage
    has M); ``depths``: Swin blocks per analysis stage, the synthesis takes them reversed.
    The defaults are the paper's size; :data:`SMALL` is a configuration for CPU runs.
    """

    SMALL: ClassVar[dict[str, Any]] = {"depths": [1, 1, 2, 1]}
    warm_startable: ClassVar[bool] = False

    def __init__(self, N: int = 128, M: int = 320, n_rates: int = 4, dims: list[int] | None = None,
                 depths: list[int] | tuple[int, ...] = (2, 2, 6, 2), window: int = 8,
                 hyper_depths: list[int] | tuple[int, ...] = (1, 1), hyper_window: int = 4,
                 cond_channels: int = 32, **entropy: Any) -> None:
        super().__init__(N, M, n_rates, **entropy)
        self.dims = list(dims) if dims is not None else [N, N, N]
        self.depths, self.hyper_depths = list(depths), list(hyper_depths)
        if len(self.dims) != 3 or len(self.depths) != 4 or len(self.hyper_depths) != 2:
            raise ValueError("swin takes 3 stage widths (dims), 4 stage depths and 2 hyper depths")
        if min(self.dims) < 1 or min(self.depths + self.hyper_depths) < 1 or min(window, hyper_window) < 1:
            raise ValueError("swin's widths, depths and windows must be positive")
        self.window, self.hyper_window, self.cond_channels = window, hyper_window, cond_channels
        widths, c = [*self.dims, M], cond_channels
        self.enc_embed = nn.Sequential(conv(3, widths[0], kernel_size=5), GDN(widths[0]))
        self.enc_stages = nn.ModuleList([SwinStage(w, d, window) for w, d in zip(widths, self.depths)])
        self.enc_merges = nn.ModuleList([Downsample(a, b) for a, b in zip(widths, widths[1:])])
        self.enc_conds = nn.ModuleList([MaskImageCondition(c, 2 ** k) for k in (1, 2, 3, 4)])
        self.enc_sfts = nn.ModuleList([SFT(w, c) for w in widths])
        self.h_a = SwinHyperAnalysis(M, N, self.hyper_depths, hyper_window)
        self.hyper_cond = hyper_condition(N, c)
        back = widths[::-1]
        self.dec_sfts = nn.ModuleList([SFT(w, c) for w in back])
        self.dec_stages = nn.ModuleList([SwinStage(w, d, window) for w, d in zip(back, self.depths[::-1])])
        self.dec_splits = nn.ModuleList([PatchSplit(a, b) for a, b in zip(back, back[1:])])
        self.dec_out = nn.Sequential(GDN(widths[0], inverse=True), deconv(widths[0], 3, kernel_size=5))

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "dims": self.dims, "depths": self.depths, "window": self.window,
                "hyper_depths": self.hyper_depths, "hyper_window": self.hyper_window,
                "cond_channels": self.cond_channels}

    def analysis(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.enc_embed(x)
        for i, (stage, cond, sft) in enumerate(zip(self.enc_stages, self.enc_conds, self.enc_sfts)):
            if i:
                h = self.enc_merges[i - 1](h)
            h = sft(stage(h), cond(x, mask))
        return h

    def synthesis(self, y_hat: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        cond = self.hyper_cond(z_hat)
        h = y_hat
        for i, (sft, stage) in enumerate(zip(self.dec_sfts, self.dec_stages)):
            h = stage(sft(h, cond))
            if i < len(self.dec_splits):
                h = self.dec_splits[i](h)
        return self.dec_out(h)
