"""Command-line helpers for mask sources: shared arguments and the ``roicodec mask`` command.

``pipeline.cli`` adds :func:`add_mask_source_arguments` to every subcommand that takes
mask sources, calls :func:`mask_from_args` to get a mask (or None when no source was
given) and routes ``roicodec mask`` to :func:`run_mask_command`. Errors are raised as
:class:`~pipeline.masks.ops.MaskError`; the caller prints the one-line message and exits 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.masks import build_mask
from pipeline.masks.ops import MaskError, to_png
from pipeline.masks.saliency import DEFAULT_SALIENCY_MODEL, saliency_models
from pipeline.masks.text import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED


def add_mask_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--prompt``, ``--prompt-weight``, ``--saliency``, ``--coco``, ``--category`` and CLIP options."""
    group = parser.add_argument_group("mask sources (several are combined by pixelwise max)")
    group.add_argument("--prompt", dest="prompts", metavar="TEXT", nargs="+", action="extend", default=[],
                       help="text prompt(s) for a CLIP text mask, e.g. --prompt faces 'a car'; repeatable "
                            "(put IMAGE before this option)")
    group.add_argument("--prompt-weight", dest="prompt_weights", metavar="W", nargs="+", action="extend",
                       type=float, default=None,
                       help="importance of each prompt, one per --prompt (e.g. 1 0.5: faces over hands); "
                            "the mask is the max of weight x prompt mask, weights scaled so the largest is 1")
    group.add_argument("--saliency", action="store_true",
                       help="add a saliency map (of --saliency-model; the default needs no weights)")
    group.add_argument("--saliency-model", default=DEFAULT_SALIENCY_MODEL, choices=saliency_models(),
                       help="saliency algorithm (default: %(default)s); u2net / u2netp are learned salient-object "
                            "detectors that need --saliency-weights")
    group.add_argument("--saliency-weights", metavar="FILE", default=None,
                       help="weights of a learned --saliency-model (the U-2-Net authors' u2net.pth / u2netp.pth); "
                            "never downloaded")
    group.add_argument("--coco", metavar="ANN.json", default=None,
                       help="COCO annotation file: ground-truth mask of this image (found by file name)")
    group.add_argument("--category", dest="categories", metavar="NAME", nargs="+", action="extend", default=[],
                       help="COCO categories for --coco; synonyms work ('people', 'cars', 'puppy'); "
                            "default: every annotated object")
    group.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                       help="open_clip ViT architecture, hf-hub:ORG/REPO or local-dir:PATH (default: %(default)s)")
    group.add_argument("--clip-pretrained", default=DEFAULT_CLIP_PRETRAINED,
                       help="open_clip pretrained tag (weights must be cached locally unless --clip-download), "
                            "a checkpoint file, or 'none' for random weights (default: %(default)s)")
    group.add_argument("--clip-config", metavar="JSON", default=None,
                       help="open_clip model config JSON defining the architecture (random weights unless "
                            "--clip-pretrained is a checkpoint file); for tests and demos without weights")
    group.add_argument("--clip-download", action="store_true",
                       help="allow downloading missing CLIP weights (off: fail at once when not cached)")


def has_mask_source(args: argparse.Namespace) -> bool:
    """Whether the parsed arguments name a mask source."""
    return bool(args.prompts or args.saliency or args.coco or args.categories or args.prompt_weights)


def mask_from_args(args: argparse.Namespace, image: Image.Image, image_path: str | Path | None = None
                   ) -> np.ndarray | None:
    """The mask the parsed mask-source arguments ask for, or None when none was given."""
    if not has_mask_source(args):
        return None
    return build_mask(
        image, prompts=args.prompts, prompt_weights=args.prompt_weights, saliency=args.saliency,
        coco_annotations=args.coco, categories=args.categories, clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained, clip_config=args.clip_config, clip_download=args.clip_download,
        saliency_model=args.saliency_model, saliency_weights=args.saliency_weights,
        image_name=Path(image_path).name if image_path else None,
    )


def run_mask_command(args: argparse.Namespace) -> int:
    """``roicodec mask IMAGE (sources...) -o MASK.png``: write the mask as an 8-bit PNG, white = ROI."""
    path = Path(args.image)
    try:
        with Image.open(path) as image:
            image.load()
            mask = mask_from_args(args, image, path)
    except (OSError, Image.DecompressionBombError) as exc:
        raise MaskError(f"cannot read image {path}: {exc}") from exc
    if mask is None:
        raise MaskError("no mask source given: use --prompt TEXT, --saliency or --coco ANN.json [--category NAME]")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(to_png(mask))
    return 0
