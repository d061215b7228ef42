"""The laptop demo on the bundled sample set: train a small ROI codec, then code real files.

Stages (each with progress): write the deterministic sample set with its COCO
annotations, build ROI masks from the annotations, train a small ``tma`` model on
CPU, then compress every held-out image to a ``.roic`` file at two ROI settings,
decode it without the mask and report bpp (from the file size), PSNR, ROI PSNR and
non-ROI PSNR. Safe to run twice: outputs are overwritten, a finished checkpoint is
reused unless ``--retrain``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.codec.checkpoint import load_checkpoint, save_checkpoint
from pipeline.codec.coding import (bits_per_pixel, decode, encode, image_to_tensor, mask_to_tensor,
                                   tensor_to_image)
from pipeline.codec.models import build_model
from pipeline.data.samples import write_sample_set
from pipeline.eval.metrics import psnr, roi_psnr
from pipeline.masks.coco import coco_masks_for_image
from pipeline.train.local import train_local


@dataclass
class DemoResult:
    """One coded file of the demo."""

    image: str
    roi_quality: float
    rate: float
    bpp: float
    psnr: float
    roi_psnr: float
    nonroi_psnr: float


def _load_set(files: list[Path], annotations: Path) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ms = [], []
    for path in files:
        image = Image.open(path)
        mask = coco_masks_for_image(annotations, path.name)
        xs.append(image_to_tensor(image))
        ms.append(mask_to_tensor(mask, (image.height, image.width)))
    return torch.cat(xs), torch.cat(ms)


def run_demo(out_dir: str | Path = "demo_out", steps: int = 1500, n_train: int = 24,
             n_eval: int = 4, variant: str = "tma", retrain: bool = False,
             settings: tuple[tuple[float, float], ...] = ((1.0, 0.3), (0.1, 0.3), (0.1, 1.0)),
             ) -> list[DemoResult]:
    """Run the demo end to end; write checkpoint, files and ``report.json`` under ``out_dir``."""
    out = Path(out_dir)
    print(f"[1/4] sample set -> {out / 'data'}")
    samples = write_sample_set(out / "data", n_images=n_train + n_eval, size=(192, 192))
    train_files, eval_files = samples.image_files[:n_train], samples.image_files[n_train:]
    print("[2/4] ROI masks from the COCO annotations")
    images, masks = _load_set(train_files, samples.annotations)
    checkpoint = out / "checkpoints" / f"{variant}.pt"
    if checkpoint.is_file() and not retrain:
        print(f"[3/4] reusing {checkpoint} (pass --retrain to train again)")
        model = load_checkpoint(checkpoint)
    else:
        print(f"[3/4] training a small {variant} model for {steps} steps on CPU")
        torch.manual_seed(0)
        model = build_model(variant, N=64, M=96, n_rates=3)
        train_local(model, images, masks, steps=steps, batch=8, crop=128, lr=1e-3, progress=True)
        save_checkpoint(model, checkpoint, extra={"steps": steps, "source": "demo"})
    print("[4/4] coding the held-out images through real .roic files")
    files_dir = out / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in tqdm(eval_files, desc="evaluate"):
        x, m = _load_set([path], samples.annotations)
        for q, rate in settings:
            data = encode(model, x, m, q, rate)
            stem = f"{path.stem}_q{q:g}_r{rate:g}"
            (files_dir / f"{stem}.roic").write_bytes(data)
            x_hat = decode(model, data)
            tensor_to_image(x_hat).save(files_dir / f"{stem}.png")
            roi, nonroi = roi_psnr(x, x_hat, m)
            results.append(DemoResult(path.name, q, rate, bits_per_pixel(data, x.shape[-1], x.shape[-2]),
                                      psnr(x, x_hat), roi, nonroi))
    (out / "report.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    _print_summary(results, checkpoint, out)
    return results


def _print_summary(results: list[DemoResult], checkpoint: Path, out: Path) -> None:
    print(f"\ncheckpoint: {checkpoint}\nfiles:      {out / 'files'}\nreport:     {out / 'report.json'}")
    print(f"\n{'roi-quality':>11} {'rate':>5} {'bpp':>7} {'PSNR':>6} {'ROI PSNR':>9} {'non-ROI':>8}")
    keys = sorted({(r.roi_quality, r.rate) for r in results}, key=lambda k: (k[1], -k[0]))
    for q, rate in keys:
        rows = [r for r in results if (r.roi_quality, r.rate) == (q, rate)]
        mean = {f: float(np.mean([getattr(r, f) for r in rows]))
                for f in ("bpp", "psnr", "roi_psnr", "nonroi_psnr")}
        print(f"{q:>11.2f} {rate:>5.2f} {mean['bpp']:>7.3f} {mean['psnr']:>6.2f} "
              f"{mean['roi_psnr']:>9.2f} {mean['nonroi_psnr']:>8.2f}")
