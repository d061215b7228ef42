"""Trained ``ggm`` (SFT conditioning + generalized Gaussian) against ``sft`` (same, Gaussian).

Both variants are trained the same way (same images, crops, steps, seed, learning
rate), then swept over rates through real ``.roic`` files on held-out images; the
BD-rate of ``ggm`` against ``sft`` is printed (negative = the generalized Gaussian
saves bits), on PSNR at uniform quality (roi-quality 1) and on ROI PSNR at
roi-quality 0.3. With ``--mlflow-uri`` the curves and BD numbers are logged to an
MLflow run (experiment ``roicodec-benchmarks``).

Usage: ``python benchmarks/ggm_vs_gaussian.py [--steps 1500] [--device cuda] [--mlflow-uri URI]``;
prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.codec.models import ROICodec, build_model  # noqa: E402
from pipeline.data.samples import objects_mask, photo_like_image  # noqa: E402
from pipeline.eval.evaluate import learned_point  # noqa: E402
from pipeline.eval.rd import curve_bd  # noqa: E402
from pipeline.train.local import train_local  # noqa: E402

RATES = (0.0, 0.25, 0.5, 0.75, 1.0)
SETTINGS = {"uniform": 1.0, "roi": 0.3}


def sample_pairs(seeds: range, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Photo-like images and their object masks, stacked."""
    xs, ms = [], []
    for seed in seeds:
        arr, objects = photo_like_image(size, size, seed)
        xs.append(torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255.0)
        ms.append(torch.from_numpy(objects_mask(objects, size, size))[None, None])
    return torch.cat(xs), torch.cat(ms)


def curve(model: ROICodec, images: torch.Tensor, masks: torch.Tensor, roi_quality: float) -> list[dict[str, Any]]:
    """Mean bpp (real files), PSNR and ROI PSNR over the images at each rate."""
    points = []
    for rate in RATES:
        rows = [learned_point(model, images[i:i + 1], masks[i:i + 1], roi_quality, rate)
                for i in range(images.shape[0])]
        points.append({k: sum(r[k] for r in rows) / len(rows) for k in ("bpp", "psnr", "roi_psnr")}
                      | {"rate": rate})
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="training steps per variant (default 1500)")
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--M", type=int, default=96)
    p.add_argument("--train-images", type=int, default=24)
    p.add_argument("--eval-images", type=int, default=6)
    p.add_argument("--size", type=int, default=192, help="image side in pixels (default 192)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mlflow-uri", help="log curves and BD numbers to this MLflow tracking store")
    args = p.parse_args(argv)

    train_x, train_m = sample_pairs(range(args.train_images), args.size)
    eval_x, eval_m = sample_pairs(range(1000, 1000 + args.eval_images), args.size)
    out: dict[str, Any] = {"steps": args.steps, "N": args.N, "M": args.M, "device": args.device,
                           "rates": list(RATES), "curves": {}, "train_s": {}}
    for variant in ("sft", "ggm"):
        torch.manual_seed(0)
        model = build_model(variant, N=args.N, M=args.M, n_rates=3).to(args.device)
        t0 = time.perf_counter()
        train_local(model, train_x, train_m, steps=args.steps, batch=8, crop=min(128, args.size), lr=1e-3, seed=0,
                    progress=True)
        out["train_s"][variant] = round(time.perf_counter() - t0, 1)
        model = model.cpu()
        model.update(force=True)  # tables for CPU coding
        out["curves"][variant] = {name: curve(model, eval_x, eval_m, q) for name, q in SETTINGS.items()}
    bd = {}
    for name in SETTINGS:
        vals = curve_bd(out["curves"]["sft"][name], out["curves"]["ggm"][name])
        bd[f"bd_rate_psnr_{name}"] = vals["bd_rate_psnr"]
        bd[f"bd_rate_roi_{name}"] = vals["bd_rate_roi"]
    out["bd_ggm_vs_sft"] = bd
    if args.mlflow_uri:
        from pipeline.train import tracking

        out["mlflow_run_id"] = tracking.log_benchmark(args.mlflow_uri, f"ggm-vs-sft-{args.steps}steps",
                                                      {k: out[k] for k in ("steps", "N", "M", "device")},
                                                      [(k, v, args.steps) for k, v in bd.items()], out,
                                                      "ggm_vs_sft.json")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
