"""The default model against the classic codecs on held-out photos: issue 30's targets.

Held-out photos (``--images``; the default model's split, ``photo_set/heldout`` of
``python -m pipeline.data.wallpapers``, fixed before its first training run) are scaled so their
longest side is at most ``--max-side`` (512 px: CPU time), their ROI the weight-free saliency map
(``mbd``) binarised at 0.5. One sweep through real ``.roic`` files
(:func:`pipeline.eval.rd.rd_sweep`) codes them at roi-quality 1 (uniform quality) and
``--roi-quality`` (0.1) over ``--rates``, and JPEG, WebP and JPEG 2000 over their settings:

- uniform quality: BD-rate on PSNR against JPEG (target: at most -10%), WebP and JPEG 2000;
- roi-quality 0.1: BD-rate on ROI PSNR against WebP (target: at most 0%), JPEG and JPEG 2000;
- decode time (``.roic`` file to image, rate 0.5, uniform quality) against CompressAI's
  mean-scale hyperprior (``MeanScaleHyperprior``) of the same N and M (its weights do not change
  its time), on the same photos in the same run, median of ``--repeats``: at most 1.3x for a
  hyperprior model, 2x for a context model.

Usage: ``python benchmarks/default_model.py [--checkpoint CKPT] [--images DIR] [--out DIR]``;
progress on stderr, JSON on stdout and in ``OUT/default_model.json``, the RD plots in ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.codec.checkpoint import load_checkpoint  # noqa: E402
from pipeline.codec.coding import decode, encode, image_to_tensor  # noqa: E402
from pipeline.codec.default_model import checkpoint_path  # noqa: E402
from pipeline.eval.evaluate import jsonable, list_images, to_json  # noqa: E402
from pipeline.eval.heldout import scaled_photos_with_saliency  # noqa: E402
from pipeline.eval.rd import LEARNED, UNIFORM, rd_sweep, write_rd_outputs  # noqa: E402

TARGET_UNIFORM_VS_JPEG = -10.0   # BD-rate on PSNR, %
TARGET_ROI_VS_WEBP = 0.0         # BD-rate on ROI PSNR at roi-quality 0.1, %
TARGET_DECODE_RATIO = {"hyperprior": 1.3, "context": 2.0}
ANCHORS = ("jpeg", "webp", "jpeg2000")


def _median_seconds(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def decode_times(checkpoint: Path, images: list[Path], repeats: int) -> dict[str, Any]:
    """Seconds to decode each photo's ``.roic`` file (rate 0.5, uniform quality) and a
    CompressAI ``MeanScaleHyperprior`` of the same N/M's strings of the same photo (padded to a
    multiple of 64, as CompressAI's examples do), summed over the photos."""
    from compressai.models import MeanScaleHyperprior

    model = load_checkpoint(checkpoint).eval()
    torch.manual_seed(0)
    reference = MeanScaleHyperprior(model.N, model.M).eval()
    reference.update(force=True)
    ours = theirs = 0.0
    for path in images:
        with Image.open(path) as im:
            x = image_to_tensor(im.convert("RGB"))
        data = encode(model, x, rate=0.5)
        ours += _median_seconds(lambda: decode(model, data), repeats)
        h, w = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (0, -w % 64, 0, -h % 64), mode="replicate")
        coded = reference.compress(padded)
        theirs += _median_seconds(lambda: reference.decompress(coded["strings"], coded["shape"]), repeats)
    return {"roicodec_s": ours, "mean_scale_hyperprior_s": theirs, "ratio": ours / theirs,
            "N": model.N, "M": model.M, "entropy": model.config.get("entropy", "hyperprior"),
            "threads": torch.get_num_threads(), "repeats": repeats}


def targets(sweep: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """Every BD number the issue names, and whether each target is met."""
    uniform = sweep["bd_by_curve"].get(UNIFORM, {})
    roi = sweep["bd_by_curve"].get(LEARNED, {})
    out: dict[str, Any] = {}
    for anchor in ANCHORS:
        out[f"uniform_bd_rate_psnr_vs_{anchor}"] = uniform.get(anchor, {}).get("bd_rate_psnr", math.nan)
        out[f"roi_bd_rate_roi_psnr_vs_{anchor}"] = roi.get(anchor, {}).get("bd_rate_roi", math.nan)
    limit = TARGET_DECODE_RATIO.get(timing["entropy"], TARGET_DECODE_RATIO["hyperprior"])
    u, r = out["uniform_bd_rate_psnr_vs_jpeg"], out["roi_bd_rate_roi_psnr_vs_webp"]
    out["met"] = {"uniform_vs_jpeg": bool(math.isfinite(u) and u <= TARGET_UNIFORM_VS_JPEG),
                  "roi_vs_webp": bool(math.isfinite(r) and r <= TARGET_ROI_VS_WEBP),
                  "decode_time": bool(timing["ratio"] <= limit)}
    out["decode_ratio_limit"] = limit
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="the model (.pt or a training checkpoint folder); default: the installed default model")
    p.add_argument("--images", type=Path, default=Path("photo_set/heldout"), help="held-out photos")
    p.add_argument("--max-side", type=int, default=512, help="longest side of the scaled photos (px)")
    p.add_argument("--roi-quality", type=float, default=0.1)
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--repeats", type=int, default=3, help="decodes timed per photo (median)")
    p.add_argument("--out", type=Path, default=Path("benchmark_out/default_model"))
    args = p.parse_args(argv)
    try:
        checkpoint = checkpoint_path(args.checkpoint)
        if not args.images.is_dir():
            raise ValueError(f"held-out photos not found: {args.images} (python -m pipeline.data.wallpapers)")
    except ValueError as exc:
        p.exit(2, f"default_model: error: {exc}\n")
    t0 = time.perf_counter()
    img_dir, mask_dir = scaled_photos_with_saliency(args.images, args.out, args.max_side)
    print(f"[sweep] {checkpoint}", file=sys.stderr)
    sweep = rd_sweep(checkpoint, img_dir, mask_dir, roi_quality=args.roi_quality, rates=args.rates,
                     roi_qualities=[args.roi_quality, 1.0], baselines=ANCHORS, progress=True)
    outputs = write_rd_outputs(sweep, args.out, args.out / "rd.json")
    print("[decode time]", file=sys.stderr)
    timing = decode_times(checkpoint, list_images(img_dir), args.repeats)
    result = {"checkpoint": str(checkpoint), "images": str(args.images), "n_images": sweep["n_images"],
              "max_side": args.max_side, "roi": "saliency mbd > 0.5", "roi_quality": args.roi_quality,
              "rates": args.rates, **targets(sweep, timing), "decode": timing,
              "targets": {"uniform_bd_rate_psnr_vs_jpeg": TARGET_UNIFORM_VS_JPEG,
                          "roi_bd_rate_roi_psnr_vs_webp": TARGET_ROI_VS_WEBP},
              "curves": {name: c["points"] for name, c in sweep["curves"].items()},
              "plots": outputs["plots"], "errors": sweep["errors"],
              "seconds": round(time.perf_counter() - t0, 1)}
    to_json(result, args.out / "default_model.json")
    print(json.dumps(jsonable(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
