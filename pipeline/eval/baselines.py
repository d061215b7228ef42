"""Classic codecs as baselines, through Pillow: JPEG, WebP and JPEG 2000 at a matched bpp.

Each codec has one knob (its *setting*) and the bpp is always measured on the real
encoded bytes (8 x file size / pixels, the same rule as the ``.roic`` files):

- ``jpeg``: Pillow ``quality`` 1..100 (libjpeg scale), 4:2:0 chroma, ``optimize=True``
  (optimised Huffman tables: the fair setting; without it the fixed tables cost ~500
  bytes, which dominates on small images).
- ``webp``: Pillow ``quality`` 0..100, lossy, ``method=4`` (libwebp's default).
- ``jpeg2000``: OpenJPEG through Pillow in rate mode: ``quality_mode="rates"`` with one
  quality layer whose value is the *compression ratio* against the raw 24-bit image
  (``quality_layers=[ratio]``, so ``bpp ~= 24 / ratio``), the 9/7 ``irreversible``
  wavelet, raw codestream (``no_jp2=True``, no JP2 box overhead). The setting is the
  ratio (a float). Skipped, with the reason recorded, when Pillow lacks OpenJPEG.

Matching a target bpp (:func:`encode_at_bpp`): the bpp of each codec grows with its
setting, so JPEG and WebP bisect the integer quality and JPEG 2000 refines the ratio
continuously (``ratio *= bpp / target``, OpenJPEG's rate control is already within a
few percent). Every setting tried is kept and the rule is **nearest**: the encoding
whose bpp has the smallest absolute difference to the target (ties: the lower bpp),
not "largest not above". When the target is out of the codec's reach the closest
end is returned (e.g. JPEG cannot go below ~0.2 bpp on a 128 px image, and ~0.45 bpp
without optimised tables: headers and tables are a fixed cost; WebP's floor is ~0.1
bpp there), so check the returned bpp.

Decoded images are 8-bit RGB, returned as (1,3,H,W) float tensors in [0,1].
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, features

BASELINES = ("jpeg", "webp", "jpeg2000")

JPEG_QUALITY = (1, 100)
WEBP_QUALITY = (0, 100)
J2K_RATIO = (1.0, 5000.0)  # ratio 1 is near-lossless; 5000 gives the smallest files OpenJPEG writes


class BaselineError(ValueError):
    """A baseline codec that is unknown or cannot run in this Pillow build."""


class BaselineResult(NamedTuple):
    """One encoding: the bytes, the decoded image (1,3,H,W in [0,1]), its bpp and the setting."""

    data: bytes
    x_hat: torch.Tensor
    bpp: float
    setting: float


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    _rgb(image).save(buf, fmt, **options)
    return buf.getvalue()


def encode_jpeg(image: Image.Image, quality: float) -> bytes:
    """JPEG bytes at integer ``quality`` (1..100), optimised Huffman tables, 4:2:0."""
    q = int(round(min(max(quality, JPEG_QUALITY[0]), JPEG_QUALITY[1])))
    return _save(image, "JPEG", quality=q, optimize=True, subsampling="4:2:0")


def encode_webp(image: Image.Image, quality: float) -> bytes:
    """Lossy WebP bytes at integer ``quality`` (0..100)."""
    q = int(round(min(max(quality, WEBP_QUALITY[0]), WEBP_QUALITY[1])))
    return _save(image, "WEBP", quality=q, method=4, lossless=False)


def encode_jpeg2000(image: Image.Image, ratio: float) -> bytes:
    """JPEG 2000 codestream bytes at compression ``ratio`` (raw 24-bit size / file size)."""
    r = float(min(max(ratio, J2K_RATIO[0]), J2K_RATIO[1]))
    return _save(image, "JPEG2000", quality_mode="rates", quality_layers=[r], irreversible=True,
                 no_jp2=True)


def decode_bytes(data: bytes) -> torch.Tensor:
    """Decode image bytes (any format Pillow reads) to a (1,3,H,W) tensor in [0,1]."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


@dataclass(frozen=True)
class Baseline:
    """A classic codec: how to encode at a setting, its setting range and its sweep."""

    name: str
    encode: Callable[[Image.Image, float], bytes]
    integer: bool  # integer setting (quality) or continuous (ratio)
    low: float  # the setting range; bpp grows from `low` to `high` for quality...
    high: float
    increasing: bool  # ...and falls for a ratio (JPEG 2000): bpp increasing in the setting?
    sweep: tuple[float, ...]  # the settings of an RD curve
    feature: str  # the Pillow feature it needs


_REGISTRY: dict[str, Baseline] = {
    "jpeg": Baseline("jpeg", encode_jpeg, True, *JPEG_QUALITY, True,
                     (1, 3, 5, 10, 20, 30, 50, 70, 85, 95), "jpg"),
    "webp": Baseline("webp", encode_webp, True, *WEBP_QUALITY, True,
                     (0, 5, 10, 20, 30, 50, 70, 85, 95, 100), "webp"),
    # ratios for ~0.02 .. 4 bpp (24 / ratio), geometric
    "jpeg2000": Baseline("jpeg2000", encode_jpeg2000, False, *J2K_RATIO, False,
                         tuple(float(r) for r in np.round(24.0 / np.geomspace(0.02, 4.0, 10), 3)),
                         "jpg_2000"),
}


