"""Graded quality maps against the same map thresholded, at the same file size, on held-out photos.

Held-out photos (default: the default model's held-out split, ``/work/photo_set/heldout``,
chosen before any training), scaled so their longest side is at most ``--max-side`` (512 px,
CPU time), each with its soft saliency map ``s`` (``mbd``, the weight-free default; no
threshold). Two ways to code a photo with that map, through real ``.roic`` files at
``--roi-quality`` Q over ``--rates``:

- ``graded``: the soft map as a quality map, ``s + (1 - s) Q`` per pixel, a step per latent
  cell (``encode(..., graded=True)``);
- ``thresholded``: the same map thresholded at 0.5, the binary ROI with the background's step
  from Q (what ``roicodec compress --saliency`` does without ``--soft``).

Both are scored by the quality-weighted PSNR with the soft map's weights ``s + (1 - s) Q`` (the
importance the user gave), and by ROI PSNR (``s >= 0.5``) and PSNR. Reported: BD-rate of graded
against thresholded on each (target on the weighted PSNR: at most -10%), and the level map's share
of the file (bytes of the third string group over the file's bytes) for both.

Usage: ``python benchmarks/graded_maps.py --checkpoint CKPT [--out DIR]``; progress on stderr,
JSON on stdout and in ``OUT/graded_maps.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.codec.bitstream import unpack  # noqa: E402
from pipeline.codec.coding import bits_per_pixel, decode, encode, image_to_tensor  # noqa: E402
from pipeline.eval.evaluate import jsonable, list_images, load_model, quantize8, to_json  # noqa: E402
from pipeline.eval.metrics import psnr, quality_weighted_psnr, roi_psnr  # noqa: E402
from pipeline.eval.rd import bd_psnr, bd_rate  # noqa: E402

TARGET_BD_RATE_WEIGHTED = -10.0
METRICS = ("weighted_psnr", "roi_psnr", "psnr")
WAYS = ("graded", "thresholded")


def prepare(images_dir: Path, max_side: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, image (1,3,H,W), soft saliency map (1,1,H,W)) of each photo, scaled (Lanczos)."""
    from pipeline.masks.saliency import get_saliency_model

    saliency = get_saliency_model()
    out = []
    for path in list_images(images_dir):
        with Image.open(path) as im:
            image = im.convert("RGB")
        scale = min(1.0, max_side / max(image.size))
        if scale < 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        soft = torch.from_numpy(np.asarray(saliency(np.asarray(image)), dtype=np.float32))[None, None]
        out.append((path.stem, image_to_tensor(image), soft.clamp(0, 1)))
    return out


def point(model, x: torch.Tensor, soft: torch.Tensor, q: float, rate: float, graded: bool) -> dict[str, float]:  # noqa: ANN001
    """One real file: bpp, its level map's bytes and share, and the metrics of the 8-bit decode."""
    mask = soft if graded else (soft >= 0.5).float()
    data = encode(model, x, mask, q, rate, graded)
    x_hat = quantize8(decode(model, data))
    level_bytes = len(unpack(data)[1][2][0])
    h, w = x.shape[-2:]
    return {"bpp": bits_per_pixel(data, w, h), "bytes": len(data), "map_bytes": level_bytes,
            "map_share": level_bytes / len(data), "weighted_psnr": quality_weighted_psnr(x, x_hat, soft, q),
            "roi_psnr": roi_psnr(x, x_hat, soft)[0], "psnr": psnr(x, x_hat)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="model checkpoint (model.pt or its folder)")
    p.add_argument("--images", type=Path, default=Path("/work/photo_set/heldout"), help="held-out photos")
    p.add_argument("--max-side", type=int, default=512, help="longest side of the scaled photos (px)")
    p.add_argument("--roi-quality", type=float, default=0.1, help="Q: the quality floor of the map")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--out", type=Path, default=Path("benchmark_out/graded_maps"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    model, ckpt = load_model(args.checkpoint)
    photos = prepare(args.images, args.max_side)
    rows: list[dict[str, Any]] = []
    for i, (name, x, soft) in enumerate(photos):
        print(f"[{i + 1}/{len(photos)}] {name} {x.shape[-1]}x{x.shape[-2]}", file=sys.stderr)
        for rate in args.rates:
            for way in WAYS:
                rows.append({"image": name, "way": way, "rate": rate,
                             **point(model, x, soft, args.roi_quality, rate, way == "graded")})
    curves = {way: [{k: float(np.mean([r[k] for r in rows if r["way"] == way and r["rate"] == rate]))
                     for k in ("bpp", "map_bytes", "map_share", *METRICS)} | {"rate": rate}
                    for rate in args.rates] for way in WAYS}

    def bd(metric: str) -> dict[str, float]:
        a, t = curves["thresholded"], curves["graded"]
        pts = ([c["bpp"] for c in a], [c[metric] for c in a], [c["bpp"] for c in t], [c[metric] for c in t])
        return {"bd_rate_percent": bd_rate(*pts), "bd_psnr_db": bd_psnr(*pts)}

    result = {
        "checkpoint": ckpt, "variant": model.variant, "images": str(args.images), "n_images": len(photos),
        "max_side": args.max_side, "map": "saliency mbd, soft", "roi_quality": args.roi_quality,
        "rates": args.rates, "graded_vs_thresholded": {m: bd(m) for m in METRICS},
        "target_bd_rate_weighted": TARGET_BD_RATE_WEIGHTED,
        "map_share": {way: float(np.mean([r["map_share"] for r in rows if r["way"] == way])) for way in WAYS},
        "map_bytes": {way: float(np.mean([r["map_bytes"] for r in rows if r["way"] == way])) for way in WAYS},
        "curves": curves, "rows": rows,
    }
    result["target_met"] = bool(result["graded_vs_thresholded"]["weighted_psnr"]["bd_rate_percent"]
                                <= TARGET_BD_RATE_WEIGHTED)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    to_json(result, args.out / "graded_maps.json")
    print(json.dumps(jsonable({k: v for k, v in result.items() if k != "rows"}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
