"""How well each weight-free saliency model finds the hand-marked objects in the real photos.

Prints one JSON object. For every registered saliency model and every photo that
:data:`pipeline.data.photos.OBJECTS` has boxes for (all of them), the saliency map of the
photo (``photo(name, max_side=512)``) is scored against the binary ROI mask (union of that
photo's boxes, drawn through the same COCO annotations :func:`write_photo_set` writes, so
the boxes are scaled exactly as everywhere else):

- ``auc``: ROC AUC over pixels (threshold-free; 0.5 = chance, below 0.5 = inverted);
- ``f_measure``: F-beta with beta^2 = 0.3 at the adaptive threshold 2 x mean saliency
  (Achanta et al. 2009; the salient-object literature's usual single-threshold score);
- ``s_per_mpix``: seconds per megapixel (best of ``--repeats`` calls on the photo).

Per model: the per-photo numbers, their means, and the median time per megapixel.
With ``--checkpoint``, every photo is also coded with each model's map as its mask (at
``--roi-quality`` 0.3, ``--rate`` 0.5): bpp, ROI and non-ROI PSNR (ROI = the map >= 0.5),
and on how many photos the ROI comes out above the rest.
``centre_prior`` ignores the image: it is the baseline a model must beat. The learned
models (``u2net``, ``u2netp``) run when their weights are given (``--u2net-weights``...),
else they are listed under ``skipped``.

    python benchmarks/saliency_quality.py [--max-side 512 --repeats 3 --models mbd,centre_prior]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.photos import OBJECTS, photo, write_photo_set  # noqa: E402
from pipeline.masks import get_saliency_model, load_coco, saliency_models  # noqa: E402
from pipeline.masks.saliency import LEARNED_SALIENCY_MODELS  # noqa: E402

BETA2 = 0.3


def roc_auc(saliency: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC of ``saliency`` as a score for the binary ``truth`` (ties count half)."""
    from scipy.stats import rankdata

    scores, labels = np.ravel(saliency).astype(np.float64), np.ravel(truth).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both ROI and non-ROI pixels")
    ranks = rankdata(scores)  # average ranks: the Mann-Whitney U statistic, as sklearn's roc_auc_score
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f_measure(saliency: np.ndarray, truth: np.ndarray, beta2: float = BETA2) -> float:
    """F-beta of the map binarised at the adaptive threshold 2 x its mean (0 when nothing matches)."""
    predicted = saliency >= 2.0 * float(saliency.mean())
    truth = truth.astype(bool)
    hits = float((predicted & truth).sum())
    if hits == 0:
        return 0.0
    precision, recall = hits / float(predicted.sum()), hits / float(truth.sum())
    return (1 + beta2) * precision * recall / (beta2 * precision + recall)


def load_photos(max_side: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (photo, ROI mask)}`` for every photo in OBJECTS, the mask from write_photo_set's boxes."""
    names = list(OBJECTS)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        sample_set = write_photo_set(tmp, names, max_side=max_side)
        coco = load_coco(sample_set.annotations)
        for image_id, file_name in coco.images():
            name = Path(file_name).stem
            image = photo(name, max_side=max_side)
            mask = coco.mask(image_id)
            if mask.shape != image.shape[:2]:
                raise RuntimeError(f"{name}: mask {mask.shape} does not match the photo {image.shape[:2]}")
            out[name] = (image, mask > 0.5)
    return out


def evaluate(model_name: str, data: dict[str, tuple[np.ndarray, np.ndarray]], repeats: int,
             weights: str | None = None) -> dict:
    """Per-photo AUC, F-measure and time of one model, with means and the median time."""
    model = get_saliency_model(model_name, weights)
    model(next(iter(data.values()))[0])  # warm-up: lazy imports, caches
    per_photo = {}
    for name, (image, truth) in data.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            saliency = model(image)
            times.append(time.perf_counter() - start)
        per_photo[name] = {"auc": round(roc_auc(saliency, truth), 4),
                           "f_measure": round(f_measure(saliency, truth), 4),
                           "s_per_mpix": round(min(times) / (image.shape[0] * image.shape[1] / 1e6), 4)}
    return {"per_photo": per_photo,
            "mean_auc": round(statistics.mean(p["auc"] for p in per_photo.values()), 4),
            "mean_f_measure": round(statistics.mean(p["f_measure"] for p in per_photo.values()), 4),
            "median_s_per_mpix": round(statistics.median(p["s_per_mpix"] for p in per_photo.values()), 4)}


