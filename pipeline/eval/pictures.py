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


def side_by_side(image: Image.Image, ours: torch.Tensor, ours_bpp: float, mask: torch.Tensor, title: str
                 ) -> tuple[Image.Image, dict[str, dict[str, float]]]:
    """:func:`comparison` with one decoded panel: original (ROI outlined) | ``ours`` | JPEG at the
    file size nearest ``ours_bpp``. Returns the picture and {"ours": ..., "jpeg": ...}, the
    numbers in its captions."""
    picture, numbers = comparison(image, mask, [(title, ours, ours_bpp)])
    ours_numbers, jpeg_numbers = ({k: v for k, v in n.items() if k != "title"} for n in numbers)
    return picture, {"ours": ours_numbers, "jpeg": jpeg_numbers}


def write_side_by_side(image_path: Path, ours: torch.Tensor, ours_bpp: float, mask: torch.Tensor, title: str,
                       out_dir: Path) -> Path:
    """:func:`side_by_side` of one image saved as ``out_dir/<stem>.png``."""
    return write_comparison(image_path, mask, [(title, ours, ours_bpp)], out_dir)
