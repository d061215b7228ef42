"""The ROI codec composed from parts, and its presets by name.

A codec is ``g_a -> latent_codec -> g_s`` with gain units for a continuous rate, as
CompressAI's ``SimpleVAECompressionModel``; each part is chosen by name:

- transforms (:mod:`pipeline.codec.transforms`): ``tlic``, ``sft``, ``tma``, ``swin``: the
  analysis ``g_a(x, m)`` conditioned on the effective mask, the synthesis ``g_s(y_hat, z_hat)``
  (never the mask) and, for ``swin``, its own hyper-analysis;
- entropy family (:mod:`pipeline.codec.entropy.families`): ``gaussian`` or
  ``generalized_gaussian`` (``beta_mode`` element or channel);
- latent structure (:mod:`pipeline.codec.latent`, the ``entropy`` option): ``hyperprior`` or
  ``context`` (channel groups x checkerboard);
- spatial quantisation steps (:mod:`pipeline.codec.steps`): the non-ROI value Q sets the
  background cells' step.

The variant names are presets: ``tlic``, ``sft``, ``tma`` and ``swin`` are those transforms with the
Gaussian; ``ggm`` is ``sft`` transforms with the generalized Gaussian. Any preset takes any family
and structure: ``build_model("tlic", family="generalized_gaussian", entropy="context")``.

Every codec takes ``(x, mask, roi_quality, rate)``: ``mask`` (B,1,H,W) in [0,1], 1 = ROI, None = all
ROI; ``roi_quality`` Q in [0,1], the value non-ROI pixels take before the mask conditions the
encoder (``m + (1 - m) Q``); ``rate`` in [0,1], the position on the gain units' rate scale. The
decoder never needs the mask: ``decompress(strings, shape, rate, roi_quality)`` rebuilds the image
from the bitstream and the header's knobs. Coding selects y's CDF tables with integer-exact networks
built by ``update()`` (:mod:`pipeline.codec.integer`), so files decode the same on every machine;
training (``forward``) uses the float networks they came from.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from compressai.models import CompressionModel

from pipeline.codec.entropy import FAMILIES, EntropyFamily, build_family
from pipeline.codec.latent import STRUCTURES, LatentStructure, build_latent
from pipeline.codec.layers import GainUnits, RateLike
from pipeline.codec.level_map import pack_levels, unpack_levels
from pipeline.codec.steps import CELL, STEP_ONE, QuantSteps, quantisation_steps, step_map, unpack_cells
from pipeline.codec.transforms import TRANSFORMS, Transforms, build_transforms
from pipeline.masks.ops import assign_nonroi_value

ENTROPY_MODELS = tuple(STRUCTURES)  # the latent structures, the ``entropy`` option
ENTROPY_FAMILIES = tuple(FAMILIES)


@dataclass(frozen=True)
class Preset:
    """A variant name: transforms and the entropy family they come with."""

    transforms: str
    family: str = "gaussian"

    @property
    def SMALL(self) -> dict[str, Any]:  # noqa: N802 - the transforms' constant
        """What the small configuration of CPU runs (tests, the demo, smoke runs) adds."""
        return TRANSFORMS[self.transforms].SMALL


MODELS: dict[str, Preset] = {"tlic": Preset("tlic"), "sft": Preset("sft"), "tma": Preset("tma"),
                             "ggm": Preset("sft", "generalized_gaussian"), "swin": Preset("swin")}


def pad_to_multiple(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom/right of a (B,C,H,W) tensor to a multiple of ``multiple``."""
    h, w = t.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(t, (0, pw, 0, ph), mode="replicate") if ph or pw else t


def rename_prefixes(name: str, renames: Mapping[str, str]) -> str:
    """``name`` with its first matching module prefix renamed (``{old: new}``; a prefix matches
    the whole name or a leading run of dotted parts)."""
    for old, new in renames.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return name


def _take(config: dict[str, Any], cls: type, skip: int) -> dict[str, Any]:
    """Pop the options ``cls``'s constructor takes (after its first ``skip`` arguments) from ``config``."""
    names = list(inspect.signature(cls.__init__).parameters)[1 + skip:]
    return {k: config.pop(k) for k in names if k in config}


