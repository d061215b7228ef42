"""Saliency maps that need no weights, behind a small interface learned models can plug into.

Neither scikit-image nor OpenCV is a dependency, so the two classic algorithms are
written here with numpy/scipy:

- ``spectral_residual`` (default): Hou & Zhang, "Saliency Detection: A Spectral Residual
  Approach", CVPR 2007. Gray image at 64 px on its longer side, log-amplitude spectrum
  minus its 3x3 local mean, back with the original phase, squared, Gaussian blur
  (sigma 2.5 px at that scale, as in the authors' code).
- ``frequency_tuned``: Achanta et al., "Frequency-tuned Salient Region Detection",
  CVPR 2009. Distance in CIE Lab between each slightly blurred pixel and the image mean.

Every model maps a uint8 HxWx3 RGB array to a float32 HxW map in [0, 1] (min-max
normalised per image; a flat image gives all zeros). Add another model with
``@register_saliency_model("name")`` on a class or factory taking no arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.masks.ops import MaskError, resize

DEFAULT_SALIENCY_MODEL = "spectral_residual"


@runtime_checkable
class SaliencyModel(Protocol):
    """A saliency model: uint8 HxWx3 RGB in, float32 HxW in [0, 1] out (same size)."""

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


_REGISTRY: dict[str, Callable[[], SaliencyModel]] = {}


def register_saliency_model(name: str) -> Callable[[Callable[[], SaliencyModel]], Callable[[], SaliencyModel]]:
    """Class/factory decorator: make a saliency model available under ``name``."""
    def decorate(factory: Callable[[], SaliencyModel]) -> Callable[[], SaliencyModel]:
        _REGISTRY[name] = factory
        return factory
    return decorate


def saliency_models() -> list[str]:
    """Names of the registered saliency models."""
    return sorted(_REGISTRY)


def get_saliency_model(name: str = DEFAULT_SALIENCY_MODEL) -> SaliencyModel:
    """Build the saliency model registered under ``name`` (MaskError if unknown)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise MaskError(f"unknown saliency model {name!r} (known: {', '.join(saliency_models())})") from None
    return factory()


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise MaskError(f"saliency needs a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")
    return image


def _normalise(saliency: np.ndarray) -> np.ndarray:
    lo, hi = float(saliency.min()), float(saliency.max())
    if not np.isfinite(hi - lo) or hi - lo < 1e-12:
        return np.zeros(saliency.shape, np.float32)
    return ((saliency - lo) / (hi - lo)).astype(np.float32)


@register_saliency_model("spectral_residual")
class SpectralResidual:
    """Spectral residual saliency (Hou & Zhang 2007), computed at ``scale`` px on the longer side."""

    def __init__(self, scale: int = 64, sigma: float = 2.5) -> None:
        self.scale = scale
        self.sigma = sigma

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        h, w = image.shape[:2]
        gray = image.astype(np.float32).mean(axis=2)
        factor = min(1.0, self.scale / max(h, w))
        small_size = (max(1, round(w * factor)), max(1, round(h * factor)))
        small = np.asarray(Image.fromarray(gray).resize(small_size, Image.BILINEAR),
                           dtype=np.float64) if factor < 1.0 else gray.astype(np.float64)
        if np.ptp(small) < 1e-6:  # flat: nothing stands out (the spectrum would be all DC)
            return np.zeros((h, w), np.float32)
        spectrum = np.fft.fft2(small)
        log_amplitude = np.log(np.abs(spectrum) + 1e-8)
        residual = log_amplitude - ndimage.uniform_filter(log_amplitude, size=3, mode="nearest")
        saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
        saliency = ndimage.gaussian_filter(saliency, sigma=self.sigma * max(small.shape) / self.scale)
        return resize(_normalise(saliency), (h, w))


def _srgb_to_lab(image: np.ndarray) -> np.ndarray:
    """uint8 sRGB (D65) to CIE Lab, float64 HxWx3."""
    rgb = image.astype(np.float64) / 255.0
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124564, 0.2126729, 0.0193339],
                             [0.3575761, 0.7151522, 0.1191920],
                             [0.1804375, 0.0721750, 0.9503041]])
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


@register_saliency_model("frequency_tuned")
class FrequencyTuned:
    """Frequency-tuned saliency (Achanta et al. 2009): Lab distance of blurred pixels to the mean."""

    def __init__(self, sigma: float = 1.0) -> None:
        self.sigma = sigma

    def __call__(self, image: np.ndarray) -> np.ndarray:
        lab = _srgb_to_lab(_check_image(image))
        blurred = ndimage.gaussian_filter(lab, sigma=(self.sigma, self.sigma, 0), mode="nearest")
        saliency = ((blurred - lab.reshape(-1, 3).mean(axis=0)) ** 2).sum(axis=-1)
        return _normalise(saliency)
