"""Side-by-side pictures: the original with its ROI outlined, ours, and JPEG at the same file size."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

CAPTION_HEIGHT = 34
OUTLINE = (255, 230, 0)


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


def _stats(bpp: float, q: dict[str, float]) -> str:
    return f"{bpp:.3f} bpp  ROI {q['roi_psnr']:.2f} dB  all {q['psnr']:.2f} dB"


def side_by_side(image: Image.Image, ours: torch.Tensor, ours_bpp: float, mask: torch.Tensor, title: str
                 ) -> tuple[Image.Image, dict[str, dict[str, float]]]:
    """One picture: original (ROI outlined) | ``ours`` (a decoded (1,3,H,W) tensor) | JPEG at the
    file size nearest ``ours_bpp``, each captioned with bpp, ROI PSNR and whole-image PSNR.
    Returns the picture and the numbers in its captions."""
    from pipeline.codec.coding import image_to_tensor
    from pipeline.eval.baselines import jpeg_at_bpp
    from pipeline.eval.evaluate import quality

    x = image_to_tensor(image)
    jpeg = jpeg_at_bpp(image, ours_bpp)
    numbers = {"ours": {"bpp": ours_bpp, **quality(x, ours, mask)},
               "jpeg": {"bpp": jpeg.bpp, **quality(x, jpeg.x_hat, mask)}}
    original = np.asarray(image.convert("RGB"))
    panels = [_captioned(outline_roi(original, mask[0, 0].numpy()), ["original", "ROI outlined"]),
              _captioned(_as_array(ours), [title, _stats(ours_bpp, numbers["ours"])]),
              _captioned(_as_array(jpeg.x_hat), ["JPEG, same file size", _stats(jpeg.bpp, numbers["jpeg"])])]
    gap = 6
    picture = Image.new("RGB", (sum(p.width for p in panels) + gap * 2, panels[0].height), "white")
    for i, panel in enumerate(panels):
        picture.paste(panel, (i * (panel.width + gap), 0))
    return picture, numbers


def write_side_by_side(image_path: Path, ours: torch.Tensor, ours_bpp: float, mask: torch.Tensor, title: str,
                       out_dir: Path) -> Path:
    """:func:`side_by_side` of one image saved as ``out_dir/<stem>.png``."""
    from pipeline.codec.coding import open_image

    picture, _ = side_by_side(open_image(image_path).convert("RGB"), ours, ours_bpp, mask, title)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{image_path.stem}.png"
    picture.save(path)
    return path
