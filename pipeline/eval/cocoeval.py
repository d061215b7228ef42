"""A COCO-format task set (images + annotation file) and its scoring with pycocotools' COCOeval.

:func:`load_task_set` checks that the annotation file and the image folder belong together
(every image the file lists is there, at the size it declares) and fails with one line
when they do not. :func:`coco_scores` runs ``COCOeval`` (bbox or segm) exactly as
pycocotools' own example does: ``loadRes`` on the results, ``evaluate``, ``accumulate``,
``summarize``; the numbers are ``stats[0:6]`` (AP, AP50, AP75, AP small/medium/large,
``nan`` where COCOeval reports -1: no ground truth of that size). No detection at all
gives AP 0 (pycocotools' ``loadRes`` cannot take an empty list; an empty result set is
built instead).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from PIL import Image

from pipeline.eval.evaluate import EvaluationError

IOU_TYPES = ("bbox", "segm")
AP_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


@dataclass
class TaskSet:
    """A checked COCO-format set: the ground truth and (image id, file name, path) of each image."""

    annotations: Path
    images_dir: Path
    coco: Any  # pycocotools.coco.COCO
    images: list[tuple[int, str, Path]]

    @property
    def image_ids(self) -> list[int]:
        return [i for i, _, _ in self.images]


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())  # pycocotools prints progress


def load_task_set(annotations: str | Path, images_dir: str | Path, limit: int | None = None) -> TaskSet:
    """The set of ``annotations`` with its images in ``images_dir`` (the first ``limit`` images).

    One-line :class:`EvaluationError` when the file is missing or not COCO, lists no image,
    or does not match the folder (an image missing, or of another size than declared). An
    unreadable image file is kept: the evaluation records it as an error row.
    """
    from pycocotools.coco import COCO

    ann, root = Path(annotations), Path(images_dir)
    if not ann.is_file():
        raise EvaluationError(f"COCO annotation file not found: {ann}")
    if not root.is_dir():
        raise EvaluationError(f"images folder not found: {root}")
    try:
        with _quiet():
            coco = COCO(str(ann))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise EvaluationError(f"not a COCO annotation file: {ann} ({type(exc).__name__}: {exc})") from None
    infos = coco.dataset.get("images", [])[:limit]
    if not infos or "annotations" not in coco.dataset or "categories" not in coco.dataset:
        raise EvaluationError(f"{ann.name} lists no images, or lacks annotations/categories")
    images, missing = [], []
    for info in infos:
        name = str(PurePosixPath(info["file_name"]))
        path = next((p for p in (root / name, root / PurePosixPath(name).name) if p.is_file()), None)
        if path is None:
            missing.append(name)
            continue
        try:
            with Image.open(path) as im:
                size = im.size
        except OSError:  # a corrupt file is that image's error row, not the set's
            size = None
        if size is not None and size != (int(info["width"]), int(info["height"])):
            raise EvaluationError(f"{ann.name} does not match {root}: {name} is {size[0]}x{size[1]}, the "
                                  f"annotation says {info['width']}x{info['height']}")
        images.append((int(info["id"]), name, path))
    if missing:
        raise EvaluationError(f"{ann.name} does not match {root}: {len(missing)} of {len(infos)} images are not "
                              f"there (first: {missing[0]})")
    return TaskSet(ann, root, coco, images)


def _empty_results(coco_gt):
    from pycocotools.coco import COCO

    dt = COCO()
    dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                  "annotations": []}
    dt.createIndex()
    return dt


def coco_scores(coco_gt, results: str | Path | Sequence[dict[str, Any]], iou_type: str,
                image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCOeval's AP, AP50, AP75, AP_small/medium/large of ``results`` (a list or a results file)."""
    from pycocotools.cocoeval import COCOeval

    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text())
    with _quiet():
        coco_dt = coco_gt.loadRes(copy.deepcopy(list(results))) if results else _empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (float(v) if v >= 0 else float("nan")) for name, v in zip(AP_NAMES, ev.stats[:6])}
