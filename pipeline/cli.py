"""The ``roicodec`` command: masks, compression, decompression, evaluation.

Exit code 0 on success; on bad input one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from pipeline.argtypes import positive, positive_int, unit_interval
from pipeline.codec.bitstream import DEFAULT_MAX_PIXELS
from pipeline.codec.default_model import DEFAULT, checkpoint_path
from pipeline.codec.models import ENTROPY_FAMILIES, ENTROPY_MODELS, family_options
from pipeline.errors import run_cli
from pipeline.eval.cli import (EVALUATE_DESCRIPTION, EVALUATE_EPILOG, EVALUATE_HELP, add_evaluate_arguments,
                               run_evaluate_command)
from pipeline.masks.cli import add_mask_source_arguments, has_mask_source, mask_from_args, run_mask_command

DEFAULT_Q = 0.3

DESCRIPTION = """\
Region-of-interest learned image compression.

Spend the bits where someone looks: say *what* matters (a mask PNG, text prompts
via CLIP, saliency, or COCO annotations) and *how much* (--roi-quality), and get a
real compressed .roic file back."""

KNOBS = """\
knobs:
  --roi-quality Q   value given to every non-ROI pixel of the mask, in [0,1].
                    1 = uniform quality (the mask is ignored); 0.1 = background
                    barely kept, bits move into the ROI.
  --soft            keep a mask's grades: each pixel's quality is m + (1 - m) Q
                    and each 16x16 latent cell a step from its mean quality
                    (1, 2, 4, 8 or 16), instead of "ROI or background".
  --quality-map P   a grayscale PNG of per-pixel quality (white = best, black =
                    the coarsest step): --soft with the map as the mask and Q = 0
                    (--roi-quality raises its floor).
  --rate R          position on the model's continuous rate scale, in [0,1]
                    (gain units): 0 = smallest file, 1 = best quality.
  --target-bpp B    instead of --rate: search the rate for a file of at most B
                    bits per pixel (real file size); when even rate 0 makes a
                    larger file, say so and write nothing (exit code 1)."""


def _cmd_compress(args: argparse.Namespace) -> int:
    from pipeline.codec.checkpoint import load_checkpoint
    from pipeline.codec.coding import (bits_per_pixel, encode, encode_at_target_bpp, image_to_tensor,
                                       mask_to_tensor, open_image)

    image = open_image(args.image)
    x = image_to_tensor(image)
    size = tuple(x.shape[-2:])
    if args.quality_map is not None and (args.mask is not None or has_mask_source(args)):
        raise ValueError("--quality-map gives every pixel's quality: no --mask, --prompt, --saliency or --coco with it")
    mask_file = args.quality_map if args.quality_map is not None else args.mask
    mask_array = open_image(mask_file) if mask_file is not None else mask_from_args(args, image, Path(args.image))
    mask = None if mask_array is None else mask_to_tensor(mask_array, size)
    graded = args.soft or args.quality_map is not None
    roi_quality = args.roi_quality if args.roi_quality is not None else (0.0 if args.quality_map else DEFAULT_Q)
    model = load_checkpoint(checkpoint_path(args.checkpoint))
    if args.target_bpp is not None:
        data, rate = encode_at_target_bpp(model, x, mask, roi_quality, args.target_bpp, graded=graded)
    else:
        rate = args.rate
        data = encode(model, x, mask, roi_quality, rate, graded)
    Path(args.output).write_bytes(data)
    bpp = bits_per_pixel(data, size[1], size[0])
    print(f"{args.output}: {len(data)} bytes, {bpp:.4f} bpp (variant {model.variant}, rate {rate:.3f}, "
          f"roi-quality {roi_quality:.2f}{', graded' if graded and mask is not None else ''})")
    return 0


def _cmd_decompress(args: argparse.Namespace) -> int:
    from pipeline.codec.checkpoint import load_checkpoint
    from pipeline.codec.coding import decode, tensor_to_image

    data = Path(args.file).read_bytes()
    model = load_checkpoint(checkpoint_path(args.checkpoint))
    image = tensor_to_image(decode(model, data, max_pixels=args.max_pixels, float64=args.float64))
    image.save(args.output)
    print(f"{args.output}: {image.width}x{image.height}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pipeline.codec.checkpoint import convert_checkpoint, fingerprint

    model = convert_checkpoint(args.checkpoint, args.output)
    print(f"{args.output}: {model.variant} checkpoint with integer-exact coding tables "
          f"(fingerprint {fingerprint(model).hex()})")
    return 0


def _cmd_warm_start(args: argparse.Namespace) -> int:
    from pipeline.codec.checkpoint import save_checkpoint
    from pipeline.codec.warm_start import rate_of_point, warm_started
    from pipeline.train.loss import rate_lambdas

    lambdas = rate_lambdas(args.n_rates, args.alpha_low, args.alpha_high)
    options = family_options(args.variant, args.family)
    if args.entropy != "hyperprior":
        options["entropy"] = args.entropy
    model, report = warm_started(args.variant, args.weights, lambdas, args.init_lambda, **options)
    model.eval()
    save_checkpoint(model, args.output, extra={"step": 0, "init": report.as_dict(), "lambda_low": args.alpha_low,
                                               "lambda_high": args.alpha_high})
    print("\n".join(report.lines()))
    if report.rate_point is not None:
        rate = rate_of_point(model, report.rate_point)
        print(f"{args.output}: untrained {model.variant} checkpoint; --rate {rate:g} codes as the weights did "
              f"(fine-tune with jobs/train.py --init {args.weights})")
    return 0


class _OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit code 2), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = _OneLineErrorParser(prog="roicodec", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_OneLineErrorParser)

    p = sub.add_parser("mask", help="compute an ROI mask PNG (white = ROI)",
                       description="Compute an ROI mask from text prompts, saliency or COCO "
                                   "annotations and write it as an 8-bit PNG (white = ROI).")
    p.add_argument("image", help="input image")
    p.add_argument("-o", "--output", required=True, help="output mask PNG")
    add_mask_source_arguments(p)
    p.set_defaults(func=run_mask_command)

    p = sub.add_parser("compress", help="compress an image to a .roic file",
                       description="Compress an image to a .roic file with a trained checkpoint. "
                                   "Without a mask source the whole image is ROI.",
                       epilog=KNOBS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="input image (any format Pillow reads)")
    p.add_argument("--checkpoint", default=DEFAULT, metavar="CKPT",
                   help="model checkpoint (.pt, or a training checkpoint folder: its model.pt); "
                        "default: the pretrained model installed with roicodec")
    p.add_argument("-o", "--output", required=True, help="output .roic file")
    p.add_argument("--mask", help="ROI mask PNG (white = ROI, resized to the image)")
    p.add_argument("--quality-map", metavar="PNG",
                   help="grayscale PNG of per-pixel quality in [0,1] (white = best; resized to the image): "
                        "a graded map, each latent cell's step from its mean quality")
    p.add_argument("--soft", action="store_true",
                   help="keep the mask's grades (saliency, prompts, a gray mask): quality m + (1 - m) Q per pixel, "
                        "a step per latent cell, instead of ROI or background")
    add_mask_source_arguments(p)
    p.add_argument("--roi-quality", type=unit_interval, default=None, metavar="Q",
                   help="value of non-ROI pixels in [0,1]: the encoder's condition, and the background's "
                        f"latents are quantised with a step of 1/Q (at most 16); 1 = uniform quality (default "
                        f"{DEFAULT_Q}; 0 with --quality-map)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=unit_interval, default=0.5, metavar="R",
                      help="continuous rate in [0,1]; 1 = best quality (default 0.5)")
    rate.add_argument("--target-bpp", type=positive, metavar="B",
                      help="search the rate for a file of at most B bits per pixel")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser("decompress", help="decode a .roic file to PNG",
                       description="Decode a .roic file. No mask is needed; the checkpoint must "
                                   "be the one the file was made with.")
    p.add_argument("file", help="input .roic file")
    p.add_argument("--checkpoint", default=DEFAULT, metavar="CKPT",
                   help="the checkpoint the file was made with (default: the installed pretrained model; "
                        "a file made with another model says which one it needs)")
    p.add_argument("-o", "--output", required=True, help="output image (PNG)")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse files that declare more than N pixels (default %(default)s, "
                        "like Pillow's decompression-bomb guard)")
    p.add_argument("--float64", action="store_true",
                   help="run the synthesis in float64: the same 8-bit image on every machine, not "
                        "just the same symbols (float32 may differ by one level at a few pixels); "
                        "about 2.8x slower")
    p.set_defaults(func=_cmd_decompress)

    p = sub.add_parser("convert", help="convert an old checkpoint to the portable format",
                       description="Build the coding tables and the integer-exact hyper-decoder of "
                                   "a checkpoint (e.g. one in the old format-1 layout, whose files "
                                   "were not portable) and save it in the current format. Files "
                                   "made with the old checkpoint must be re-encoded.")
    p.add_argument("checkpoint", help="input checkpoint (.pt)")
    p.add_argument("output", help="output checkpoint (.pt)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("warm-start", help="make a checkpoint from CompressAI's pretrained weights",
                       description="Build a codec variant from CompressAI's pretrained mean-scale hyperprior "
                                   "(or another weights file, see jobs/train.py --init) without training: "
                                   "the pretrained layers copied, ROI layers at the identity, the gain units "
                                   "at the identity for the rate point nearest the weights' lambda. tlic's "
                                   "latent scaling works untrained; the other variants' ROI layers need the "
                                   "fine-tuning of jobs/train.py --init.")
    p.add_argument("weights", help="compressai:mbt2018-mean:Q (from the torch hub cache; nothing is downloaded) "
                                   "or a weights file")
    p.add_argument("output", help="output checkpoint (.pt)")
    p.add_argument("--variant", default="tlic", choices=("tlic", "sft", "tma", "ggm"),
                   help="codec variant (default tlic)")
    p.add_argument("--entropy", choices=ENTROPY_MODELS, default="hyperprior",
                   help="latent structure: hyperprior, or context (its context networks start fresh)")
    p.add_argument("--family", choices=ENTROPY_FAMILIES, help="entropy family (default: the variant's)")
    p.add_argument("--n-rates", type=positive_int, default=4, help="rate points of the gain units (default 4)")
    p.add_argument("--alpha-low", type=positive, default=0.0035, help="lambda of the lowest rate point")
    p.add_argument("--alpha-high", type=positive, default=0.0483, help="lambda of the highest rate point")
    p.add_argument("--init-lambda", type=positive,
                   help="lambda the weights were trained for (default: the zoo quality's; a file: the middle "
                        "rate point)")
    p.set_defaults(func=_cmd_warm_start)

    p = sub.add_parser("evaluate", help=EVALUATE_HELP, description=EVALUATE_DESCRIPTION,
                       epilog=EVALUATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluate_arguments(p, default_model=True)
    p.set_defaults(func=run_evaluate_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``roicodec`` and ``python -m pipeline``."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    # BitstreamError, CheckpointError, MaskError are ValueErrors
    return run_cli(lambda: handler(args), "roicodec", (ValueError, OSError, RuntimeError), interrupt=True)


if __name__ == "__main__":
    sys.exit(main())
