"""A detector that sees exactly what survived coding, for the task-metric tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image


class SurvivingObjectsDetector:
    """Returns each ground-truth object (box, mask, score 1) whose pixels survived decoding.

    An object is found when the mean absolute difference between the decoded image and
    the original over its mask is at most ``tolerance`` levels (of 255). On the originals
    it returns the ground truth (AP 1.0); the more a codec damages the objects, the fewer
    it finds.
    """

    def __init__(self, annotations: str | Path, images_dir: str | Path, tolerance: float = 4.0) -> None:
        from pycocotools.coco import COCO

        self.coco = COCO(str(annotations))
        self.images_dir, self.tolerance = Path(images_dir), tolerance
        self.originals: dict[int, np.ndarray] = {}

    def _original(self, image_id: int) -> np.ndarray:
        if image_id not in self.originals:
            name = self.coco.imgs[image_id]["file_name"]
            self.originals[image_id] = np.asarray(Image.open(self.images_dir / name).convert("RGB"), np.float32)
        return self.originals[image_id]

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[list[dict[str, Any]]]:
        from pipeline.eval.detectors import encode_masks

        out = []
        for image, image_id in zip(images, image_ids):
            diff = np.abs(image.astype(np.float32) - self._original(image_id)).mean(axis=2)
            found = []
            for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id])):
                m = self.coco.annToMask(ann).astype(bool)
                if m.any() and diff[m].mean() <= self.tolerance:
                    found.append({"image_id": image_id, "category_id": ann["category_id"], "bbox": ann["bbox"],
                                  "score": 1.0, "segmentation": encode_masks(m[None])[0]})
            out.append(found)
        return out


class SurvivingObjectsFactory:
    """Picklable factory of :class:`SurvivingObjectsDetector` (one per Ray actor)."""

    def __init__(self, annotations: str | Path, images_dir: str | Path, tolerance: float = 4.0) -> None:
        self.args = (str(annotations), str(images_dir), tolerance)

    def __call__(self) -> SurvivingObjectsDetector:
        return SurvivingObjectsDetector(*self.args)
