"""Evaluate a checkpoint on a folder of images: real bitstreams, ROI metrics, baselines.

:func:`evaluate_checkpoint` is the body of ``roicodec evaluate`` (without ``--sweep``).
For every image of ``images_dir`` (files with an extension Pillow knows; sorted by name):

- the learned codec (``roicodec``): the image is encoded to real ``.roic`` bytes with its
  mask at (``roi_quality``, ``rate``) and decoded back from those bytes; ``bpp`` is
  8 x the file size / pixels (header included);
- ``jpeg``, ``webp``, ``jpeg2000``: the classic codec at the setting whose bpp is
  nearest to the learned file's bpp (:mod:`pipeline.eval.baselines`);
- ``learned_uniform``: the same checkpoint with ROI off (``roi_quality=1``, uniform
  quality), its continuous rate bisected for the bpp nearest to the ROI file's
  (``uniform_match="bpp"``, the default), or at the same rate (``"rate"``).

Metrics of each codec (:mod:`pipeline.eval.metrics` and :mod:`pipeline.eval.perceptual`, on
the 8-bit reconstruction a user would get: the learned output is rounded to 8 bits like
``roicodec decompress``'s PNG): ``bpp``, ``psnr``, ``roi_psnr``, ``nonroi_psnr``, ``weighted_psnr``
(each pixel's error weighted by its quality ``m + (1 - m) Q`` at the evaluation's main Q: the map a
graded file is coded from), ``ms_ssim``,
``haarpsi``, ``gmsd``, ``texture_roi``, ``texture_nonroi`` (+ ``setting``: quality, ratio or
rate); with an LPIPS model (``lpips=``, ``--vgg-weights``) also ``lpips``, ``lpips_roi``,
``lpips_nonroi``. Masks are ``masks_dir/<image stem>.png`` (white = ROI, resized to the
image); the codec gets the soft mask, the ROI metrics binarise it at 0.5. ``graded`` (``--soft``)
codes each latent cell's step from the soft quality map instead of the binary ROI cells (masks
that are quality maps: ``graded`` with Q = 0). Without
``masks_dir`` the whole image is ROI: the codec gets no mask (uniform quality, so
``learned_uniform`` is the learned codec itself), ``roi_psnr`` equals ``psnr`` and
``nonroi_psnr`` (and ``texture_nonroi``, ``lpips_nonroi``) is ``nan`` (an empty region); an
all-black mask gives a ``nan`` ROI PSNR.
MS-SSIM is ``nan`` for images of 32 px a side or less.

The result (a JSON-ready dict)::

    {"checkpoint", "variant", "images_dir", "masks_dir", "roi_quality", "rate",
     "codecs": ["roicodec", "learned_uniform", "jpeg", "webp", "jpeg2000"],
     "baselines_skipped": {name: reason},         # e.g. JPEG 2000 without OpenJPEG
     "images": [{"image", "width", "height", "mask", "roi_fraction",
                 "bpp", "psnr", "roi_psnr", "nonroi_psnr", "ms_ssim", "haarpsi", "gmsd",
                 "texture_roi", "texture_nonroi", "setting",                        # learned codec
                 "jpeg": {"bpp", "psnr", ..., "setting"}, "webp": {...}, "jpeg2000": {...},
                 "learned_uniform": {...}}],
     "mean": {same keys as an image entry, averaged over images (nan-aware)},
     "n_images", "errors": [{"image", "error"}]}

Means are plain averages of the per-image values (PSNR averaged in dB, not from a
pooled MSE), ignoring ``nan``s; a mean over no finite value is ``nan``. :func:`to_json`
writes ``nan`` as ``null`` (strict JSON). Unreadable images and masks are recorded in
``errors`` and skipped; a mask missing from ``masks_dir`` is an error for that image.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.codec.checkpoint import checkpoint_file, load_checkpoint
from pipeline.codec.coding import (bits_per_pixel, decode, encode, image_to_tensor, mask_to_tensor,
                                   open_image)
from pipeline.codec.models import ROICodec
from pipeline.eval import baselines as bl
from pipeline.eval.metrics import ms_ssim, psnr, quality_weighted_psnr, roi_psnr
from pipeline.eval.perceptual import LPIPS_KEYS, WEIGHT_FREE, LPIPSDistance, perceptual_quality

METRICS = ("bpp", "psnr", "roi_psnr", "nonroi_psnr", "weighted_psnr", "ms_ssim", *WEIGHT_FREE)
LEARNED = "roicodec"
UNIFORM = "learned_uniform"
DEFAULT_ROI_QUALITY = 0.3
DEFAULT_RATE = 0.5


class EvaluationError(ValueError):
    """Bad input to an evaluation (missing folder, no readable image, bad option)."""


# -- inputs -----------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file; a folder (a Ray Train checkpoint) means its ``model.pt``."""
    p = checkpoint_file(path)
    if not p.is_file():
        raise EvaluationError(f"checkpoint not found: {path}")
    return p


