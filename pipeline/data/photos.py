"""Real photographs every machine can have: scikit-image's bundled sample images.

No download: the images ship inside scikit-image's wheel.
The split into training and held-out photos is fixed here, chosen before any model was
trained on them, by content: one held-out photo of each kind the training set also has
(a portrait, an animal, an object on a table, an outdoor scene with a man-made object,
a grayscale portrait, grayscale objects, a grayscale texture); the stereo pair's two
views stay together on the training side. Grayscale photos are repeated into three
channels; every photo is downscaled (Lanczos) to at most ``max_side`` pixels.

:data:`OBJECTS` holds hand-made boxes of the obvious objects (a face, a cat, a cup, a
rocket, a motorcycle, the optic disc, ...), marked on each photo at 512 px on its longer
side; :func:`write_photo_set` writes them as COCO-format annotations. Photos without
objects (textures, micrographs, the deep field) get their ROI from saliency.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.samples import SampleSet

HELD_OUT = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "gravel")
TRAIN = ("hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left", "motorcycle_right",
         "brick", "cell", "clock", "grass", "moon", "page", "text")
REFERENCE_SIDE = 512  # the boxes below are in pixels of the photo at this longer side
_COINS = [(22, 30, 45, 45), (80, 37, 40, 40), (130, 27, 48, 48), (190, 27, 48, 48), (255, 33, 45, 45),
          (305, 15, 58, 80), (25, 102, 45, 45), (82, 105, 43, 43), (132, 108, 42, 42), (185, 102, 45, 45),
          (245, 95, 52, 52), (315, 103, 40, 40), (25, 175, 40, 40), (80, 173, 45, 45), (133, 177, 42, 42),
          (188, 165, 50, 50), (250, 170, 45, 45), (315, 158, 60, 65), (18, 232, 55, 55), (92, 245, 42, 42),
          (145, 235, 52, 52), (220, 238, 45, 45), (275, 238, 45, 45), (333, 245, 48, 45)]
OBJECTS: dict[str, list[tuple[str, tuple[int, int, int, int]]]] = {
    "astronaut": [("face", (170, 40, 120, 130))],
    "chelsea": [("cat", (110, 60, 250, 210))],
    "coffee": [("cup", (148, 15, 204, 235))],
    "rocket": [("rocket", (242, 100, 32, 230))],
    "camera": [("face", (155, 62, 115, 135)), ("camera", (258, 138, 72, 52))],
    "coins": [("coin", box) for box in _COINS],
    "retina": [("optic disc", (38, 185, 80, 85))],
    "motorcycle_left": [("motorcycle", (62, 55, 410, 255))],
    "motorcycle_right": [("motorcycle", (35, 60, 402, 250))],
    "clock": [("clock", (140, 95, 150, 120))],
}


def _load(name: str) -> np.ndarray:
    import skimage.data as data

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(data, name)()


def photo(name: str, max_side: int = 512) -> np.ndarray:
    """One sample photo as an HxWx3 uint8 RGB array, the longer side at most ``max_side``."""
    return _fit(_load(name), max_side)


def _fit(arr: np.ndarray, max_side: int) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    img = Image.fromarray(np.ascontiguousarray(arr[:, :, :3]).astype(np.uint8))
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    return np.asarray(img)


def photos(split: str, max_side: int = 512) -> dict[str, np.ndarray]:
    """``{name: photo}`` of the ``"train"`` or ``"held_out"`` split."""
    names = {"train": TRAIN, "held_out": HELD_OUT}.get(split)
    if names is None:
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    return {name: photo(name, max_side) for name in names}


def write_photo_set(out_dir: str | Path, names: tuple[str, ...] | list[str], max_side: int = 512,
                    annotate: bool = True) -> SampleSet:
    """Write ``names`` as PNGs under ``out_dir/images`` and (``annotate``) their :data:`OBJECTS`
    as COCO-format ``out_dir/annotations.json`` (each box also as its polygon; photos without
    objects are listed with no annotation) with their categories in ``prompts.txt``.
    Deterministic: re-running rewrites the same bytes."""
    root = Path(out_dir)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    categories = sorted({cat for name in names for cat, _ in OBJECTS.get(name, [])})
    cat_ids = {cat: i + 1 for i, cat in enumerate(categories)}
    coco: dict = {"info": {"description": "scikit-image sample photos, hand-marked boxes", "version": "1"},
                  "images": [], "annotations": [],
                  "categories": [{"id": i, "name": cat, "supercategory": cat} for cat, i in cat_ids.items()]}
    files = []
    for image_id, name in enumerate(names, start=1):
        raw = _load(name)
        arr = _fit(raw, max_side)
        path = images_dir / f"{name}.png"
        Image.fromarray(arr).save(path)
        files.append(path)
        h, w = arr.shape[:2]
        coco["images"].append({"id": image_id, "file_name": path.name, "height": h, "width": w})
        scale = max(h, w) / min(REFERENCE_SIDE, max(raw.shape[:2]))
        for cat, box in OBJECTS.get(name, []):
            x, y, bw, bh = (round(v * scale, 1) for v in box)
            x1, y1 = min(x + bw, w), min(y + bh, h)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": cat_ids[cat],
                "bbox": [x, y, x1 - x, y1 - y], "area": (x1 - x) * (y1 - y), "iscrowd": 0,
                "segmentation": [[x, y, x1, y, x1, y1, x, y1]]})
    annotations, prompts = root / "annotations.json", root / "prompts.txt"
    if annotate:
        annotations.write_text(json.dumps(coco, indent=1))
        prompts.write_text("".join(f"{cat}\n" for cat in categories))
    return SampleSet(root, images_dir, annotations, prompts, files)
