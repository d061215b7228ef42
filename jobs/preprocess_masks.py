"""Precompute ROI masks and saliency maps into Parquet shards with Ray Data.

Runs on a local Ray it starts itself, or on a cluster under ``ray job submit``
(RAY_ADDRESS set). Prints progress while it runs and a JSON summary at the end.

Examples::

    python jobs/preprocess_masks.py --input data/images --output data/masks --prompts "a person" "a car"
    python jobs/preprocess_masks.py --input data/coco_root --output data/masks        # COCO ground truth
    ray job submit --working-dir . -- python jobs/preprocess_masks.py --input /shared/images \\
        --output /shared/masks --prompts-file prompts.txt --text-actors 4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from pipeline.data.preprocess import ROI_SOURCES, PreprocessError, preprocess  # noqa: E402
from pipeline.errors import run_cli  # noqa: E402
from pipeline.masks.ops import MaskError  # noqa: E402
from pipeline.masks.saliency import DEFAULT_SALIENCY_MODEL, saliency_models  # noqa: E402
from pipeline.masks.text import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The job's command line."""
    p = argparse.ArgumentParser(
        prog="preprocess_masks.py", description=__doc__,
        epilog="Re-running over the same --output adds only missing (image, prompt) rows; an interrupted run "
               "resumes where it stopped. Undecodable files become rows with 'error' set.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="image folder (every non-hidden file is an input), or a COCO root holding "
                        "annotations.json and images/")
    p.add_argument("--output", required=True, help="directory of Parquet shards (created; appended to)")
    p.add_argument("--prompts", nargs="+", default=[], metavar="TEXT",
                   help="text prompts, one row per image and prompt")
    p.add_argument("--prompts-file", default=None, help="file with one prompt per line (# comments allowed)")
    p.add_argument("--coco-annotations", default=None, metavar="ANN.json",
                   help="COCO annotation file for the images in --input (prompts default to each image's "
                        "annotated categories)")
    p.add_argument("--roi-source", choices=ROI_SOURCES, default=None,
                   help="what makes roi_mask (default: coco with annotations, else clip with prompts, else saliency)")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="rows per Parquet shard (default: %(default)s)")
    p.add_argument("--text-actors", type=int, default=1, help="CLIP actors (one model load each; one GPU each "
                                                              "when the cluster has GPUs; default: %(default)s)")
    p.add_argument("--text-actor-cpus", type=float, default=None,
                   help="CPUs (and torch threads) per CLIP actor (default: 1 with GPUs, else cores / actors)")
    p.add_argument("--gpu", dest="use_gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="use GPUs for CLIP (default: when the cluster has any)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch in every stage (default: %(default)s)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                   help="open_clip ViT name, hf-hub:ORG/REPO or local-dir:PATH (default: %(default)s)")
    p.add_argument("--clip-pretrained", default=DEFAULT_CLIP_PRETRAINED,
                   help="pretrained tag (must be cached unless --clip-download), checkpoint file, or 'none' "
                        "(default: %(default)s)")
    p.add_argument("--clip-config", default=None, metavar="JSON",
                   help="open_clip model config JSON (random weights unless --clip-pretrained is a file); "
                        "for tests and demos without weights")
    p.add_argument("--clip-download", action="store_true", help="allow downloading missing CLIP weights")
    p.add_argument("--clip-input-size", type=int, default=None, help="CLIP input side in pixels (default: the model's)")
    p.add_argument("--combine-prompts", action="store_true",
                   help="one row per image whose mask is the union of its prompts' masks (default: one row per "
                        "prompt)")
    p.add_argument("--no-saliency", dest="saliency", action="store_false", help="do not compute saliency maps")
    p.add_argument("--saliency-model", default=DEFAULT_SALIENCY_MODEL, choices=saliency_models(),
                   help="saliency algorithm (default: %(default)s); u2net / u2netp (learned) need --saliency-weights")
    p.add_argument("--saliency-weights", metavar="FILE", default=None,
                   help="weights of a learned --saliency-model (the U-2-Net authors' u2net.pth / u2netp.pth)")
    p.add_argument("--saliency-actors", type=int, default=1,
                   help="actors running a learned saliency model, one GPU each with --gpu (default: %(default)s)")
    p.add_argument("--max-side", type=int, default=1024,
                   help="longer side images are shrunk to for the computation; masks keep the original size "
                        "(default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N images (folder: sorted by path; COCO: file order)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the job; print the JSON summary; 1 with a one-line error on bad input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    def run() -> None:
        summary = preprocess(
            args.input, args.output, prompts=args.prompts, prompts_file=args.prompts_file,
            coco_annotations=args.coco_annotations, roi_source=args.roi_source, saliency=args.saliency,
            saliency_model=args.saliency_model, saliency_weights=args.saliency_weights,
            saliency_actors=args.saliency_actors, rows_per_shard=args.rows_per_shard,
            num_text_actors=args.text_actors, text_actor_cpus=args.text_actor_cpus, use_gpu=args.use_gpu,
            batch_size=args.batch_size, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
            clip_config=args.clip_config, clip_download=args.clip_download,
            clip_input_size=args.clip_input_size, max_side=args.max_side, limit=args.limit,
            combine_prompts=args.combine_prompts)
        print(json.dumps(summary))

    return run_cli(run, "preprocess_masks", (PreprocessError, MaskError))


if __name__ == "__main__":
    sys.exit(main())
