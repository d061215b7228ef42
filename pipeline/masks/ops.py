"""Mask operations shared by every mask source and codec variant.

A mask is a float32 HxW numpy array in [0, 1] (1 = region of interest). These helpers
convert images to RGB arrays, resize, smooth, binarise and combine masks, and move masks
to and from 8-bit grayscale PNG bytes (white = ROI).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class MaskError(ValueError):
    """Bad input for a mask source; the message is one line, fit for a CLI's stderr."""


def assign_nonroi_value(mask: torch.Tensor | np.ndarray, roi_quality: float | torch.Tensor):
    """Give every non-ROI pixel the user's value Q: ``m + (1 - m) * Q``.

    Q = 1 turns the mask into all ones (uniform quality); Q = 0 keeps it as it is.
    Soft masks keep their ramps. Works on numpy arrays and torch tensors; a tensor Q
    of shape (B,) applies one value per image of a (B, 1, H, W) batch.
    """
    if isinstance(roi_quality, torch.Tensor) and roi_quality.dim() == 1:
        roi_quality = roi_quality.view(-1, 1, 1, 1)
    return mask + (1.0 - mask) * roi_quality


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow image as uint8 HxWx3 RGB.

    16-bit and 32-bit integer grayscale (modes ``I;16*``, ``I``) are scaled from the
    16-bit range to 8 bits (Pillow's own conversion would clip them); float images
    (mode ``F``) are clipped to [0, 255]; alpha is dropped; palette, CMYK and other
    modes go through Pillow's RGB conversion.
    """
    if image.mode.startswith("I"):
        wide = np.asarray(image).astype(np.float64)
        gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a mask to ``size = (height, width)`` (antialiased when shrinking)."""
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape == tuple(size):
        return mask.copy()
    shrinking = size[0] < mask.shape[0] or size[1] < mask.shape[1]
    out = F.interpolate(torch.from_numpy(mask)[None, None], size=tuple(size), mode="bilinear",
                        align_corners=False, antialias=shrinking)
    return out[0, 0].clamp_(0.0, 1.0).numpy()


def smooth(mask: np.ndarray, kernel: int) -> np.ndarray:
    """Average-pool smoothing with an odd ``kernel``; same size out, borders averaged over valid pixels."""
    if kernel < 1 or kernel % 2 == 0:
        raise MaskError(f"smoothing kernel must be a positive odd number, got {kernel}")
    if kernel == 1:
        return np.asarray(mask, dtype=np.float32).copy()
    t = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    out = F.avg_pool2d(t, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return out[0, 0].numpy()


def binarize(mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """1 where ``mask >= threshold``, else 0 (float32)."""
    return (np.asarray(mask) >= threshold).astype(np.float32)


def combine(masks: Sequence[np.ndarray], weights: Sequence[float] | None = None,
            mode: str = "max") -> np.ndarray:
    """Combine same-sized masks into one in [0, 1].

    ``mode="max"``: pixelwise max of ``w_i * m_i`` with the weights scaled so the
    largest is 1 (the union; a weight below the largest caps how important that
    source can get). ``mode="mean"``: the weighted mean ``sum(w_i m_i) / sum(w_i)``.
    Weights default to 1 and must be non-negative with a positive sum.
    """
    if not masks:
        raise MaskError("nothing to combine: no masks given")
    shapes = {np.shape(m) for m in masks}
    if len(shapes) != 1:
        raise MaskError(f"masks to combine differ in size: {sorted(shapes)}")
    w = np.ones(len(masks), np.float64) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(masks),):
        raise MaskError(f"got {w.size} weights for {len(masks)} masks")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise MaskError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    stack = np.stack([np.asarray(m, dtype=np.float32) for m in masks])
    if mode == "max":
        out = (stack * (w / w.max()).astype(np.float32)[:, None, None]).max(axis=0)
    elif mode == "mean":
        out = np.tensordot((w / w.sum()).astype(np.float32), stack, axes=1)
    else:
        raise MaskError(f"unknown combine mode {mode!r} (use 'max' or 'mean')")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def to_uint8(mask: np.ndarray) -> np.ndarray:
    """A [0, 1] mask as uint8 (0..255, rounded)."""
    return np.round(np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def to_png(mask: np.ndarray) -> bytes:
    """Encode a [0, 1] mask as an 8-bit grayscale PNG (white = ROI)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(mask)).save(buf, format="PNG")
    return buf.getvalue()


def from_png(data: bytes) -> np.ndarray:
    """Decode a mask image (PNG or any Pillow format, 8- or 16-bit) to float32 in [0, 1]."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            wide = img.mode.startswith("I") or img.mode == "F"
            gray = to_rgb_array(img)[..., 0] if wide else np.asarray(img.convert("L"))
    except (OSError, ValueError) as exc:
        raise MaskError(f"cannot decode mask PNG: {exc}") from exc
    return gray.astype(np.float32) / 255.0
