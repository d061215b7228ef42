"""Detectors for task metrics: a small interface and torchvision's COCO detection models.

A **detector** is any callable from a batch of images to COCO-format results, one list
per image::

    detector(images, image_ids) -> [[{"image_id", "category_id", "bbox": [x, y, w, h], "score",
                                      "segmentation": {"size": [h, w], "counts": str}  # optional
                                     }, ...],  # the results of images[0]
                                    ...]

``images`` are uint8 HxWx3 RGB arrays, ``image_ids`` their COCO ids (an id may repeat in
a batch: the same image decoded by several codecs). A result with a
``segmentation`` (an RLE of the instance mask, pycocotools' encoding) also counts for
instance segmentation. The evaluation builds its detectors on its workers from a
**factory** (a picklable zero-argument callable, e.g. :class:`TorchvisionDetectorSpec`),
so each Ray actor loads the model once.

:class:`TorchvisionDetectorSpec` builds one of torchvision's R-CNN models (Faster R-CNN,
Mask R-CNN) with COCO's 91 label indices, which are the COCO category ids. Weights:

- a file path: a state dict (or ``{"model": state_dict}``) saved from the same architecture
  (:func:`pipeline.weights.read_state_dict`);
- a torchvision weight name (``DEFAULT``, ``COCO_V1``, ...): read from the local torch
  cache (``$TORCH_HOME/hub/checkpoints/``), never downloaded; missing there is one
  :class:`DetectorError` naming the file and how to get it;
- ``random``: random initialisation, only to run the path (tests, smoke runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence
from urllib.parse import urlparse

import numpy as np
import torch

from pipeline.weights import read_state_dict

DETECTOR_ARCHS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
                  "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
DEFAULT_DETECTOR = "fasterrcnn_resnet50_fpn"
DEFAULT_WEIGHTS = "DEFAULT"
RANDOM = "random"
COCO_NUM_CLASSES = 91  # torchvision's COCO label space: label index == COCO category id


class DetectorError(ValueError):
    """A detector that cannot be built: unknown architecture, missing or unfitting weights."""


class Detector(Protocol):
    """Images (uint8 HxWx3) and their COCO ids in, one list of COCO-format results per image out."""

    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[list[dict[str, Any]]]: ...


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Binary masks (N,H,W) as COCO RLEs with ``counts`` as str (JSON-ready)."""
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def torch_cache_file(url: str) -> Path:
    """Where torch's hub keeps the file of ``url`` (``$TORCH_HOME/hub/checkpoints/<name>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith((".pth", ".pt", ".bin")) or Path(weights).exists()


def _weights_enum(arch: str):
    from torchvision.models import get_model_weights

    return get_model_weights(arch)


def _freeze_batchnorm(module: torch.nn.Module) -> None:
    """Replace BatchNorm2d by FrozenBatchNorm2d, as torchvision builds its pretrained detectors."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


@dataclass(frozen=True)
class TorchvisionDetectorSpec:
    """How to build a torchvision detector; calling it builds one (a :class:`Detector`).

    ``min_size``/``max_size``: the model's input resizing (torchvision's 800/1333);
    ``score_threshold``: boxes below it are dropped (torchvision's 0.05);
    ``device``: ``auto`` = CUDA when available.
    """

    arch: str = DEFAULT_DETECTOR
    weights: str = DEFAULT_WEIGHTS
    min_size: int = 800
    max_size: int = 1333
    score_threshold: float = 0.05
    device: str = "auto"

    def check(self) -> None:
        """Fail fast (one-line :class:`DetectorError`) on an unknown arch or missing weights."""
        if self.arch not in DETECTOR_ARCHS:
            raise DetectorError(f"unknown detector {self.arch!r} (choose from {', '.join(DETECTOR_ARCHS)})")
        self.weights_file()

    def weights_file(self) -> Path | None:
        """The local file the weights come from (None for random weights)."""
        if self.weights == RANDOM:
            return None
        if _looks_like_path(self.weights):
            path = Path(self.weights)
            if not path.is_file():
                raise DetectorError(f"detector weights file not found: {path} (--detector-weights)")
            return path
        enum = _weights_enum(self.arch)
        try:
            w = enum[self.weights]
        except KeyError:
            names = ", ".join(["DEFAULT", *(m.name for m in enum)])
            raise DetectorError(f"{self.arch} has no torchvision weights {self.weights!r} (have: {names}; or a "
                                f"file path, or 'random')") from None
        path = torch_cache_file(w.url)
        if not path.is_file():
            raise DetectorError(
                f"torchvision weights {enum.__name__}.{w.name} are not in the local torch cache ({path}); "
                f"downloads are off: fetch {w.url} on a machine with internet access and put it there "
                f"(or set TORCH_HOME), or pass --detector-weights FILE")
        return path

    def build_model(self) -> torch.nn.Module:
        """The eval-mode model with its weights loaded."""
        from torchvision.models import get_model

        self.check()
        path = self.weights_file()
        model = get_model(self.arch, weights=None, weights_backbone=None, num_classes=COCO_NUM_CLASSES,
                          min_size=self.min_size, max_size=self.max_size, box_score_thresh=self.score_threshold)
        if path is not None:
            state = read_state_dict(path, DetectorError, "detector weights")
            if not any(k.endswith("num_batches_tracked") for k in state):
                _freeze_batchnorm(model)  # weights saved from torchvision's frozen-BN models
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise DetectorError(f"detector weights {path} do not fit {self.arch}: "
                                    f"{str(exc).splitlines()[0]}") from None
        return model.eval()

    def __call__(self) -> "TorchvisionDetector":
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        return TorchvisionDetector(self.build_model().to(device), device)


class TorchvisionDetector:
    """A torchvision detection model as a :class:`Detector` (boxes, and masks for Mask R-CNN)."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu") -> None:
        self.model, self.device = model.eval(), device

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], image_ids: Sequence[int]) -> list[list[dict[str, Any]]]:
        tensors = [torch.from_numpy(np.array(im, np.float32)).permute(2, 0, 1).div(255.0).to(self.device)
                   for im in images]
        results = []
        for image_id, out in zip(image_ids, self.model(tensors) if tensors else []):
            boxes = out["boxes"].cpu().numpy().astype(np.float64)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1) if len(boxes) else boxes
            labels, scores = out["labels"].cpu().numpy(), out["scores"].cpu().numpy()
            rles = encode_masks((out["masks"][:, 0] >= 0.5).cpu().numpy()) if "masks" in out else None
            found = []
            for k in range(len(boxes)):
                r = {"image_id": int(image_id), "category_id": int(labels[k]),
                     "bbox": [round(float(v), 2) for v in xywh[k]], "score": round(float(scores[k]), 5)}
                if rles is not None:
                    r["segmentation"] = rles[k]
                found.append(r)
            results.append(found)
        return results
