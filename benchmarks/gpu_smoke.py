"""GPU smoke check of the training step and the coders (prints JSON; needs CUDA).

For each variant: a few hundred bf16-autocast training steps of the full-size model
(N=128, M=192) on 256px crops of the sample set with the same ``train_step`` the Ray
workers run, then an exact file round trip on the GPU, and whether a file encoded on
the GPU decodes on the CPU (learned codecs are float-sensitive across devices).

    python benchmarks/gpu_smoke.py [--steps 300 --variants sft ggm]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from pipeline.codec.coding import decode, encode
from pipeline.codec.models import build_model, pad_to_multiple
from pipeline.data.samples import objects_mask, photo_like_image
from pipeline.train.local import random_crops
from pipeline.train.loss import ROIRateDistortionLoss
from pipeline.train.steps import StepSettings, make_optimizers, train_step


def _data(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ms = [], []
    for seed in range(n):
        arr, objects = photo_like_image(size, size, seed)
        xs.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
        ms.append(torch.from_numpy(objects_mask(objects, size, size))[None])
    return torch.stack(xs), torch.stack(ms)


def run(variant: str, steps: int, batch: int, images: torch.Tensor, masks: torch.Tensor) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(variant, N=128, M=192, n_rates=4).to(device)
    optimizer, aux_optimizer = make_optimizers(model, lr=5e-4, aux_lr=1e-2)
    settings, rng, loss_fn = StepSettings(n_rates=4), random.Random(0), ROIRateDistortionLoss()
    gen = torch.Generator().manual_seed(0)
    losses, t_start = [], None
    for step in range(steps):
        if step == 10:  # exclude CUDA warm-up / autotuning
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        x, m = random_crops(images, masks, batch, 256, gen)
        metrics = train_step(model, x.to(device, non_blocking=True), m.to(device), loss_fn,
                             optimizer, aux_optimizer, settings, rng, amp=True)
        losses.append(metrics["loss"])
    torch.cuda.synchronize()
    steps_per_s = (steps - 10) / (time.perf_counter() - t_start)
    model.eval()
    model.update(force=True)
    arr, objects = photo_like_image(512, 768, 4242)
    x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255
    m = torch.from_numpy(objects_mask(objects, 512, 768))[None, None]
    with torch.no_grad():
        data = encode(model, x.to(device), m.to(device), 0.2, 0.6)
        ref = model(pad_to_multiple(x, 64).to(device), pad_to_multiple(m, 64).to(device), 0.2, 0.6)
        ref = ref["x_hat"].clamp(0, 1)[..., :512, :768].cpu()
        gpu_decoded = decode(model, data)
        cpu_model = model.cpu()
        try:
            cross = float((decode(cpu_model, data) - gpu_decoded).abs().max())
        except Exception as exc:  # a cross-device mismatch can make rANS decode garbage
            cross = f"failed: {type(exc).__name__}: {exc}"
    k = max(1, len(losses) // 10)
    return {"steps": steps, "batch": batch, "crop": 256, "train_steps_per_s": steps_per_s,
            "loss_first_10pct": sum(losses[:k]) / k, "loss_last_10pct": sum(losses[-k:]) / k,
            "gpu_roundtrip_max_abs_diff": float((gpu_decoded - ref).abs().max()),
            "bpp_512x768": 8 * len(data) / (512 * 768),
            "gpu_encode_cpu_decode_max_abs_diff": cross}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--variants", nargs="*", default=["tlic", "sft", "tma", "ggm"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_smoke.py needs a CUDA GPU")
    images, masks = _data(32, 320)
    out = {"benchmark": "gpu_smoke", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "results": {v: run(v, args.steps, args.batch, images, masks) for v in args.variants}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