class ROICodec(CompressionModel):
    """``g_a -> latent_codec -> g_s`` with gain units; build it with :func:`build_model`."""

    stride = 64  # 16 (g_a) x 4 (h_a)

    def __init__(self, variant: str, transforms: Transforms, latent_codec: LatentStructure, n_rates: int) -> None:
        super().__init__()
        self.variant, self.transforms = variant, transforms
        self.N, self.M, self.n_rates = latent_codec.N, latent_codec.M, n_rates
        self.g_a, self.g_s = transforms.g_a, transforms.g_s
        self.latent_codec = latent_codec
        self.gain = GainUnits(n_rates, self.M)

    # -- configuration ---------------------------------------------------------------
    @property
    def family(self) -> EntropyFamily:
        return self.latent_codec.family

    @property
    def entropy(self) -> str:
        """The latent structure's name (``hyperprior`` or ``context``)."""
        return self.latent_codec.name

    @property
    def config(self) -> dict[str, Any]:
        """What rebuilds the model with :func:`build_model` (the structure and the family only
        where they are not the preset's, so older checkpoints keep their fingerprint)."""
        config: dict[str, Any] = {"N": self.N, "M": self.M, "n_rates": self.n_rates}
        if self.entropy != "hyperprior":
            config.update(entropy=self.entropy, **self.latent_codec.config)
        if self.family.name != MODELS[self.variant].family:
            config["family"] = self.family.name
        return {**config, **self.family.config, **self.transforms.config}

    @property
    def warm_startable(self) -> bool:
        """Whether CompressAI's MeanScaleHyperprior weights fit the transforms."""
        return self.transforms.warm_startable

    def legacy_names(self) -> dict[str, str]:
        """Our modules' names in checkpoints written before the codec was composed from parts, ``{old: new}``."""
        family = self.family
        return {**self.transforms.legacy_names, **self.latent_codec.legacy_names,
                family.legacy_name: "latent_codec.family.conditional", "beta_logits": "latent_codec.family.beta_logits"}

    def upgrade_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """A state dict in today's names (one written before the parts has every module at the top)."""
        if "entropy_bottleneck.quantiles" not in state_dict:
            return dict(state_dict)
        renames = self.legacy_names()
        return {rename_prefixes(k, renames): v for k, v in state_dict.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True):  # noqa: ANN201
        """CompressAI's loading, of a state dict in today's names or the old ones."""
        return super().load_state_dict(self.upgrade_state_dict(state_dict), strict=strict)

    # -- warm start from CompressAI's MeanScaleHyperprior (pipeline.codec.warm_start) ----
    def warm_start_names(self) -> dict[str, str]:
        """Where this codec keeps MeanScaleHyperprior's modules: ``{its module: ours}``."""
        return {**self.transforms.warm_start_names, "h_a": "latent_codec.h_a", "h_s": "latent_codec.h_s",
                "entropy_bottleneck": "latent_codec.entropy_bottleneck"}

    def adapt_warm_start(self, name: str, value: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        """The pretrained ``value`` for our tensor ``name``, and why it was changed (None: as is)."""
        if name.startswith(f"latent_codec.h_s.{len(self.latent_codec.h_s) - 1}.") and value.shape[0] == 2 * self.M:
            return self.family.adapt_hyper_output(value, name.endswith("weight"))
        return self.transforms.adapt_warm_start(name, value)

    def finish_warm_start(self, adapted: dict[str, str]) -> None:
        """Set what the pretrained weights lack but must match them (recorded in ``adapted``)."""
        self.family.finish_warm_start(adapted, "latent_codec.family.")

    # -- coding state ----------------------------------------------------------------
    def update(self, scale_table: torch.Tensor | None = None, force: bool = False,
               update_quantiles: bool = False) -> bool:
        """Build the coding state: the CDF tables and the integer-exact path that selects y's tables.

        Floating-point work, done once when a checkpoint is written; it travels in the
        checkpoint's buffers and :func:`~pipeline.codec.checkpoint.load_checkpoint` never redoes it.
        ``scale_table`` is the family's own (it is accepted for CompressAI's signature).
        """
        return self.latent_codec.update(force=force, update_quantiles=update_quantiles)

    def coding_ready(self) -> bool:
        """Whether the tables and the integer networks are built (``update()`` has run)."""
        return self.latent_codec.coding_ready()

    # -- the codec -------------------------------------------------------------------
    @staticmethod
    def effective_mask(x: torch.Tensor, mask: torch.Tensor | None, roi_quality: RateLike) -> torch.Tensor:
        """The mask that conditions the encoder: non-ROI pixels take the value Q."""
        if mask is None:
            mask = torch.ones_like(x[:, :1])
        if mask.shape[-2:] != x.shape[-2:] or mask.shape[1] != 1:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match image {tuple(x.shape)}")
        return assign_nonroi_value(mask.clamp(0, 1), roi_quality)

    def encode_latent(self, x: torch.Tensor, mask: torch.Tensor | None, roi_quality: RateLike,
                      rate: RateLike) -> torch.Tensor:
        """y: the analysis of x under the effective mask, scaled by the rate's gains."""
        return self.gain(self.g_a(x, self.effective_mask(x, mask, roi_quality)), rate)

    def decode_latent(self, y_hat: torch.Tensor, z_hat: torch.Tensor, rate: RateLike) -> torch.Tensor:
        """x_hat: the synthesis of y_hat (gains undone) with the hyper-latent."""
        return self.g_s(self.gain.inverse(y_hat, rate), z_hat)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                roi_quality: RateLike = 1.0, rate: RateLike = 1.0, graded: bool = False) -> dict[str, Any]:
        """CompressAI-style forward: ``x_hat``, ``likelihoods`` and the latent ``y_hat`` as coded
        (gains applied; noise in train mode, rounding around the predicted means in eval mode).
        ``graded``: the steps follow the quality ``m + (1 - m) Q`` (:func:`~pipeline.codec.steps.graded_steps`)
        instead of the mask's ROI cells."""
        y = self.encode_latent(x, mask, roi_quality, rate).float()
        steps = quantisation_steps(mask, roi_quality, y.shape[-2:], graded)
        y_hat, likelihoods, z_hat = self.latent_codec(y, steps)
        return {"x_hat": self.decode_latent(y_hat, z_hat, rate), "likelihoods": likelihoods, "y_hat": y_hat}

    @torch.no_grad()
    def compress(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                 roi_quality: RateLike = 1.0, rate: RateLike = 1.0, graded: bool = False) -> dict[str, Any]:
        """Entropy-code x: ``{"strings": [y_strings, z_strings, level_strings], "shape": z_hw}``.

        x of any size is replicate-padded to the stride; crop the decoded image. The third
        group is each image's level map, its step per latent cell (:mod:`~pipeline.codec.level_map`),
        empty when every latent is quantised with step 1 (no mask, or Q = 1). ``graded``: steps
        from the quality ``m + (1 - m) Q`` rather than the binary ROI cells.
        """
        x = pad_to_multiple(x, self.stride)
        if mask is not None:
            mask = pad_to_multiple(mask, self.stride)
        y = self.encode_latent(x, mask, roi_quality, rate)
        steps = quantisation_steps(mask, roi_quality, y.shape[-2:], graded)
        out = self.latent_codec.compress(y, steps)
        level_strings = [b""] * len(x) if steps is None else [pack_levels(q) for q in steps.quarters]
        return {"strings": [out["y"], out["z"], level_strings], "shape": out["shape"]}

    def coded_steps(self, strings: list[list[bytes]], shape: tuple[int, int] | torch.Size,
                    roi_quality: RateLike = 1.0, cell_maps: bool = False) -> QuantSteps | None:
        """The quantisation steps the third string group codes on a hyper-latent grid of ``shape``:
        level maps, or with ``cell_maps`` version 3's ROI cell maps (their background's step from
        ``roi_quality``); None without a map (step 1 everywhere)."""
        maps = strings[2] if len(strings) > 2 else []
        if all(not s for s in maps):
            return None
        grid = (shape[0] * self.stride // CELL, shape[1] * self.stride // CELL)
        device = self.latent_codec.entropy_bottleneck.quantiles.device
        if cell_maps:
            cells = torch.cat([unpack_cells(s, grid) for s in maps])
            return step_map(cells.to(device), roi_quality)
        quarters = [unpack_levels(s, grid) for s in maps]
        ones = torch.full((1, 1, *grid), float(STEP_ONE))
        return QuantSteps(torch.cat([ones if q is None else q for q in quarters]).to(device))

    @torch.no_grad()
    def decode_state(self, strings: list[list[bytes]], shape: tuple[int, int] | torch.Size,
                     roi_quality: RateLike = 1.0, cell_maps: bool = False) -> dict[str, Any]:
        """What the entropy decoder rebuilds: ``z_hat``, ``y_hat`` and the coded ``indexes`` and ``symbols``."""
        steps = self.coded_steps(strings, shape, roi_quality, cell_maps)
        return self.latent_codec.decompress(strings[0], strings[1], shape, steps)

    @torch.no_grad()
    def decompress(self, strings: list[list[bytes]], shape: tuple[int, int] | torch.Size,
                   rate: RateLike = 1.0, roi_quality: RateLike = 1.0, cell_maps: bool = False
                   ) -> dict[str, torch.Tensor]:
        """Rebuild the (padded) image from the strings (two groups: step 1 everywhere); no mask
        needed. ``cell_maps``: the third group holds version 3's ROI cell maps, ``roi_quality``
        the file's Q (their background's step)."""
        state = self.decode_state(strings, shape, roi_quality, cell_maps)
        return {"x_hat": self.decode_latent(state["y_hat"], state["z_hat"], rate).clamp_(0, 1)}


def family_options(variant: str, family: str | None, beta_mode: str | None = None) -> dict[str, Any]:
    """The model options of a command line's ``--family`` / ``--beta-mode`` (empty: the preset's family)."""
    options: dict[str, Any] = {}
    if family is not None and family != MODELS[variant].family:
        options["family"] = family
    if beta_mode is not None:
        options["beta_mode"] = beta_mode
    return options


def build_model(variant: str, **config: Any) -> ROICodec:
    """Build a preset with any parts and options, e.g. ``build_model("tlic", N=64, M=96)``,
    ``build_model("sft", family="generalized_gaussian", beta_mode="channel", entropy="context")``.

    Options: ``N``, ``M``, ``n_rates``; ``entropy`` (the latent structure) and its ``groups``,
    ``context_hidden``; ``family`` and its ``beta_mode``; the rest go to the transforms.
    """
    if variant not in MODELS:
        raise ValueError(f"unknown codec variant {variant!r}; choose from {sorted(MODELS)}")
    preset, config = MODELS[variant], dict(config)
    kind = TRANSFORMS[preset.transforms]
    N, M = config.pop("N", kind.DEFAULTS["N"]), config.pop("M", kind.DEFAULTS["M"])
    n_rates = config.pop("n_rates", 4)
    structure, family_name = config.pop("entropy", "hyperprior"), config.pop("family", preset.family)
    if structure not in STRUCTURES:
        raise ValueError(f"unknown entropy model {structure!r}; choose from {list(STRUCTURES)}")
    if family_name not in FAMILIES:
        raise ValueError(f"unknown entropy family {family_name!r}; choose from {list(FAMILIES)}")
    family_options = _take(config, FAMILIES[family_name], skip=1)
    structure_options = _take(config, STRUCTURES[structure], skip=3)
    transforms_options = _take(config, kind, skip=2)
    if config:
        raise ValueError(f"{variant} ({kind.name} transforms, {family_name}, {structure}) takes no option(s) "
                         f"{', '.join(sorted(config))}")
    # the order a seed initialised the codec in before it was composed from parts
    latent = build_latent(structure, N, M, build_family(family_name, M, **family_options), **structure_options)
    transforms = build_transforms(kind.name, N, M, **transforms_options)
    if transforms.h_a is not None:
        latent.h_a = transforms.h_a
    return ROICodec(variant, transforms, latent, n_rates)