def load_model(checkpoint: str | Path | ROICodec) -> tuple[ROICodec, str | None]:
    """(eval-mode model, checkpoint path or None) from a path or an already built model."""
    if isinstance(checkpoint, ROICodec):
        return checkpoint.eval(), None
    path = resolve_checkpoint(checkpoint)
    return load_checkpoint(path), str(path)


def list_images(images_dir: str | Path) -> list[Path]:
    """Files of ``images_dir`` with an image extension Pillow knows, sorted by name."""
    d = Path(images_dir)
    if not d.is_dir():
        raise EvaluationError(f"images folder not found: {images_dir}")
    exts = {e.lower() for e in Image.registered_extensions()}
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in exts)
    if not files:
        raise EvaluationError(f"no image files in {images_dir}")
    return files


def mask_path(masks_dir: str | Path, image: Path) -> Path:
    """Where the mask of ``image`` lies: ``masks_dir/<image stem>.png``."""
    return Path(masks_dir) / f"{image.stem}.png"


def load_pair(image_path: Path, masks_dir: str | Path | None
              ) -> tuple[Image.Image, torch.Tensor, torch.Tensor | None, str | None]:
    """(RGB image, (1,3,H,W) tensor, (1,1,H,W) mask or None, mask path or None)."""
    image = open_image(image_path).convert("RGB")
    x = image_to_tensor(image)
    if masks_dir is None:
        return image, x, None, None
    mp = mask_path(masks_dir, image_path)
    if not mp.is_file():
        raise EvaluationError(f"no mask {mp.name} in {masks_dir}")
    mask = mask_to_tensor(open_image(mp), tuple(x.shape[-2:]))
    return image, x, mask, str(mp)


# -- one codec on one image -------------------------------------------------------------------

