"""Saliency maps that need no weights, behind a small interface learned models can plug into.

The classic algorithms are written here with numpy/scipy (OpenCV is not a dependency;
scikit-image's grayscale reconstruction is borrowed for MB+'s smoothing):

- ``spectral_residual``: Hou & Zhang, "Saliency Detection: A Spectral Residual
  Approach", CVPR 2007. Gray image at 64 px on its longer side, log-amplitude spectrum
  minus its 3x3 local mean, back with the original phase, squared, Gaussian blur
  (sigma 2.5 px at that scale, as in the authors' code).
- ``frequency_tuned``: Achanta et al., "Frequency-tuned Salient Region Detection",
  CVPR 2009. Distance in CIE Lab between each slightly blurred pixel and the image mean.
- ``mbd`` (default): MB+ of Zhang et al., "Minimum Barrier Salient Object Detection at 80 FPS",
  ICCV 2015: whole objects, not high-frequency spots. The image is shrunk to at most 300 px
  on its longer side (smaller images are not enlarged; the smoothing width scales with
  it), converted to Lab (8-bit scaling, L x 2.55) and median-filtered (5x5);
  per channel, the minimum barrier distance of each pixel to the image border (a path's
  barrier = its highest minus its lowest value) is approximated by FastMBD: three raster
  scans (forward, backward, forward), each pixel keeping the bounds of its best path.
  Here a scan updates one anti-diagonal at a time (a pixel's upper and left neighbours
  lie on the previous one), which gives exactly the paper's pixel-by-pixel result with
  numpy-vectorised steps. The channels' distances are summed and normalised; MB+ adds
  the backgroundness map (whitened colour distance, L1, to each of the four 10 % border
  strips, covariance + 50 I; the four maps summed minus the largest), multiplies by a
  centre bias (1 at the centre, 0 at the corners), smooths by opening then closing by
  reconstruction with a square of width max(3, 50 sqrt(mean saliency)) at 300 px, and sharpens with
  a sigmoid (b = 10) centred halfway between the means above and below half the maximum.
  The authors' artificial-frame removal is left out.
- ``centre_prior``: no image content at all, a Gaussian centred on the image with sigma a
  third of each side: the baseline a content-based model has to beat.

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

DEFAULT_SALIENCY_MODEL = "mbd"  # benchmarks/saliency_quality.py: it finds whole objects


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


LEARNED_SALIENCY_MODELS = ("u2net", "u2netp")  # pipeline.masks.salient_object: they need weights


def saliency_models() -> list[str]:
    """Names of the saliency models: the registered weight-free ones and the learned ones."""
    return sorted([*_REGISTRY, *LEARNED_SALIENCY_MODELS])


def get_saliency_model(name: str = DEFAULT_SALIENCY_MODEL, weights: str | None = None) -> SaliencyModel:
    """The saliency model ``name``; a learned one (:data:`LEARNED_SALIENCY_MODELS`) from ``weights``.

    A learned model is loaded once per process and weights file (``random``: random
    initialisation, to run the path). MaskError (one line) for an unknown name, a learned
    model without weights or with weights that are missing or do not fit, or weights
    given to a model that takes none.
    """
    if name in LEARNED_SALIENCY_MODELS:
        from pipeline.masks.salient_object import WEIGHT_FILES, load_salient_object_model

        if weights is None:
            raise MaskError(f"saliency model {name!r} needs its weights: --saliency-weights FILE (the U-2-Net "
                            f"authors' {WEIGHT_FILES[name]}); the weight-free default is {DEFAULT_SALIENCY_MODEL!r}")
        return load_salient_object_model(name, weights)
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise MaskError(f"unknown saliency model {name!r} (known: {', '.join(saliency_models())})") from None
    if weights is not None:
        raise MaskError(f"saliency model {name!r} takes no weights (--saliency-weights is for "
                        f"{', '.join(LEARNED_SALIENCY_MODELS)})")
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


# -- minimum barrier distance (MB+) ------------------------------------------------------------


def _skew(planes: np.ndarray) -> np.ndarray:
    """CxHxW -> (H+W-1)xCxH: row ``d`` holds the anti-diagonal r + c = d (position r; unused slots 0)."""
    c, h, w = planes.shape
    d, r = np.meshgrid(np.arange(h + w - 1), np.arange(h), indexing="ij")
    col = d - r
    skewed = planes[:, r, np.clip(col, 0, w - 1)] * ((col >= 0) & (col < w))
    return np.ascontiguousarray(skewed.transpose(1, 0, 2))


def _unskew(skewed: np.ndarray, w: int) -> np.ndarray:
    """Inverse of :func:`_skew`: (H+W-1)xCxH -> CxHxW."""
    h = skewed.shape[2]
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return skewed[r + c, :, r].transpose(2, 0, 1)


def _raster_scan(feat: np.ndarray, dist: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> None:
    """One raster scan of the fast MBD transform (top-left to bottom-right), in place.

    The arrays are skewed ((H+W-1)xCxH, see :func:`_skew`): a pixel's upper and left
    neighbours both lie on the previous anti-diagonal, so each anti-diagonal is updated at
    once and the result equals the paper's pixel-by-pixel scan. Only interior pixels are
    updated; the image border is the seed set (distance 0).
    """
    n_diag, _, h = feat.shape
    w = n_diag - h + 1
    for d in range(2, n_diag - 2):
        lo, hi = max(1, d - w + 2), min(h - 2, d - 1) + 1  # interior: 1 <= r <= h-2, 1 <= d-r <= w-2
        if lo >= hi:
            continue
        x = feat[d, :, lo:hi]
        up_hi, up_lo = upper[d - 1, :, lo - 1:hi - 1], lower[d - 1, :, lo - 1:hi - 1]
        lf_hi, lf_lo = upper[d - 1, :, lo:hi], lower[d - 1, :, lo:hi]
        via_left_hi, via_left_lo = np.maximum(lf_hi, x), np.minimum(lf_lo, x)
        via_up_hi, via_up_lo = np.maximum(up_hi, x), np.minimum(up_lo, x)
        via_left, via_up = via_left_hi - via_left_lo, via_up_hi - via_up_lo
        current = dist[d, :, lo:hi]
        take_left = via_left < current
        best = np.where(take_left, via_left, current)
        take_up = via_up < best  # as in the paper's code: the upper neighbour wins only when strictly better
        dist[d, :, lo:hi] = np.where(take_up, via_up, best)
        upper[d, :, lo:hi] = np.where(take_up, via_up_hi, np.where(take_left, via_left_hi, upper[d, :, lo:hi]))
        lower[d, :, lo:hi] = np.where(take_up, via_up_lo, np.where(take_left, via_left_lo, lower[d, :, lo:hi]))


def mbd_transform(planes: np.ndarray, passes: int = 3) -> np.ndarray:
    """Fast minimum barrier distance of every pixel to the image border, per channel (CxHxW in, out).

    Zhang et al.'s FastMBD: ``passes`` alternating raster / inverse raster scans, each
    pixel keeping the highest and lowest value on its current best path. Images narrower
    than 3 pixels are all border: zeros.
    """
    planes = np.asarray(planes, dtype=np.float64)
    _, h, w = planes.shape
    if h < 3 or w < 3:
        return np.zeros(planes.shape, np.float64)
    feat = _skew(planes)
    lower, upper = feat.copy(), feat.copy()
    interior = np.zeros((1, h, w), bool)
    interior[:, 1:-1, 1:-1] = True
    dist = np.where(_skew(interior.astype(np.float64)) > 0, np.inf, 0.0)
    dist = np.broadcast_to(dist, feat.shape).copy()
    for k in range(passes):
        if k % 2 == 0:
            _raster_scan(feat, dist, lower, upper)
        else:  # the inverse scan is the forward scan of the image turned by 180 degrees
            _raster_scan(feat[::-1, :, ::-1], dist[::-1, :, ::-1], lower[::-1, :, ::-1], upper[::-1, :, ::-1])
    return _unskew(dist, w)


def _backgroundness(rgb: np.ndarray, margin: float, reg: float) -> np.ndarray:
    """The MB+ boundary contrast map: whitened (Mahalanobis, L1) colour distance to each of the four
    border strips, each normalised to [0, 1], summed minus the largest (one strip may touch the object)."""
    h, w, _ = rgb.shape
    rows, cols = max(1, round(margin * h)), max(1, round(margin * w))
    pixels = rgb.reshape(-1, 3)
    maps = []
    for strip in (rgb[:rows], rgb[-rows:], rgb[:, :cols], rgb[:, -cols:]):
        region = strip.reshape(-1, 3)
        cov = (np.cov(region, rowvar=False) if len(region) > 1 else np.zeros((3, 3))) + reg * np.eye(3)
        u, s, _ = np.linalg.svd(cov)
        whiten = u / np.sqrt(s)
        maps.append(_normalise(np.abs((pixels - region.mean(axis=0)) @ whiten).sum(axis=1)))
    stacked = np.stack(maps, axis=1)
    return _normalise((stacked.sum(axis=1) - stacked.max(axis=1)).reshape(h, w))


def _centre_bias(h: int, w: int) -> np.ndarray:
    """1 at the centre falling linearly to 0 at the corners (distance scaled by the half-sides)."""
    y = (np.arange(h) - (h - 1) / 2) / max(h / 2, 1e-9)
    x = (np.arange(w) - (w - 1) / 2) / max(w / 2, 1e-9)
    dist = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
    return 1.0 - dist / max(float(dist.max()), 1e-12)


def _morph_smooth(saliency: np.ndarray, width: int) -> np.ndarray:
    """Opening by reconstruction, then closing by reconstruction, with a ``width`` x ``width`` square."""
    from skimage.morphology import reconstruction

    opened = reconstruction(ndimage.grey_erosion(saliency, size=(width, width)), saliency, method="dilation")
    return reconstruction(ndimage.grey_dilation(opened, size=(width, width)), opened, method="erosion")


def _enhance_contrast(saliency: np.ndarray, b: float) -> np.ndarray:
    """Sigmoid ``1 / (1 + exp(-b (s - t)))``, ``t`` halfway between the means above and below half the max."""
    half = 0.5 * float(saliency.max())
    high, low = saliency[saliency >= half], saliency[saliency < half]
    t = 0.5 * (float(high.mean()) + (float(low.mean()) if low.size else half))
    return 1.0 / (1.0 + np.exp(-b * (saliency - t)))


def _resize_rgb(image: np.ndarray, h: int, w: int) -> np.ndarray:
    if image.shape[:2] == (h, w):
        return image
    shrinking = h < image.shape[0] or w < image.shape[1]
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BOX if shrinking else Image.BILINEAR))


@register_saliency_model("mbd")
class MinimumBarrier:
    """MB+ salient object detection (Zhang et al. 2015): FastMBD from the border on Lab, at ``scale`` px."""

    def __init__(self, scale: int = 300, passes: int = 3, median: int = 5, backgroundness: bool = True,
                 margin: float = 0.1, cov_reg: float = 50.0, centre_bias: bool = True,
                 smooth_alpha: float = 50.0, contrast_b: float = 10.0) -> None:
        self.scale = scale
        self.passes = passes
        self.median = median
        self.backgroundness = backgroundness
        self.margin = margin
        self.cov_reg = cov_reg
        self.centre_bias = centre_bias
        self.smooth_alpha = smooth_alpha
        self.contrast_b = contrast_b

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        h, w = image.shape[:2]
        if int(image.max()) == int(image.min()):  # flat: nothing stands out
            return np.zeros((h, w), np.float32)
        factor = min(1.0, self.scale / max(h, w))  # small images are not enlarged: nothing to gain
        small = _resize_rgb(image, max(1, round(h * factor)), max(1, round(w * factor)))
        lab = _srgb_to_lab(small) * np.array([255 / 100, 1.0, 1.0])  # 8-bit Lab scaling, as the authors' code
        if self.median > 1:
            lab = ndimage.median_filter(lab, size=(self.median, self.median, 1), mode="nearest")
        saliency = _normalise(mbd_transform(lab.transpose(2, 0, 1), self.passes).sum(axis=0)).astype(np.float64)
        if self.backgroundness:
            saliency = saliency + _backgroundness(small.astype(np.float64), self.margin, self.cov_reg)
        if self.centre_bias:
            saliency = saliency * _centre_bias(*saliency.shape)
        saliency = _normalise(saliency).astype(np.float64)
        if saliency.max() <= 0:
            return np.zeros((h, w), np.float32)
        if self.smooth_alpha > 0:
            scale = max(saliency.shape) / self.scale  # the paper's width is for ~300 px images
            width = max(3, int(self.smooth_alpha * np.sqrt(saliency.mean()) * scale))
            width = min(width, max(1, min(saliency.shape) // 4))  # a wider square would erase a thin image
            saliency = _normalise(_morph_smooth(saliency, width)).astype(np.float64)
        if self.contrast_b > 0:
            saliency = _enhance_contrast(saliency, self.contrast_b)
        small_map = Image.fromarray(_normalise(saliency))  # PIL, not ops.resize: torch's antialiased
        return _normalise(np.asarray(small_map.resize((w, h), Image.BILINEAR)))  # bilinear is wrong for 1-px sides


@register_saliency_model("centre_prior")
class CentrePrior:
    """Centre prior baseline: a Gaussian centred on the image, sigma ``sigma`` x each side; ignores content."""

    def __init__(self, sigma: float = 1 / 3) -> None:
        self.sigma = sigma

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        h, w = image.shape[:2]
        if int(image.max()) == int(image.min()):  # flat: nothing stands out
            return np.zeros((h, w), np.float32)
        y = (np.arange(h) - (h - 1) / 2) / (self.sigma * h)
        x = (np.arange(w) - (w - 1) / 2) / (self.sigma * w)
        return _normalise(np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)))
