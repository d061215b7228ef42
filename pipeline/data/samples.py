"""The bundled tiny data set: photo-like images with objects, generated deterministically.

No downloads: every image is drawn from a seed. Each image has a smooth, textured
background (low-frequency colour fields plus fine grain, like a photo's) and a few
objects of three COCO categories (``person``, ``car``, ``dog``) drawn as filled
polygons. The polygons are written as a COCO-format annotation file, so the same
set feeds the COCO mask source, text prompts (the category names) and training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES: dict[int, str] = {1: "person", 3: "car", 18: "dog"}  # COCO ids
_CATEGORY_COLOURS = {
    "person": ((225, 180, 150), (60, 70, 150)),  # skin, clothes
    "car": ((200, 30, 30), (40, 40, 40)),
    "dog": ((150, 100, 50), (90, 60, 30)),
}


@dataclass
class SampleObject:
    """One drawn object: its category and its outline polygon (x0, y0, x1, y1, ...)."""

    category: str
    polygon: list[float]

    @property
    def bbox(self) -> list[float]:
        xs, ys = self.polygon[0::2], self.polygon[1::2]
        return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


@dataclass
class SampleSet:
    """Where a written sample set lies."""

    root: Path
    images_dir: Path
    annotations: Path
    prompts: Path
    image_files: list[Path] = field(default_factory=list)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1]: coarse noise upsampled bicubically."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(40, 200, size=3)
    tint = rng.uniform(-60, 60, size=3)
    low = _smooth_field(rng, h, w, 4)[..., None]
    mid = _smooth_field(rng, h, w, 12)[..., None]
    ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = base + tint * low + 35.0 * (mid - 0.5) + 30.0 * (ramp - 0.5)
    img += rng.normal(0.0, 2.5, size=(h, w, 3))  # sensor-like grain
    return img


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> list[float]:
    pts: list[float] = []
    for k in range(n):
        t = 2 * math.pi * k / n
        pts += [cx + rx * math.cos(t), cy + ry * math.sin(t)]
    return pts


def _object_shapes(category: str, cx: float, cy: float, s: float) -> list[tuple[list[float], int]]:
    """Polygons of one object as (polygon, colour index); the first is the outline union."""
    if category == "person":
        head = _ellipse(cx, cy - 0.55 * s, 0.28 * s, 0.34 * s)
        body = [cx - 0.4 * s, cy - 0.2 * s, cx + 0.4 * s, cy - 0.2 * s,
                cx + 0.45 * s, cy + s, cx - 0.45 * s, cy + s]
        return [(head, 0), (body, 1)]
    if category == "car":
        body = [cx - s, cy, cx + s, cy, cx + s, cy + 0.5 * s, cx - s, cy + 0.5 * s]
        cabin = [cx - 0.55 * s, cy - 0.45 * s, cx + 0.45 * s, cy - 0.45 * s,
                 cx + 0.7 * s, cy, cx - 0.8 * s, cy]
        return [(cabin, 1), (body, 0)]
    body = _ellipse(cx, cy, 0.75 * s, 0.38 * s)
    head = _ellipse(cx + 0.75 * s, cy - 0.35 * s, 0.3 * s, 0.26 * s)
    return [(body, 0), (head, 1)]


def _cross(a: np.ndarray, b: np.ndarray) -> float:
    return float(a[0] * b[1] - a[1] * b[0])


def _outline(shapes: list[tuple[list[float], int]]) -> list[float]:
    """The convex hull of all shape points: one polygon for the COCO annotation."""
    pts = np.array([p for poly, _ in shapes for p in zip(poly[0::2], poly[1::2])])
    order = np.lexsort((pts[:, 1], pts[:, 0]))
    pts = pts[order]

    def half(points: np.ndarray) -> list[np.ndarray]:
        hull: list[np.ndarray] = []
        for p in points:
            while len(hull) >= 2 and _cross(hull[-1] - hull[-2], p - hull[-2]) <= 0:
                hull.pop()
            hull.append(p)
        return hull

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    return [float(v) for p in hull for v in p]


def photo_like_image(height: int, width: int, seed: int,
                     n_objects: int | None = None) -> tuple[np.ndarray, list[SampleObject]]:
    """Draw one photo-like RGB image (uint8, HxWx3) with objects; return it and the objects."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(np.clip(_background(rng, height, width), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    objects: list[SampleObject] = []
    names = list(CATEGORIES.values())
    for _ in range(n):
        category = names[int(rng.integers(len(names)))]
        s = float(rng.uniform(0.1, 0.2) * min(height, width))
        cx = float(rng.uniform(1.2 * s, width - 1.2 * s))
        cy = float(rng.uniform(1.0 * s, height - 1.1 * s))
        shapes = _object_shapes(category, cx, cy, s)
        jitter = rng.integers(-25, 25, size=3)
        for poly, colour_index in shapes:
            colour = np.clip(np.array(_CATEGORY_COLOURS[category][colour_index]) + jitter, 0, 255)
            draw.polygon(poly, fill=tuple(int(c) for c in colour))
        objects.append(SampleObject(category, _outline(shapes)))
    img = img.filter(ImageFilter.GaussianBlur(0.6))  # soften edges like optics do
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 1.0, size=(height, width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8), objects


def objects_mask(objects: list[SampleObject], height: int, width: int,
                 categories: set[str] | None = None) -> np.ndarray:
    """Binary ROI mask (float32 HxW, 1 inside the objects of the given categories)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        if categories is None or obj.category in categories:
            draw.polygon(obj.polygon, fill=255)
    return (np.asarray(canvas) > 127).astype(np.float32)


def write_sample_set(out_dir: str | Path, n_images: int = 12, size: tuple[int, int] = (256, 256),
                     seed: int = 0) -> SampleSet:
    """Write ``n_images`` PNGs, a COCO annotation file and a prompts file under ``out_dir``.

    Deterministic: the same arguments give byte-identical files, so re-running is safe.
    """
    root = Path(out_dir)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    height, width = size
    coco: dict = {
        "info": {"description": "roicodec bundled sample set", "version": "1"},
        "images": [], "annotations": [],
        "categories": [{"id": cid, "name": name, "supercategory": name}
                       for cid, name in CATEGORIES.items()],
    }
    ids = {name: cid for cid, name in CATEGORIES.items()}
    files: list[Path] = []
    ann_id = 1
    for i in range(n_images):
        arr, objects = photo_like_image(height, width, seed * 100_003 + i)
        path = images_dir / f"sample_{i:04d}.png"
        Image.fromarray(arr).save(path)
        files.append(path)
        coco["images"].append({"id": i + 1, "file_name": path.name, "height": height, "width": width})
        for obj in objects:
            poly = obj.polygon
            area = 0.5 * abs(sum(poly[2 * k] * poly[(2 * k + 3) % len(poly)]
                                 - poly[(2 * k + 2) % len(poly)] * poly[2 * k + 1]
                                 for k in range(len(poly) // 2)))
            coco["annotations"].append({
                "id": ann_id, "image_id": i + 1, "category_id": ids[obj.category],
                "segmentation": [poly], "area": area, "bbox": obj.bbox, "iscrowd": 0,
            })
            ann_id += 1
    annotations = root / "annotations.json"
    annotations.write_text(json.dumps(coco, indent=1))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(["a person", "a car", "a dog"]) + "\n")
    return SampleSet(root, images_dir, annotations, prompts, files)