def quantize8(x: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid (what a saved PNG holds)."""
    return (x.clamp(0, 1) * 255.0).round() / 255.0


def quality(x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None,
            lpips: LPIPSDistance | None = None, roi_quality: float = 0.0) -> dict[str, float]:
    """psnr, roi_psnr, nonroi_psnr, weighted_psnr (weights ``m + (1 - m) roi_quality``), ms_ssim and
    the weight-free perceptual metrics (haarpsi, gmsd, texture_roi, texture_nonroi) of a
    reconstruction, + lpips, lpips_roi, lpips_nonroi with an LPIPS model
    (:func:`pipeline.eval.perceptual.load_lpips`); no mask: all ROI."""
    weighted = quality_weighted_psnr(x, x_hat, mask, roi_quality)
    if mask is None:
        mask = torch.ones_like(x[:, :1])
    roi, nonroi = roi_psnr(x, x_hat, mask)
    return {"psnr": psnr(x, x_hat), "roi_psnr": roi, "nonroi_psnr": nonroi, "weighted_psnr": weighted,
            "ms_ssim": ms_ssim(x, x_hat), **perceptual_quality(x, x_hat, mask, lpips)}


def metric_keys(rows: Iterable[dict[str, Any]]) -> tuple[str, ...]:
    """:data:`METRICS`, then the LPIPS keys when some row has them (an evaluation with VGG weights)."""
    rows = list(rows)
    return METRICS + tuple(k for k in LPIPS_KEYS if any(k in r for r in rows))


def _entry(bpp: float, setting: float, x: torch.Tensor, x_hat: torch.Tensor,
           mask: torch.Tensor | None, lpips: LPIPSDistance | None = None, weight_quality: float = 0.0,
           **more: Any) -> dict[str, Any]:
    return {"bpp": float(bpp), **quality(x, x_hat, mask, lpips, weight_quality), "setting": float(setting),
            **more}


def learned_point(model: ROICodec, x: torch.Tensor, mask: torch.Tensor | None, roi_quality: float,
                  rate: float, eval_mask: torch.Tensor | None = None, lpips: LPIPSDistance | None = None,
                  graded: bool = False, weight_quality: float | None = None) -> dict[str, Any]:
    """Encode to real ``.roic`` bytes (``graded``: steps from the soft quality map), decode them,
    measure (``setting`` = the rate; ``weighted_psnr`` at ``weight_quality``, default ``roi_quality``)."""
    with torch.no_grad():
        data = encode(model, x, mask, roi_quality, rate, graded)
        x_hat = quantize8(decode(model, data))
    h, w = x.shape[-2:]
    return _entry(bits_per_pixel(data, w, h), rate, x, x_hat, mask if eval_mask is None else eval_mask, lpips,
                  roi_quality if weight_quality is None else weight_quality, bytes=len(data))


def learned_at_bpp(model: ROICodec, x: torch.Tensor, target_bpp: float, roi_quality: float = 1.0,
                   mask: torch.Tensor | None = None, steps: int = 8, tolerance: float = 0.01
                   ) -> tuple[bytes, float]:
    """Bisect the continuous rate for the ``.roic`` file whose bpp is **nearest** to the target.

    Returns (bytes, rate). Stops early within ``tolerance`` (relative) of the target.
    """
    h, w = x.shape[-2:]
    tried: dict[float, bytes] = {}

    def bpp_at(r: float) -> float:
        if r not in tried:
            with torch.no_grad():
                tried[r] = encode(model, x, mask, roi_quality, r)
        return bits_per_pixel(tried[r], w, h)

    lo, hi = 0.0, 1.0
    if bpp_at(lo) < target_bpp < bpp_at(hi):
        for _ in range(steps):
            mid = (lo + hi) / 2
            b = bpp_at(mid)
            if abs(b - target_bpp) <= tolerance * target_bpp:
                break
            lo, hi = (mid, hi) if b < target_bpp else (lo, mid)
    rate, data = min(tried.items(), key=lambda kv: (abs(bits_per_pixel(kv[1], w, h) - target_bpp), kv[0]))
    return data, rate


def uniform_point(model: ROICodec, x: torch.Tensor, eval_mask: torch.Tensor | None, target_bpp: float,
                  rate: float, match: str = "bpp", steps: int = 8, lpips: LPIPSDistance | None = None,
                  weight_quality: float = 0.0) -> dict[str, Any]:
    """The learned codec with ROI off (uniform quality), at the nearest bpp or at ``rate``."""
    if match == "rate":
        return learned_point(model, x, None, 1.0, rate, eval_mask=eval_mask, lpips=lpips,
                             weight_quality=weight_quality)
    data, r = learned_at_bpp(model, x, target_bpp, 1.0, None, steps=steps)
    with torch.no_grad():
        x_hat = quantize8(decode(model, data))
    h, w = x.shape[-2:]
    return _entry(bits_per_pixel(data, w, h), r, x, x_hat, eval_mask, lpips, weight_quality, bytes=len(data))


def baseline_point(name: str, image: Image.Image, x: torch.Tensor, mask: torch.Tensor | None,
                   target_bpp: float, lpips: LPIPSDistance | None = None, weight_quality: float = 0.0
                   ) -> dict[str, Any]:
    """Baseline ``name`` at the nearest bpp, measured like the learned codec."""
    res = bl.encode_at_bpp(name, image, target_bpp)
    return _entry(res.bpp, res.setting, x, res.x_hat, mask, lpips, weight_quality, bytes=len(res.data))


# -- aggregation and JSON ---------------------------------------------------------------------

def nanmean(values: Iterable[float]) -> float:
    """Mean of the finite values; ``nan`` when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


def mean_entry(images: list[dict[str, Any]], codecs: list[str]) -> dict[str, Any]:
    """The ``mean`` entry: every metric (and setting) averaged over images, per codec."""
    out: dict[str, Any] = {k: nanmean(e.get(k, float("nan")) for e in images)
                           for k in metric_keys(images) + ("roi_fraction", "setting")}
    for c in codecs:
        if c == LEARNED:
            continue
        rows = [e[c] for e in images if isinstance(e.get(c), dict)]
        out[c] = {k: nanmean(r.get(k, float("nan")) for r in rows) for k in metric_keys(rows) + ("setting",)}
    return out


def jsonable(obj: Any) -> Any:
    """Replace non-finite floats by None (strict JSON) and numpy scalars by Python ones."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as indented strict JSON (``nan`` -> ``null``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n")
    return path


def check_knobs(roi_quality: float, rate: float) -> None:
    for name, v in (("roi_quality", roi_quality), ("rate", rate)):
        if not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0):
            raise EvaluationError(f"{name} must lie in [0, 1], got {v}")


# -- the evaluation ---------------------------------------------------------------------------

def evaluate_checkpoint(checkpoint: str | Path | ROICodec, images_dir: str | Path,
                        masks_dir: str | Path | None = None, roi_quality: float = DEFAULT_ROI_QUALITY,
                        rate: float = DEFAULT_RATE, baselines: Iterable[str] = bl.BASELINES,
                        uniform: bool = True, uniform_match: str = "bpp", uniform_steps: int = 8,
                        progress: bool = True, lpips: LPIPSDistance | None = None, graded: bool = False
                        ) -> dict[str, Any]:
    """Evaluate one operating point of a checkpoint on ``images_dir`` (see the module docstring).

    ``checkpoint``: a checkpoint file, a Ray checkpoint folder (its ``model.pt``) or a model.
    ``lpips``: an LPIPS model (:func:`pipeline.eval.perceptual.load_lpips`) adds the LPIPS metrics.
    Raises :class:`EvaluationError` when no image could be evaluated.
    """
    check_knobs(roi_quality, rate)
    if uniform_match not in ("bpp", "rate"):
        raise EvaluationError(f"uniform_match must be 'bpp' or 'rate', got {uniform_match!r}")
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise EvaluationError(f"masks folder not found: {masks_dir}")
    names = [bl.get_baseline(n).name for n in baselines]
    files = list_images(images_dir)
    model, ckpt_path = load_model(checkpoint)
    run, skipped = bl.available_baselines(names)
    codecs = [LEARNED] + ([UNIFORM] if uniform else []) + run
    images: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for path in tqdm(files, desc="evaluate", unit="image", disable=not progress, file=sys.stderr):
        try:
            image, x, mask, mpath = load_pair(path, masks_dir)
        except (ValueError, OSError) as exc:
            errors.append({"image": path.name, "error": str(exc).splitlines()[0] if str(exc) else
                           type(exc).__name__})
            continue
        h, w = x.shape[-2:]
        roi_fraction = 1.0 if mask is None else float((mask >= 0.5).float().mean())
        entry: dict[str, Any] = {"image": path.name, "width": int(w), "height": int(h), "mask": mpath,
                                 "roi_fraction": roi_fraction}
        point = learned_point(model, x, mask, roi_quality, rate, lpips=lpips, graded=graded)
        entry.update(point)
        if uniform:
            if mask is None:  # no mask: the learned codec is uniform already
                entry[UNIFORM] = dict(point)
            else:
                entry[UNIFORM] = uniform_point(model, x, mask, point["bpp"], rate, uniform_match,
                                               uniform_steps, lpips, roi_quality)
        for name in run:
            entry[name] = baseline_point(name, image, x, mask, point["bpp"], lpips, roi_quality)
        images.append(entry)
    if not images:
        first = errors[0]["error"] if errors else "nothing to do"
        raise EvaluationError(f"no image of {images_dir} could be evaluated "
                              f"({len(errors)} errors; first: {first})")
    return {
        "checkpoint": ckpt_path, "variant": model.variant, "images_dir": str(images_dir),
        "masks_dir": None if masks_dir is None else str(masks_dir),
        "roi_quality": float(roi_quality), "rate": float(rate), "graded": bool(graded),
        "uniform_match": uniform_match,
        "codecs": codecs, "baselines_skipped": skipped,
        "n_images": len(images), "images": images, "mean": mean_entry(images, codecs), "errors": errors,
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines: mean bpp, PSNRs, MS-SSIM, HaarPSI, background texture (LPIPS) of every codec."""
    mean = result["mean"]
    lines = [f"{result['n_images']} images ({len(result['errors'])} skipped), roi-quality "
             f"{result['roi_quality']:.2f}, rate {result['rate']:.2f}"]
    for c in result["codecs"]:
        m = mean if c == LEARNED else mean.get(c, {})
        lines.append(f"  {c:<16} {m.get('bpp', float('nan')):7.4f} bpp  PSNR {m.get('psnr', float('nan')):6.2f} dB"
                     f"  ROI {m.get('roi_psnr', float('nan')):6.2f} dB  non-ROI "
                     f"{m.get('nonroi_psnr', float('nan')):6.2f} dB  weighted "
                     f"{m.get('weighted_psnr', float('nan')):6.2f} dB"
                     f"  MS-SSIM {m.get('ms_ssim', float('nan')):.4f}"
                     f"  HaarPSI {m.get('haarpsi', float('nan')):.4f}  non-ROI texture "
                     f"{m.get('texture_nonroi', float('nan')):.2f}"
                     + (f"  LPIPS {m['lpips']:.4f}" if "lpips" in m else ""))
    for name, reason in result.get("baselines_skipped", {}).items():
        lines.append(f"  {name:<16} skipped: {reason}")
    return lines
