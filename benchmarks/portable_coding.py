"""Portable coding: the integer-exact table selection against the float model it came from.

On one checkpoint (default: the demo's latest) and real photos (the demo's held-out
images and seven of scikit-image's bundled photos, odd sizes; the set is fixed, not
chosen by result), prints one JSON object:

- ``bd_rate_percent``: BD-rate (PSNR, real files, 5 rates at uniform quality) of the
  integer-exact model against the same weights coding with the float hyper-decoder's
  tables, per image and mean. Target: at most +1%.
- ``decode_time_ratio``: decode time (fastest of ``--repeats`` interleaved runs), integer-exact
  over float, median over the images. Target: at most 1.1.
- ``perturbations``: files encoded under default numerics, decoded under each of
  :data:`pipeline.codec.numerics.PERTURBATIONS`: how many decodes have identical table
  indexes and symbols, identical 8-bit images (and the largest pixel difference), for the
  integer-exact path (float32 synthesis, and ``decode(float64=True)``) and for the float
  path (where a flipped index desynchronises the coder). Target: all identical for the
  integer-exact path.
- ``decode_time_ratio_float64_synthesis``: ``decode(float64=True)`` over the float model.
- ``clamped_fraction``: share of the integer hyper-decoder's activations that hit the clamp.

    python benchmarks/portable_coding.py [--checkpoint PATH] [--photos 7] [--rates 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.codec.checkpoint import load_checkpoint
from pipeline.codec.coding import bits_per_pixel, decode, encode, image_to_tensor, open_image, tensor_to_image
from pipeline.codec.models import ROICodec
from pipeline.codec.numerics import PERTURBATIONS, coded_state
from pipeline.eval.metrics import psnr
from pipeline.eval.rd import bd_rate

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
          "stereo_motorcycle"]
CHECK_RATES = (0.5, 1.0)


def latest_demo_checkpoint(root: Path = Path("demo_out/runs")) -> Path:
    found = sorted(root.glob("*/checkpoint_*/model.pt"))
    if not found:
        raise SystemExit(f"no checkpoint under {root}: run `make demo` first or pass --checkpoint")
    return found[-1]


def photos(n: int) -> list[tuple[str, torch.Tensor]]:
    import skimage.data

    out = []
    for name in PHOTOS[:n]:
        arr = getattr(skimage.data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr
        out.append((name, torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()[None] / 255))
    return out


def float_twin(model: ROICodec) -> ROICodec:
    """The same weights coding with the float hyper-decoder's table selection (not portable)."""
    twin = copy.deepcopy(model)
    latent = twin.latent_codec
    latent.side_int = lambda z_hat: z_hat  # hand z_hat itself to the float parameters
    latent.entropy_parameters = lambda z_hat, steps, dtype: latent.float_entropy_parameters(z_hat)
    return twin


def rd_curve(model: ROICodec, x: torch.Tensor, rates: list[float]) -> tuple[list[float], list[float]]:
    bpps, psnrs = [], []
    h, w = x.shape[-2:]
    for r in rates:
        data = encode(model, x, None, 1.0, r)
        bpps.append(bits_per_pixel(data, w, h))
        psnrs.append(psnr(decode(model, data), x))
    return bpps, psnrs


def clamped_fraction(model: ROICodec, images: list[tuple[str, torch.Tensor]]) -> float:
    from pipeline.codec.integer import ACT_MAX

    hits = total = 0

    def count(_module, _inputs, output):
        nonlocal hits, total
        hits += int((output.abs() >= ACT_MAX).sum())
        total += output.numel()

    handles = [layer.register_forward_hook(count) for layer in model.latent_codec.hyper_int.layers]
    with torch.no_grad():
        for _, x in images:
            encode(model, x, None, 1.0, 1.0)
    for handle in handles:
        handle.remove()
    return hits / max(total, 1)


