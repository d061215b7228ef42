"""The perceptual stage against the MSE model it started from, on held-out photos.

Two checkpoints of one model: the MSE model (``--mse``) and the same model after
``--stage perceptual`` (``--perceptual``). Held-out photos (default: the default model's
held-out split, ``/work/photo_set/heldout``, chosen before any training) are scaled so their
longest side is at most ``--max-side`` (512 px, fixed before the first run: CPU time), their
ROI is the weight-free saliency map (``mbd``) binarised at 0.5. Both models are swept through
real ``.roic`` files at ``--roi-quality`` (0.1) over ``--rates`` (:func:`pipeline.eval.rd.rd_sweep`,
JPEG as the reference curve), then compared at the same bpp (fitted curves, averaged over the
bpp range both cover, as Bjøntegaard does; ``same_bpp_range`` says which):

- BD-PSNR on ROI PSNR, perceptual against MSE (target: at least -1 dB);
- the background's texture ratio (1 = as detailed as the original) of each, and its move toward 1;
- HaarPSI, GMSD and non-ROI PSNR of each.

Pictures: one per photo, original | MSE model | perceptual model (its rate bisected to the MSE
file's size) | JPEG at the same file size (``OUT/pictures/``).

Usage: ``python benchmarks/perceptual_stage.py --mse M.pt --perceptual P.pt [--out DIR]``;
progress on stderr, JSON on stdout and in ``OUT/perceptual_stage.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.eval.evaluate import jsonable, list_images, to_json
from pipeline.eval.heldout import scaled_photos_with_saliency
from pipeline.eval.pictures import comparison_pictures
from pipeline.eval.rd import _avg_over_overlap, bd_psnr, bd_rate, rd_sweep

TARGET_BD_PSNR_ROI = -1.0
COMPARED = ("roi_psnr", "psnr", "nonroi_psnr", "texture_nonroi", "texture_roi", "haarpsi", "gmsd")


def at_same_bpp(anchor: list[dict[str, Any]], test: list[dict[str, Any]], metric: str) -> tuple[float, float]:
    """Mean of ``metric`` (fitted against log bpp) over the bpp range both curves cover: (anchor, test)."""
    def clean(points):
        pts = [(math.log(p["bpp"]), p[metric]) for p in points if p["bpp"] > 0 and math.isfinite(p[metric])]
        return np.array([a for a, _ in pts]), np.array([b for _, b in pts])
    (xa, ya), (xt, yt) = clean(anchor), clean(test)
    return _avg_over_overlap(xa, ya, xt, yt)


def compare(anchor: list[dict[str, Any]], test: list[dict[str, Any]], names: tuple[str, str] = ("mse", "perceptual")
            ) -> dict[str, Any]:
    """BD numbers of ``test`` against ``anchor`` on ROI PSNR and PSNR, and every metric of
    :data:`COMPARED` of both at the same bpp (keyed by ``names``)."""
    a_name, t_name = names

    def args(key):
        return [p["bpp"] for p in anchor], [p[key] for p in anchor], [p["bpp"] for p in test], [p[key] for p in test]
    a_bpp, t_bpp = [p["bpp"] for p in anchor], [p["bpp"] for p in test]
    out: dict[str, Any] = {"bd_psnr_roi": bd_psnr(*args("roi_psnr")), "bd_rate_roi": bd_rate(*args("roi_psnr")),
                           "bd_psnr": bd_psnr(*args("psnr")),
                           "same_bpp_range": [max(min(a_bpp), min(t_bpp)), min(max(a_bpp), max(t_bpp))]}
    for metric in COMPARED:
        a, t = at_same_bpp(anchor, test, metric)
        out[metric] = {a_name: a, t_name: t}
    a, t = out["texture_nonroi"][a_name], out["texture_nonroi"][t_name]
    out["texture_nonroi_gap_to_1"] = {a_name: abs(1 - a), t_name: abs(1 - t)}
    out["texture_moves_toward_1"] = bool(abs(1 - t) < abs(1 - a))
    out["roi_target_met"] = bool(math.isfinite(out["bd_psnr_roi"]) and out["bd_psnr_roi"] >= TARGET_BD_PSNR_ROI)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mse", type=Path, required=True, help="the MSE model's checkpoint (model.pt or its folder)")
    p.add_argument("--perceptual", type=Path, required=True, help="the perceptual stage's checkpoint")
    p.add_argument("--images", type=Path, default=Path("/work/photo_set/heldout"), help="held-out photos")
    p.add_argument("--max-side", type=int, default=512, help="longest side of the scaled photos (px)")
    p.add_argument("--roi-quality", type=float, default=0.1)
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.33, 0.67, 1.0])
    p.add_argument("--picture-rate", type=float, default=1.0,
                   help="the MSE model's rate in the pictures (default its top one: a perceptual stage moves "
                        "the rate points up, and the perceptual model's files must reach the MSE file's size)")
    p.add_argument("--out", type=Path, default=Path("benchmark_out/perceptual_stage"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    img_dir, mask_dir = scaled_photos_with_saliency(args.images, args.out, args.max_side)
    sweeps = {}
    for name, ckpt, baselines in (("mse", args.mse, ("jpeg",)), ("perceptual", args.perceptual, ())):
        print(f"[sweep] {name}: {ckpt}", file=sys.stderr)
        sweeps[name] = rd_sweep(ckpt, img_dir, mask_dir, roi_quality=args.roi_quality, rates=args.rates,
                                roi_qualities=[args.roi_quality], baselines=baselines, progress=True)
    curves = {name: s["curves"]["roicodec"]["points"] for name, s in sweeps.items()}
    result = {"mse": str(args.mse), "perceptual": str(args.perceptual), "images": str(args.images),
              "n_images": sweeps["mse"]["n_images"], "max_side": args.max_side, "roi": "saliency mbd > 0.5",
              "roi_quality": args.roi_quality, "rates": args.rates,
              "perceptual_vs_mse": compare(curves["mse"], curves["perceptual"]),
              "target_bd_psnr_roi": TARGET_BD_PSNR_ROI,
              "curves": {**curves, "jpeg": sweeps["mse"]["curves"]["jpeg"]["points"]},
              "mse_vs_jpeg": sweeps["mse"]["bd"],
              "perceptual_vs_jpeg": compare(sweeps["mse"]["curves"]["jpeg"]["points"], curves["perceptual"],
                                                ("jpeg", "perceptual"))}
    print("[pictures]", file=sys.stderr)
    result["pictures"] = [str(p) for p in comparison_pictures(
        [("MSE model", args.mse), ("perceptual model", args.perceptual)], list_images(img_dir), mask_dir,
        args.roi_quality, args.picture_rate, args.out / "pictures")]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    to_json(result, args.out / "perceptual_stage.json")
    text = json.dumps(jsonable(result), indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
