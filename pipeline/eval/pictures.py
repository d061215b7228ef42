"""Side-by-side pictures: the original with its ROI outlined, one or more decoded images (e.g. the MSE
model and the perceptual model), and JPEG at the same file size; each captioned with bpp, ROI PSNR,
whole-image PSNR and the background texture ratio (:func:`pipeline.eval.perceptual.texture_ratio`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

if TYPE_CHECKING:
    from pipeline.codec.models import ROICodec
    from pipeline.eval.perceptual import LPIPSDistance

CAPTION_HEIGHT = 50  # three 15 px lines of Pillow's default font
OUTLINE = (255, 230, 0)
GAP = 6


def outline_roi(image: np.ndarray, mask: np.ndarray, width: int = 2) -> np.ndarray:
    """``image`` (HxWx3 uint8) with the border of ``mask >= 0.5`` painted in :data:`OUTLINE`."""
    roi = mask >= 0.5
    border = ndimage.binary_dilation(roi, iterations=width) & ~roi
    out = image.copy()
    out[border] = OUTLINE
    return out


def _captioned(panel: np.ndarray, lines: Sequence[str]) -> Image.Image:
    h, w = panel.shape[:2]
    canvas = Image.new("RGB", (w, h + CAPTION_HEIGHT), "white")
    canvas.paste(Image.fromarray(panel), (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((4, h + 3 + 15 * i), line, fill="black", font=font)
    return canvas


def _as_array(t: torch.Tensor) -> np.ndarray:
    return (t[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()


def _stats(bpp: float, q: dict[str, float]) -> list[str]:
    texture = q.get("texture_nonroi", float("nan"))
    return [f"{bpp:.3f} bpp  ROI {q['roi_psnr']:.2f} dB  all {q['psnr']:.2f} dB",
            f"background texture {texture:.2f}" if math.isfinite(texture) else "background texture n/a"]


def comparison(image: Image.Image, mask: torch.Tensor, panels: Sequence[tuple[str, torch.Tensor, float]],
               lpips: LPIPSDistance | None = None) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One picture: original (ROI outlined) | each of ``panels`` ((title, decoded (1,3,H,W) tensor,
    bpp), e.g. the MSE model then the perceptual model) | JPEG at the file size nearest the first
    panel's bpp. Captions: title, bpp, ROI PSNR, whole-image PSNR, background texture ratio
    (1 = as detailed as the original). Returns the picture and, per decoded panel then JPEG,
    {"title", "bpp", and :func:`pipeline.eval.evaluate.quality`'s metrics} (LPIPS with ``lpips``)."""
    from pipeline.codec.coding import image_to_tensor
    from pipeline.eval.baselines import jpeg_at_bpp
    from pipeline.eval.evaluate import quality

    if not panels:
        raise ValueError("comparison needs at least one decoded panel")
    x = image_to_tensor(image)
    jpeg = jpeg_at_bpp(image, panels[0][2])
    decoded = [*panels, ("JPEG, same file size", jpeg.x_hat, jpeg.bpp)]
    numbers = [{"title": t, "bpp": float(bpp), **quality(x, x_hat, mask, lpips)} for t, x_hat, bpp in decoded]
    original = np.asarray(image.convert("RGB"))
    tiles = [_captioned(outline_roi(original, mask[0, 0].numpy()), ["original", "ROI outlined"])]
    tiles += [_captioned(_as_array(x_hat), [n["title"], *_stats(n["bpp"], n)])
              for (_, x_hat, _), n in zip(decoded, numbers)]
    picture = Image.new("RGB", (sum(t.width for t in tiles) + GAP * (len(tiles) - 1), tiles[0].height), "white")
    left = 0
    for tile in tiles:
        picture.paste(tile, (left, 0))
        left += tile.width + GAP
    return picture, numbers


def write_comparison(image_path: Path, mask: torch.Tensor, panels: Sequence[tuple[str, torch.Tensor, float]],
                     out_dir: Path, lpips: LPIPSDistance | None = None) -> Path:
    """:func:`comparison` of one image saved as ``out_dir/<stem>.png``."""
    from pipeline.codec.coding import open_image

    picture, _ = comparison(open_image(image_path).convert("RGB"), mask, panels, lpips)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{image_path.stem}.png"
    picture.save(path)
    return path


def checkpoint_label(checkpoint: str | Path) -> str:
    """A short caption for a checkpoint: ``<run>/<checkpoint folder>`` for a Ray Train
    checkpoint's ``model.pt``, else the file's stem."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.pt"
    return f"{path.parent.parent.name}/{path.parent.name}" if path.name == "model.pt" else path.stem


def comparison_pictures(checkpoints: Sequence[tuple[str, str | Path | ROICodec]], images: Sequence[Path],
                        masks_dir: str | Path | None, roi_quality: float, rate: float, out_dir: str | Path,
                        lpips: LPIPSDistance | None = None) -> list[Path]:
    """One :func:`comparison` PNG per image from real ``.roic`` files: the first of ``checkpoints``
    ((title, checkpoint), e.g. the MSE model) at ``rate``, each other one (e.g. the perceptual
    model) at the rate whose file is nearest the first's size, then JPEG at that size."""
    from pipeline.codec.coding import bits_per_pixel, decode, encode
    from pipeline.eval.evaluate import learned_at_bpp, load_model, load_pair, quantize8

    if not checkpoints:
        raise ValueError("comparison_pictures needs at least one checkpoint")
    models = [(title, load_model(ckpt)[0]) for title, ckpt in checkpoints]
    written = []
    for path in images:
        _, x, mask, _ = load_pair(Path(path), masks_dir)
        h, w = x.shape[-2:]
        panels = []
        with torch.no_grad():
            for i, (title, model) in enumerate(models):
                if i == 0:
                    data = encode(model, x, mask, roi_quality, rate)
                    target = bits_per_pixel(data, w, h)
                else:
                    data, _ = learned_at_bpp(model, x, target, roi_quality, mask)
                panels.append((title, quantize8(decode(model, data)), bits_per_pixel(data, w, h)))
        shown = torch.ones_like(x[:, :1]) if mask is None else mask
        written.append(write_comparison(Path(path), shown, panels, out_dir, lpips))
    return written
