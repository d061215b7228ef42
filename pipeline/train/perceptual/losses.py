"""The perceptual second stage's loss (TLIC, arXiv 2401.08154):

``L = l_r R + l_mse (delta . D_mse) + l_L1_roi (delta . D_L1) + l_L1_nonroi ((1 - delta) . D_L1)
+ l_lpips D_lpips + l_sty D_sty + l_lap D_lap + l_adv D_adv``

with ``delta`` the ROI mask. LPIPS and the style loss share one frozen VGG-16 trunk; its weights
are never downloaded: they come from a file (``--vgg-weights``), torchvision's cache, or (tests
only) random initialisation. LPIPS's linear calibration ships with the ``lpips`` package.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import lpips
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.train.perceptual.discriminator import UNetDiscriminator, generator_adv_loss
from pipeline.weights import read_state_dict

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 weights
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: LPIPS's layers
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # = LPIPS's scaling layer
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


class PerceptualWeightsError(ValueError):
    """The VGG-16 weights are missing or unreadable (one line, naming the options)."""


# -- pixel and pyramid distances ----------------------------------------------------------
def masked_mean(err: Tensor, weight: Tensor) -> Tensor:
    """Per-image mean of ``err`` (B,C,H,W) under ``weight`` (B,1,H,W), normalised by the weight's
    area (at least one pixel, so an empty region gives 0), shape (B,)."""
    area = weight.sum(dim=(1, 2, 3)).clamp_min(1.0) * err.shape[1]
    return (err * weight).sum(dim=(1, 2, 3)) / area


def roi_l1(x_hat: Tensor, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean absolute error inside the ROI and outside it, each normalised by its own area."""
    err = (x_hat - x).abs()
    return masked_mean(err, mask).mean(), masked_mean(err, 1.0 - mask).mean()


def _blur(x: Tensor) -> Tensor:
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :] / k.sum() ** 2).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k, groups=x.shape[1])


def laplacian_pyramid(x: Tensor, levels: int = 5) -> list[Tensor]:
    """``levels`` band-pass images (finest first, 5x5 binomial blur, replicate borders) and the low-pass residual."""
    bands = []
    for _ in range(levels):
        low = _blur(x)
        bands.append(x - low)
        x = low[..., ::2, ::2]
    return bands + [x]


def laplacian_pyramid_loss(x_hat: Tensor, x: Tensor, levels: int = 5) -> Tensor:
    """``sum_j 2^-j mean|L_j(x_hat) - L_j(x)|`` over the bands and the residual (j = 0 finest).

    Finer bands count more: with weights growing as 2^j the residual would dominate and a
    uniform brightness shift would cost more than noise of the same MSE.
    """
    pairs = zip(laplacian_pyramid(x_hat, levels), laplacian_pyramid(x, levels))
    return sum(2.0 ** -j * (a - b).abs().mean() for j, (a, b) in enumerate(pairs))


def gram(f: Tensor) -> Tensor:
    """Normalised Gram matrices (B,C,C) of features (B,C,H,W): ``F F^T / (C H W)``."""
    b, c, h, w = f.shape
    f = f.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def gram_style_loss(feats_a: list[Tensor], feats_b: list[Tensor]) -> Tensor:
    """Mean over layers of the MSE between normalised Gram matrices."""
    return sum(F.mse_loss(gram(a), gram(b)) for a, b in zip(feats_a, feats_b)) / len(feats_a)


# -- VGG-16 and LPIPS ---------------------------------------------------------------------
def vgg16_cache_path() -> Path:
    """Where torchvision keeps its VGG-16 weights (``torch.hub.get_dir()/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def _vgg16_state(weights: str | Path | None, allow_random: bool) -> dict[str, Tensor] | None:
    """The features' tensors (keys ``N.weight``) from ``weights``, the cache, or None (random)."""
    hint = f"pass --vgg-weights FILE (torchvision's {VGG16_FILE}) or train with --no-vgg-losses"
    if weights is None:
        cached = vgg16_cache_path()
        if not cached.is_file():
            if allow_random:
                return None
            raise PerceptualWeightsError(f"no VGG-16 weights (none at {cached}): {hint}")
        weights = cached
    path = Path(weights)
    if not path.is_file():
        raise PerceptualWeightsError(f"VGG-16 weights {path} not found: {hint}")
    state = read_state_dict(path, PerceptualWeightsError, "VGG-16 weights")
    return {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}


class VGGFeatures(nn.Module):
    """Frozen VGG-16 features at LPIPS's layers (relu1_2 ... relu5_3) of images in [0,1].

    ``weights``: a file (torchvision's state dict, or its ``features`` part), else torchvision's
    cache; random initialisation only with ``allow_random`` (tests). Missing weights raise
    :class:`PerceptualWeightsError`; nothing is downloaded.
    """

    def __init__(self, weights: str | Path | None = None, allow_random: bool = False) -> None:
        super().__init__()
        state = _vgg16_state(weights, allow_random)
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                conv = nn.Conv2d(c, int(v), 3, padding=1)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU(inplace=True)]
                c = int(v)
        self.layers = nn.Sequential(*layers)
        if state is not None:
            wanted = {k: v.shape for k, v in self.layers.state_dict().items()}
            wrong = sorted(k for k in wanted.keys() | state.keys() if k not in state or state[k].shape != wanted.get(k))
            if wrong:
                raise PerceptualWeightsError(f"VGG-16 weights {weights or vgg16_cache_path()} do not fit "
                                             f"torchvision's vgg16 (features.{wrong[0]} and {len(wrong) - 1} more)")
            self.layers.load_state_dict(state)
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        h, feats = (x - self.mean) / self.std, []
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i in _TAPS:
                feats.append(h)
        return feats


