"""Held-out photos as the benchmarks code them: scaled copies and their saliency ROI masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.eval.evaluate import list_images


def scaled_photos_with_saliency(images_dir: str | Path, out: str | Path, max_side: int) -> tuple[Path, Path]:
    """``out/images`` (the photos of ``images_dir`` with their longest side at most ``max_side``,
    Lanczos) and ``out/masks`` (their weight-free saliency map, ``mbd``, binarised at 0.5).
    Files already there are kept, so a rerun does not redo them."""
    from pipeline.masks.ops import binarize
    from pipeline.masks.saliency import get_saliency_model

    out = Path(out)
    img_dir, mask_dir = out / "images", out / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    saliency = get_saliency_model()
    for path in list_images(images_dir):
        target, mask_path = img_dir / f"{path.stem}.png", mask_dir / f"{path.stem}.png"
        if target.exists() and mask_path.exists():
            continue
        with Image.open(path) as im:
            image = im.convert("RGB")
        scale = min(1.0, max_side / max(image.size))
        if scale < 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        image.save(target)
        mask = binarize(saliency(np.asarray(image)))
        Image.fromarray((np.asarray(mask) * 255).astype(np.uint8)).save(mask_path)
    return img_dir, mask_dir
