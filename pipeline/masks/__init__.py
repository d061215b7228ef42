"""ROI masks from text prompts (CLIP), saliency and COCO ground truth, behind one entry point.

:func:`build_mask` is what the CLI and the service call. A mask is float32 HxW in
[0, 1], 1 = region of interest; several sources are combined by pixelwise max.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.masks.coco import CocoMasks, load_coco, match_category
from pipeline.masks.ops import MaskError, combine, to_rgb_array
from pipeline.masks.saliency import (DEFAULT_SALIENCY_MODEL, SaliencyModel, get_saliency_model,
                                     register_saliency_model, saliency_models)
from pipeline.masks.text import (DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, ClipWeightsError, TextMasker,
                                 get_text_masker)

__all__ = [
    "DEFAULT_CLIP_MODEL", "DEFAULT_CLIP_PRETRAINED", "DEFAULT_SALIENCY_MODEL", "ClipWeightsError",
    "CocoMasks", "MaskError", "SaliencyModel", "TextMasker", "build_mask", "get_saliency_model",
    "get_text_masker", "load_coco", "match_category", "register_saliency_model", "saliency_models",
]


def build_mask(image: Image.Image, *, prompts: Sequence[str] = (), prompt_weights: Sequence[float] | None = None,
               saliency: bool = False, coco_annotations: str | Path | None = None, categories: Sequence[str] = (),
               text_masker: TextMasker | None = None, clip_model: str = DEFAULT_CLIP_MODEL,
               clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED, clip_config: str | Path | None = None,
               clip_download: bool = False, saliency_model: str = DEFAULT_SALIENCY_MODEL,
               saliency_weights: str | None = None, image_name: str | None = None) -> np.ndarray:
    """The ROI mask of ``image`` (float32 HxW in [0, 1]) from the given sources, combined by max.

    - ``prompts`` (+ ``prompt_weights``, one per prompt): CLIP text mask, from
      ``text_masker`` or a cached one built from ``clip_model``/``clip_pretrained``/
      ``clip_config`` (see :mod:`pipeline.masks.text` for the normalisation).
    - ``saliency``: the saliency map of ``saliency_model`` (a learned one from ``saliency_weights``).
    - ``coco_annotations`` (+ ``categories``, prompt-like words; none = every annotated
      object): COCO ground truth of the image named ``image_name``, by default the base
      name of ``image.filename``.

    Raises :class:`MaskError` (one-line message) on bad input: no source, an empty
    prompt, weights that do not match the prompts, an image missing from the COCO file,
    an unknown category, or CLIP weights that cannot be loaded.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    categories = [categories] if isinstance(categories, str) else list(categories)
    if any(not p.strip() for p in prompts):
        raise MaskError("empty text prompt")
    if prompt_weights is not None and len(prompt_weights) != len(prompts):
        raise MaskError(f"got {len(prompt_weights)} prompt weights for {len(prompts)} prompts")
    if categories and coco_annotations is None:
        raise MaskError("COCO categories need an annotation file (--coco ANN.json)")
    if not (prompts or saliency or coco_annotations is not None):
        raise MaskError("no mask source given: use --prompt TEXT, --saliency or --coco ANN.json")
    rgb = to_rgb_array(image)
    parts: list[np.ndarray] = []
    if prompts:
        masker = text_masker or get_text_masker(clip_model, clip_pretrained,
                                                None if clip_config is None else str(clip_config), clip_download)
        parts.append(masker(rgb, prompts, prompt_weights))
    if saliency:
        parts.append(get_saliency_model(saliency_model, saliency_weights)(rgb))
    if coco_annotations is not None:
        coco = load_coco(coco_annotations)
        name = image_name or Path(getattr(image, "filename", "") or "").name
        if not name:
            raise MaskError("COCO masks need the image's file name (it has none; pass image_name)")
        parts.append(coco.mask(coco.image_id(name), categories or None, size=rgb.shape[:2]))
    return combine(parts)