def perturbation_check(paths: dict[str, tuple[ROICodec, bool]], images, progress: bool) -> dict:
    """Per coding path (model, float64 synthesis) and perturbation: decodes with the
    encoder's table indexes and symbols, with its 8-bit image, and the largest and total
    pixel differences."""
    result = {path: {name: {"decodes": 0, "identical_symbols": 0, "identical_images": 0, "max_pixel_diff": 0,
                            "differing_pixels": 0, "pixels": 0}
                     for name in PERTURBATIONS} for path in paths}
    jobs = [(path, name, label, x, r) for path in paths for (label, x) in images for r in CHECK_RATES
            for name in PERTURBATIONS]
    cache: dict = {}
    for path, name, label, x, r in tqdm(jobs, desc="perturbed decodes", disable=not progress):
        model, float64 = paths[path]
        key = (path, label, r)
        if key not in cache:
            data = encode(model, x, None, 1.0, r)
            image = np.asarray(tensor_to_image(decode(model, data, float64=float64)), int)
            cache[key] = (data, *coded_state(model, data), image)
        data, indexes, symbols, image = cache[key]
        context, to_float64 = PERTURBATIONS[name]
        other = copy.deepcopy(model).double() if to_float64 else model
        with context():
            other_indexes, other_symbols = coded_state(other, data)
            other_image = np.asarray(tensor_to_image(decode(other, data, float64=float64)), int)
        row = result[path][name]
        row["decodes"] += 1
        row["identical_symbols"] += int(torch.equal(indexes, other_indexes) and torch.equal(symbols, other_symbols))
        row["identical_images"] += int(np.array_equal(image, other_image))
        row["max_pixel_diff"] = max(row["max_pixel_diff"], int(np.abs(image - other_image).max()))
        row["differing_pixels"] += int((image != other_image).any(axis=-1).sum())
        row["pixels"] += image.shape[0] * image.shape[1]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="model.pt (default: the demo's latest checkpoint)")
    parser.add_argument("--eval-images", type=Path, default=Path("demo_out/data/eval_photos/images"),
                        help="folder of extra images (default: the demo's held-out set, if present)")
    parser.add_argument("--photos", type=int, default=len(PHOTOS), help="how many scikit-image photos")
    parser.add_argument("--rates", type=int, default=5, help="rate points per RD curve")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed decodes per image and path")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    progress = not args.no_progress

    checkpoint = args.checkpoint or latest_demo_checkpoint()
    model = load_checkpoint(checkpoint)
    twin = float_twin(model)
    images = photos(args.photos)
    if args.eval_images.is_dir():
        images += [(p.name, image_to_tensor(open_image(p))) for p in sorted(args.eval_images.glob("*.png"))]
    rates = [i / (args.rates - 1) for i in range(args.rates)] if args.rates > 1 else [1.0]

    per_image, ratios, ratios64 = {}, [], []
    repeats = max(1, args.repeats)
    for label, x in tqdm(images, desc="RD curves", disable=not progress):
        ib, ip = rd_curve(model, x, rates)
        fb, fp = rd_curve(twin, x, rates)
        per_image[label] = {"size": list(x.shape[-2:]), "bd_rate_percent": bd_rate(fb, fp, ib, ip),
                            "bpp_integer": ib, "bpp_float": fb, "psnr_integer": ip, "psnr_float": fp}
        data_i, data_f = encode(model, x, None, 1.0, 1.0), encode(twin, x, None, 1.0, 1.0)
        times: dict[str, list[float]] = {"integer": [], "float": [], "float64": []}
        for _ in range(repeats):  # interleaved, so all see the same machine state
            for key, data, m, f64 in (("integer", data_i, model, False), ("float", data_f, twin, False),
                                      ("float64", data_i, model, True)):
                t0 = time.perf_counter()
                decode(m, data, float64=f64)
                times[key].append(time.perf_counter() - t0)
        seconds = {k: min(v) for k, v in times.items()}  # the least disturbed run of each
        ratios.append(seconds["integer"] / seconds["float"])
        ratios64.append(seconds["float64"] / seconds["float"])
        per_image[label]["decode_seconds"] = seconds
    finite = [v["bd_rate_percent"] for v in per_image.values() if math.isfinite(v["bd_rate_percent"])]
    checks = perturbation_check({"integer": (model, False), "integer, float64 synthesis": (model, True),
                                 "float": (twin, False)}, images, progress)
    print(json.dumps({
        "checkpoint": str(checkpoint), "variant": model.variant, "config": model.config,
        "images": len(images), "rates": rates, "threads": args.threads, "machine": platform.processor(),
        "torch": torch.__version__,
        "bd_rate_percent": statistics.mean(finite) if finite else float("nan"),
        "bd_rate_target_percent": 1.0,
        "decode_time_ratio": statistics.median(ratios),
        "decode_time_ratio_per_image": ratios,
        "decode_time_ratio_float64_synthesis": statistics.median(ratios64),
        "decode_time_ratio_target": 1.1,
        "perturbations": checks,
        "clamped_fraction": clamped_fraction(model, images),
        "per_image": per_image,
    }, indent=2))


if __name__ == "__main__":
    main()
