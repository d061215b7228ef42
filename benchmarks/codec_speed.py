"""Encode/decode speed of every ROI codec variant against CompressAI's own hyperpriors.

Prints one JSON object: megapixels/second for encode (``compress``: transforms +
entropy coding) and decode (``decompress``) of each model built with the same N/M on
the same images in the same run, and each variant's time relative to
``bmshj2018_hyperprior`` (ScaleHyperprior) and ``mbt2018_mean`` (MeanScaleHyperprior).
Target: the variants on the hyperprior's convolutional transforms within 1.3x of the plain
hyperprior's time (the ROI conditioning's overhead). ``swin`` has another backbone (Swin
transformer stages, the paper's depths at the same N/M, so the same latent size): its ratio is
reported, outside that target.

    python benchmarks/codec_speed.py [--N 128 --M 192 --size 512 --images 3 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from compressai.models import MeanScaleHyperprior, ScaleHyperprior

from pipeline.codec.models import MODELS, build_model
from pipeline.data.samples import objects_mask, photo_like_image

OTHER_BACKBONES = ("swin",)  # reported, outside the 1.3x target


def _images(n: int, size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for seed in range(n):
        arr, objects = photo_like_image(size, size, 10_000 + seed)
        x = torch.from_numpy(arr).permute(2, 0, 1).float()[None].div(255).to(device)
        m = torch.from_numpy(objects_mask(objects, size, size))[None, None].to(device)
        out.append((x, m))
    return out


def _time(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model: torch.nn.Module, images, roi: bool, repeats: int, device: torch.device) -> dict:
    """Seconds per image for compress and decompress, and megapixels/second."""
    model = model.to(device).eval()
    model.update(force=True)
    enc, dec = [], []
    with torch.inference_mode():
        for x, m in images:
            args = (x, m, 0.3, 0.5) if roi else (x,)
            out = model.compress(*args)
            dec_args = (out["strings"], out["shape"]) + ((0.5, 0.3) if roi else ())
            enc.append(_time(lambda: model.compress(*args), repeats, device))
            dec.append(_time(lambda: model.decompress(*dec_args), repeats, device))
    mpix = sum(x.shape[-1] * x.shape[-2] for x, _ in images) / 1e6
    return {"encode_s": sum(enc), "decode_s": sum(dec),
            "encode_mpix_per_s": mpix / sum(enc), "decode_mpix_per_s": mpix / sum(dec)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=128)
    parser.add_argument("--M", type=int, default=192)
    parser.add_argument("--size", type=int, default=512, help="square image side (multiple of 64)")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="*", default=sorted(MODELS))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = _images(args.images, args.size, device)
    results = {
        "bmshj2018_hyperprior": measure(ScaleHyperprior(args.N, args.M), images, False,
                                        args.repeats, device),
        "mbt2018_mean": measure(MeanScaleHyperprior(args.N, args.M), images, False,
                                args.repeats, device),
    }
    for variant in args.variants:
        model = build_model(variant, N=args.N, M=args.M)
        results[variant] = measure(model, images, True, args.repeats, device)
    base = results["bmshj2018_hyperprior"]
    for name, r in results.items():
        r["encode_time_vs_hyperprior"] = r["encode_s"] / base["encode_s"]
        r["decode_time_vs_hyperprior"] = r["decode_s"] / base["decode_s"]
        r["encode_time_vs_mbt2018_mean"] = r["encode_s"] / results["mbt2018_mean"]["encode_s"]
        r["decode_time_vs_mbt2018_mean"] = r["decode_s"] / results["mbt2018_mean"]["decode_s"]
    targeted = [v for v in args.variants if v not in OTHER_BACKBONES]
    worst = max((max(results[v]["encode_time_vs_hyperprior"], results[v]["decode_time_vs_hyperprior"])
                 for v in targeted), default=float("nan"))
    print(json.dumps({
        "benchmark": "codec_speed", "device": str(device), "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "N": args.N, "M": args.M, "image_side": args.size, "images": args.images,
        "results": results, "worst_variant_time_vs_hyperprior": worst,
        "target_max_ratio": 1.3, "within_target": worst <= 1.3, "target_variants": targeted,
    }, indent=2))


if __name__ == "__main__":
    main()