def through_codec(checkpoint: str, model_name: str, data: dict[str, tuple[np.ndarray, np.ndarray]],
                  roi_quality: float, rate: float, weights: str | None = None) -> dict:
    """Each photo coded with the model's map as its mask: bpp, ROI / non-ROI PSNR (ROI = the map >= 0.5)."""
    import torch
    from PIL import Image

    from pipeline.codec.coding import bits_per_pixel, decode, encode, image_to_tensor, mask_to_tensor
    from pipeline.eval.evaluate import load_model, quality, quantize8

    codec, _ = load_model(checkpoint)
    model = get_saliency_model(model_name, weights)
    per_photo = {}
    for name, (image, _) in data.items():
        x = image_to_tensor(Image.fromarray(image))
        m = mask_to_tensor(model(image), image.shape[:2])
        with torch.no_grad():
            data_bytes = encode(codec, x, m, roi_quality, rate)
            x_hat = quantize8(decode(codec, data_bytes))
        q = quality(x, x_hat, m)
        per_photo[name] = {"bpp": round(bits_per_pixel(data_bytes, image.shape[1], image.shape[0]), 4),
                           "roi_psnr": round(q["roi_psnr"], 2), "nonroi_psnr": round(q["nonroi_psnr"], 2),
                           "roi_fraction": round(float((m >= 0.5).float().mean()), 4)}
    above = [p["roi_psnr"] > p["nonroi_psnr"] for p in per_photo.values()]
    return {"per_photo": per_photo, "roi_above_nonroi": f"{sum(above)}/{len(above)}",
            "mean_roi_minus_nonroi_db": round(statistics.mean(p["roi_psnr"] - p["nonroi_psnr"]
                                                              for p in per_photo.values()), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-side", type=int, default=512, help="photos' longer side in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per photo; the best counts (default 3)")
    parser.add_argument("--models", default=None,
                        help="comma-separated model names (default: every model; learned ones need weights)")
    for name in LEARNED_SALIENCY_MODELS:
        parser.add_argument(f"--{name}-weights", metavar="FILE", default=None,
                            help=f"weights of the learned {name} (without them it is skipped)")
    parser.add_argument("--checkpoint", default=None, metavar="CKPT",
                        help="also code every photo with each model's map as its mask (ROI / non-ROI PSNR)")
    parser.add_argument("--roi-quality", type=float, default=0.3, help="with --checkpoint (default 0.3)")
    parser.add_argument("--rate", type=float, default=0.5, help="with --checkpoint (default 0.5)")
    args = parser.parse_args(argv)
    weights = {name: getattr(args, f"{name}_weights") for name in LEARNED_SALIENCY_MODELS}
    names = args.models.split(",") if args.models else saliency_models()
    skipped = {n: f"no --{n}-weights" for n in names if n in weights and weights[n] is None}
    data = load_photos(args.max_side)
    models = {name: evaluate(name, data, max(1, args.repeats), weights.get(name)) for name in names
              if name not in skipped}
    baseline = models.get("centre_prior")
    result = {
        "photos": {name: {"height": image.shape[0], "width": image.shape[1],
                          "roi_fraction": round(float(truth.mean()), 4)} for name, (image, truth) in data.items()},
        "metrics": {"auc": "ROC AUC over pixels", "f_measure": f"F-beta, beta^2={BETA2}, threshold 2 x mean saliency",
                    "s_per_mpix": "seconds per megapixel, best of repeats; the model's median over the photos"},
        "models": models, "skipped": skipped,
        "codec": ({"checkpoint": args.checkpoint, "roi_quality": args.roi_quality, "rate": args.rate,
                   **{n: through_codec(args.checkpoint, n, data, args.roi_quality, args.rate, weights.get(n))
                      for n in models if n != "centre_prior"}} if args.checkpoint else None),
        "ranking_by_mean_auc": sorted(models, key=lambda n: -models[n]["mean_auc"]),
        "beats_centre_prior": ({n: m["mean_auc"] > baseline["mean_auc"] for n, m in models.items()
                                if n != "centre_prior"} if baseline else None),
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