def get_baseline(name: str) -> Baseline:
    """The baseline ``name`` (one of :data:`BASELINES`); :class:`BaselineError` if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BaselineError(f"unknown baseline {name!r} (choose from {', '.join(BASELINES)})") from None


def unavailable_reason(name: str) -> str | None:
    """Why baseline ``name`` cannot run in this Pillow build, or None when it can."""
    b = get_baseline(name)
    try:
        ok = bool(features.check(b.feature))
    except Exception:  # noqa: BLE001 - an odd Pillow build
        ok = False
    if not ok:
        lib = {"jpg": "libjpeg", "webp": "libwebp", "jpg_2000": "OpenJPEG"}[b.feature]
        return f"Pillow {Image.__version__} is built without {lib} (PIL.features.check({b.feature!r}) is False)"
    return None


def available_baselines(names: tuple[str, ...] | list[str] = BASELINES) -> tuple[list[str], dict[str, str]]:
    """(the baselines of ``names`` that can run, {name: reason} for those skipped)."""
    ok, skipped = [], {}
    for n in names:
        reason = unavailable_reason(n)
        if reason is None:
            ok.append(n)
        else:
            skipped[n] = reason
    return ok, skipped


def _bpp(data: bytes, image: Image.Image) -> float:
    return 8.0 * len(data) / (image.width * image.height)


def encode_at_setting(name: str, image: Image.Image, setting: float) -> BaselineResult:
    """Encode ``image`` with baseline ``name`` at ``setting`` and decode it back."""
    b = get_baseline(name)
    data = b.encode(image, setting)
    return BaselineResult(data, decode_bytes(data), _bpp(data, image), float(setting))


def _nearest(tried: dict[float, bytes], image: Image.Image, target: float) -> tuple[float, bytes]:
    return min(tried.items(), key=lambda kv: (abs(_bpp(kv[1], image) - target), _bpp(kv[1], image)))


def _search_integer(b: Baseline, image: Image.Image, target: float) -> tuple[float, bytes]:
    tried: dict[float, bytes] = {}

    def bpp_at(q: int) -> float:
        if q not in tried:
            tried[q] = b.encode(image, q)
        return _bpp(tried[q], image)

    lo, hi = int(b.low), int(b.high)
    if bpp_at(lo) >= target or bpp_at(hi) <= target:
        return _nearest(tried, image, target)
    while hi - lo > 1:  # invariant: bpp(lo) < target < bpp(hi)
        mid = (lo + hi) // 2
        if bpp_at(mid) < target:
            lo = mid
        else:
            hi = mid
    return _nearest(tried, image, target)


def _search_ratio(b: Baseline, image: Image.Image, target: float, steps: int = 6,
                  tolerance: float = 0.01) -> tuple[float, bytes]:
    tried: dict[float, bytes] = {}
    ratio = min(max(24.0 / target, b.low), b.high)
    for _ in range(steps):
        data = tried.setdefault(ratio, b.encode(image, ratio))
        bpp = _bpp(data, image)
        if abs(bpp - target) <= tolerance * target:
            break
        new = min(max(ratio * bpp / target, b.low), b.high)
        if new in tried:
            break
        ratio = new
    return _nearest(tried, image, target)


def encode_at_bpp(name: str, image: Image.Image, target_bpp: float) -> BaselineResult:
    """Encode with baseline ``name`` at the setting whose real bpp is **nearest** to ``target_bpp``.

    Returns (bytes, decoded (1,3,H,W) tensor, bpp, setting). The target may be out of
    reach (see the module docstring): the closest end of the range is returned then.
    """
    if not (target_bpp > 0 and math.isfinite(target_bpp)):
        raise BaselineError(f"target bpp must be a positive number, got {target_bpp}")
    b = get_baseline(name)
    reason = unavailable_reason(name)
    if reason is not None:
        raise BaselineError(f"{name} is unavailable: {reason}")
    image = _rgb(image)
    setting, data = (_search_integer if b.integer else _search_ratio)(b, image, float(target_bpp))
    return BaselineResult(data, decode_bytes(data), _bpp(data, image), float(setting))


def jpeg_at_bpp(image: Image.Image, target_bpp: float) -> BaselineResult:
    """JPEG at the quality whose bpp is nearest to ``target_bpp``."""
    return encode_at_bpp("jpeg", image, target_bpp)


def webp_at_bpp(image: Image.Image, target_bpp: float) -> BaselineResult:
    """WebP at the quality whose bpp is nearest to ``target_bpp``."""
    return encode_at_bpp("webp", image, target_bpp)


def jpeg2000_at_bpp(image: Image.Image, target_bpp: float) -> BaselineResult:
    """JPEG 2000 at the compression ratio whose bpp is nearest to ``target_bpp``."""
    return encode_at_bpp("jpeg2000", image, target_bpp)
