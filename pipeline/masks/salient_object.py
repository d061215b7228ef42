"""A learned salient-object detector: U²-Net (Qin et al., Pattern Recognition 2020), from a weights file.

U²-Net is a two-level nested U-Net: six encoder / decoder stages, each a *residual U-block*
(RSU-L: a small U-Net of height L inside a residual connection; the deepest stages use the
dilated RSU-4F instead of pooling), a side output per decoder stage and a 1x1 fusion of the
six. ``u2net`` is the full model (44.0M parameters, the authors' ``u2net.pth``, 176 MB) and
``u2netp`` the small one (1.1M, ``u2netp.pth``, 4.7 MB), both trained on DUTS-TR. The
module and parameter names follow the authors' release, so their files load as they are.

Inference as in the authors' test script: the image resized to 320x320, divided by its
maximum, normalised with ImageNet's mean and std; the fused map resized back to the
image and min-max normalised. Weights are read from a file only (never downloaded);
``random`` builds a randomly initialised model, to run the path without weights.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.masks.ops import MaskError
from pipeline.weights import read_state_dict

RANDOM = "random"
INPUT_SIZE = 320
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)

# stage: (height L, in, mid, out, dilated); the sides read the decoder stages and stage6
_FULL = {"stage1": (7, 3, 32, 64, False), "stage2": (6, 64, 32, 128, False), "stage3": (5, 128, 64, 256, False),
         "stage4": (4, 256, 128, 512, False), "stage5": (4, 512, 256, 512, True), "stage6": (4, 512, 256, 512, True),
         "stage5d": (4, 1024, 256, 512, True), "stage4d": (4, 1024, 128, 256, False),
         "stage3d": (5, 512, 64, 128, False), "stage2d": (6, 256, 32, 64, False), "stage1d": (7, 128, 16, 64, False)}
_SMALL = {"stage1": (7, 3, 16, 64, False), "stage2": (6, 64, 16, 64, False), "stage3": (5, 64, 16, 64, False),
          "stage4": (4, 64, 16, 64, False), "stage5": (4, 64, 16, 64, True), "stage6": (4, 64, 16, 64, True),
          "stage5d": (4, 128, 16, 64, True), "stage4d": (4, 128, 16, 64, False), "stage3d": (5, 128, 16, 64, False),
          "stage2d": (6, 128, 16, 64, False), "stage1d": (7, 128, 16, 64, False)}
ARCHS = {"u2net": _FULL, "u2netp": _SMALL}
WEIGHT_FILES = {"u2net": "u2net.pth (176 MB)", "u2netp": "u2netp.pth (4.7 MB)"}


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Module):
    """3x3 convolution (dilated by ``dilation``), batch norm, ReLU (the paper's REBNCONV)."""

    def __init__(self, cin: int, cout: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_s1(self.conv_s1(x)))


class ResidualUBlock(nn.Module):
    """RSU-L: a U-Net of height ``height`` plus its input; ``dilated`` = RSU-4F (dilations, no pooling)."""

    def __init__(self, height: int, cin: int, mid: int, cout: int, dilated: bool = False) -> None:
        super().__init__()
        self.height, self.dilated = height, dilated
        self.rebnconvin = ConvBNReLU(cin, cout)
        for i in range(1, height + 1):
            dilation = 2 ** (i - 1) if dilated else (2 if i == height else 1)
            setattr(self, f"rebnconv{i}", ConvBNReLU(cout if i == 1 else mid, mid, dilation))
        for i in range(1, height):
            dilation = 2 ** (i - 1) if dilated else 1
            setattr(self, f"rebnconv{i}d", ConvBNReLU(2 * mid, cout if i == 1 else mid, dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.rebnconvin(x)
        skips, h = [], x_in
        for i in range(1, self.height):
            if i > 1 and not self.dilated:
                h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
            h = getattr(self, f"rebnconv{i}")(h)
            skips.append(h)
        d = getattr(self, f"rebnconv{self.height}")(h)
        for i in range(self.height - 1, 0, -1):
            skip = skips[i - 1]
            d = getattr(self, f"rebnconv{i}d")(torch.cat([d if self.dilated else _up(d, skip), skip], 1))
        return d + x_in


class U2Net(nn.Module):
    """U²-Net of a configuration of :data:`ARCHS`; ``forward`` gives the fused saliency probability map."""

    def __init__(self, config: dict[str, tuple[int, int, int, int, bool]]) -> None:
        super().__init__()
        for name, (height, cin, mid, cout, dilated) in config.items():
            setattr(self, name, ResidualUBlock(height, cin, mid, cout, dilated))
        sides = {1: "stage1d", 2: "stage2d", 3: "stage3d", 4: "stage4d", 5: "stage5d", 6: "stage6"}
        for k, stage in sides.items():
            setattr(self, f"side{k}", nn.Conv2d(config[stage][3], 1, 3, padding=1))
        self.outconv = nn.Conv2d(6, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded, h = [], x
        for k in range(1, 7):
            if k > 1:
                h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
            h = getattr(self, f"stage{k}")(h)
            encoded.append(h)
        decoded = {6: h}
        for k in range(5, 0, -1):
            skip = encoded[k - 1]
            decoded[k] = getattr(self, f"stage{k}d")(torch.cat([_up(decoded[k + 1], skip), skip], 1))
        sides = [getattr(self, "side1")(decoded[1])]
        sides += [_up(getattr(self, f"side{k}")(decoded[k]), sides[0]) for k in range(2, 7)]
        return torch.sigmoid(self.outconv(torch.cat(sides, 1)))


class SalientObjectModel:
    """A :class:`~pipeline.masks.saliency.SaliencyModel` running U²-Net (``arch``) from ``weights``."""

    def __init__(self, arch: str, weights: str, device: str = "auto", input_size: int = INPUT_SIZE) -> None:
        if arch not in ARCHS:
            raise MaskError(f"unknown salient-object model {arch!r} (known: {', '.join(ARCHS)})")
        self.arch, self.input_size = arch, input_size
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        net = U2Net(ARCHS[arch])
        if weights != RANDOM:
            path = Path(weights)
            if not path.is_file():
                raise MaskError(f"saliency weights not found: {path} (--saliency-weights; {arch} uses the U-2-Net "
                                f"authors' {WEIGHT_FILES[arch]})")
            try:
                net.load_state_dict(read_state_dict(path, MaskError, "saliency weights"))
            except RuntimeError as exc:
                raise MaskError(f"saliency weights {path} do not fit {arch}: {str(exc).splitlines()[0]}") from None
        self.net = net.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise MaskError(f"saliency expects a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        small = np.asarray(Image.fromarray(image).resize((self.input_size,) * 2, Image.BILINEAR), np.float32)
        small = small / max(float(small.max()), 1e-6)
        x = (small - np.array(_MEAN, np.float32)) / np.array(_STD, np.float32)
        out = self.net(torch.from_numpy(x).permute(2, 0, 1)[None].to(self.device))[0, 0].float().cpu().numpy()
        full = np.asarray(Image.fromarray(out).resize((w, h), Image.BILINEAR), np.float32)
        lo, hi = float(full.min()), float(full.max())  # min-max at the image's size, like every saliency model
        return (full - lo) / (hi - lo) if hi > lo else np.zeros_like(full)


@lru_cache(maxsize=4)
def _cached(arch: str, weights: str, mtime_ns: int) -> SalientObjectModel:
    return SalientObjectModel(arch, weights)


def load_salient_object_model(arch: str, weights: str) -> SalientObjectModel:
    """A model per (arch, weights file) and process, loaded once (reloaded when the file changes)."""
    if weights == RANDOM:
        return _cached(arch, RANDOM, 0)
    path = Path(weights)
    mtime = path.stat().st_mtime_ns if path.is_file() else 0
    return _cached(arch, str(path.resolve()) if path.is_file() else weights, mtime)