class LPIPSDistance(nn.Module):
    """LPIPS (VGG-16, v0.1) of images in [0,1] on a :class:`VGGFeatures` trunk, per image (B,).

    The linear layers and their calibration are the ``lpips`` package's (``weights/v0.1/vgg.pth``,
    shipped with it); the sum matches ``lpips.LPIPS(net="vgg", pnet_rand=True)`` given the same
    trunk, without building torchvision's whole VGG-16 (classifier included) to drop it.
    """

    def __init__(self, features: VGGFeatures) -> None:
        super().__init__()
        self.features = features
        self.lins = nn.ModuleList(lpips.NetLinLayer(c, use_dropout=False) for c in (64, 128, 256, 512, 512))
        shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth",
                             map_location="cpu", weights_only=True)
        self.lins.load_state_dict({f"{k[3]}.model.0.weight": v for k, v in shipped.items()})
        self.lins.requires_grad_(False)

    def from_features(self, feats_a: list[Tensor], feats_b: list[Tensor]) -> Tensor:
        """LPIPS (B,) of two images' trunk features."""
        return sum(lin((F.normalize(a, dim=1, eps=1e-10) - F.normalize(b, dim=1, eps=1e-10)) ** 2).mean(dim=(1, 2, 3))
                   for lin, a, b in zip(self.lins, feats_a, feats_b))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.from_features(self.features(a), self.features(b))


# -- the loss -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PerceptualWeights:
    """The loss's weights (x in [0,1], R in bits per pixel). Not TLIC's published values (not
    reachable here): rate, MSE, LPIPS and adversarial weights scaled from HiFiC (MSE
    ``0.075 * 2^-5`` on 0..255 images = 146 on 0..1, LPIPS 1, adversarial 0.15); L1, Laplacian
    and style weights chosen so those terms are of the same order; tune with real VGG weights."""

    rate: float = 1.0
    mse: float = 150.0
    l1_roi: float = 1.0
    l1_nonroi: float = 0.5
    lpips: float = 1.0
    style: float = 1000.0
    lap: float = 1.0
    adv: float = 0.15


def bits_per_pixel_each(likelihoods: Mapping[str, Tensor], num_pixels: int) -> Tensor:
    """Estimated bpp of each image (B,) from the codec's likelihoods."""
    return sum(lk.log().flatten(1).sum(1) for lk in likelihoods.values()) / (-math.log(2) * num_pixels)


class PerceptualLoss(nn.Module):
    """The second stage's loss of a codec ``output`` (``x_hat``, ``likelihoods``, ``y_hat``).

    ``vgg=False`` leaves out LPIPS and the style loss (no VGG weights needed). ``forward`` returns
    every (unweighted) term, ``bpp``, and the weighted total ``loss``; ``adv`` is 0 without a
    discriminator. ``mask`` is the ROI (the L1 terms' split); ``delta`` weighs the MSE term (default
    ``mask``; the training stage passes the effective mask, the background at its Q).
    ``rate_scale`` (float or (B,)) multiplies the rate weight per image (rate points).
    """

    def __init__(self, weights: PerceptualWeights = PerceptualWeights(), vgg: bool = True,
                 vgg_weights: str | Path | None = None, allow_random: bool = False) -> None:
        super().__init__()
        self.weights = weights
        self.lpips = LPIPSDistance(VGGFeatures(vgg_weights, allow_random)) if vgg else None

    def forward(self, output: Mapping[str, Any], x: Tensor, mask: Tensor | None = None,
                disc: UNetDiscriminator | None = None, rate_scale: float | Tensor = 1.0,
                delta: Tensor | None = None) -> dict[str, Tensor]:
        x_hat = output["x_hat"]
        mask = torch.ones_like(x[:, :1]) if mask is None else mask
        bpp = bits_per_pixel_each(output["likelihoods"], x.shape[-2] * x.shape[-1])
        terms = {"mse": masked_mean((x_hat - x) ** 2, mask if delta is None else delta).mean()}
        terms["l1_roi"], terms["l1_nonroi"] = roi_l1(x_hat, x, mask)
        terms["lap"] = laplacian_pyramid_loss(x_hat, x)
        if self.lpips is not None:
            feats_hat = self.lpips.features(x_hat)
            with torch.no_grad():
                feats = self.lpips.features(x)
            terms["lpips"] = self.lpips.from_features(feats_hat, feats).mean()
            terms["style"] = gram_style_loss(feats_hat, feats)
        terms["adv"] = generator_adv_loss(disc, output["y_hat"], x_hat) if disc is not None else x_hat.new_zeros(())
        weights = asdict(self.weights)
        loss = weights["rate"] * (rate_scale * bpp).mean() + sum(weights[k] * v for k, v in terms.items())
        return {**terms, "bpp": bpp.mean(), "loss": loss}
