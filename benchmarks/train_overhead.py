"""Ray Train overhead: steps/s of the distributed loop (1 worker) against a plain PyTorch loop.

Both loops train the same codec (variant, size, seed) with the same
:func:`~pipeline.train.steps.train_step`, batch, crop size and torch thread count,
on the same images and masks, in the same process run:

- **plain**: images and masks decoded once into memory, random crops with
  :func:`pipeline.train.local.random_crops`, no reporting, no checkpoints. Run once
  before and once after the Ray run (the machine may be shared; the mean is used),
  after a discarded short run that warms the process up (the Ray worker is a
  process that has already imported and initialised everything when it starts).
- **ray**: :func:`pipeline.train.trainer.train` with one worker: Ray Data reads the
  Parquet shards, decodes and crops in parallel tasks, ``ray.train.report`` every
  ``--report-every`` steps, the MLflow callback logging every step on the controller.

Steady state only (and the median step time too, which a shared machine's load
spikes move less than the mean). Excluded: Ray start-up, the worker group and process group
start-up, dataset planning and the first ``--warmup`` steps of each loop (model
warm-up, the first Ray Data execution), and for Ray the final validation +
checkpoint (timed from the worker's own per-step timestamps, which stop at the last
step). Included for Ray: data loading through Ray Data (including the restart of the
streaming execution at each epoch boundary), reporting and tracking.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.codec.models import build_model  # noqa: E402
from pipeline.data.dataset import plan_shards, read_image, row_mask  # noqa: E402
from pipeline.data.shards import read_shards  # noqa: E402
from pipeline.train.local import random_crops  # noqa: E402
from pipeline.train.loss import ROIRateDistortionLoss  # noqa: E402
from pipeline.train.steps import StepSettings, make_optimizers, train_step  # noqa: E402
from pipeline.ray_session import ensure_ray  # noqa: E402
from pipeline.train.trainer import TrainConfig, train, write_smoke_shards  # noqa: E402


def load_in_memory(shards: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All usable training rows decoded once: (N,3,H,W) and (N,1,H,W) in [0,1]."""
    plan = plan_shards(shards, val_fraction=0.0)
    xs, ms = [], []
    for f in plan.files:
        for row in read_shards(f).to_pylist():
            if row["error"] is not None:
                continue
            rgb = read_image(row["uri"])
            mask = row_mask(row["roi_mask"], row["saliency"], rgb.shape[:2])
            xs.append(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0)
            ms.append(torch.from_numpy(mask)[None])
    return torch.stack(xs), torch.stack(ms)


def plain_loop(images: torch.Tensor, masks: torch.Tensor, args: argparse.Namespace) -> tuple[float, float]:
    """Steady-state (steps/s, median step seconds) of the single-process loop."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.variant, **model_config(args))
    optimizer, aux_optimizer = make_optimizers(model, args.lr, 1e-3)
    settings = StepSettings(n_rates=model.n_rates)
    loss_fn = ROIRateDistortionLoss()
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    model.train()
    times = []
    for _ in range(args.warmup + args.steps):
        x, m = random_crops(images, masks, args.batch, args.crop, gen)
        train_step(model, x, m, loss_fn, optimizer, aux_optimizer, settings, rng)
        times.append(time.perf_counter())
    steady = times[args.warmup - 1:]
    gaps = sorted(b - a for a, b in zip(steady, steady[1:]))
    return args.steps / (steady[-1] - steady[0]), gaps[len(gaps) // 2]


def model_config(args: argparse.Namespace) -> dict:
    return {"N": args.N, "M": args.M, "n_rates": 2}


def ray_loop(shards: Path, storage: Path, args: argparse.Namespace) -> tuple[float, dict]:
    """Steady-state steps/s of the Ray Train loop from the worker's step timestamps."""
    total = args.warmup + args.steps
    cfg = TrainConfig(shards=str(shards), variant=args.variant, model=model_config(args), steps=total,
                      batch_size=args.batch, crop=args.crop, val_fraction=0.0, lr=args.lr,
                      checkpoint_every=total, report_every=args.report_every, keep=1, num_workers=1,
                      cpus_per_worker=1.0, torch_threads=args.threads, max_failures=0, run_name="overhead",
                      storage_path=str(storage), seed=args.seed, record_step_times=True)
    out = train(cfg)
    times = out.metrics["step_times"]
    steady = times[args.warmup - 1:]  # end of step `warmup` .. end of the last step
    gaps = [b - a for a, b in zip(steady, steady[1:])]
    median = sorted(gaps)[len(gaps) // 2]
    stalls = [[args.warmup + 1 + i, round(g, 2)] for i, g in enumerate(gaps) if g > 5 * median]
    return args.steps / (steady[-1] - steady[0]), {
        "median_step_s": round(median, 4), "max_step_s": round(max(gaps), 4),
        "stalls_step_s": stalls,  # [step, seconds] of steps over 5x the median
        "steps_per_s_without_stalls": round(len(gaps) / sum(g for g in gaps if g <= 5 * median), 3)
        if any(g <= 5 * median for g in gaps) else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tlic")
    p.add_argument("--N", type=int, default=32)
    p.add_argument("--M", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--steps", type=int, default=150, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=10, help="steps excluded at the start of each loop")
    p.add_argument("--report-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads in both loops")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    stdout = os.dup(1)
    with tempfile.TemporaryDirectory(prefix="roicodec-overhead-") as tmp:
        shards = write_smoke_shards(Path(tmp) / "shards", n_images=args.images, size=192, error_rows=0)
        images, masks = load_in_memory(shards)
        plain_loop(images, masks, argparse.Namespace(**{**vars(args), "steps": 10}))  # process warm-up, discarded
        plain_before = plain_loop(images, masks, args)
        os.dup2(2, 1)  # Ray's log monitor writes to fd 1: keep stdout for the JSON alone
        try:
            import ray

            started = ensure_ray()
            ray_rate, details = ray_loop(shards, Path(tmp) / "runs", args)
            if started:
                ray.shutdown()  # also stops its log monitor, which would write to stdout later
        finally:
            sys.stdout.flush()
            os.dup2(stdout, 1)
        plain_after = plain_loop(images, masks, args)
    plain = (plain_before[0] + plain_after[0]) / 2
    plain_median = (plain_before[1] + plain_after[1]) / 2
    result = {
        "benchmark": "train_overhead",
        "model": {"variant": args.variant, **model_config(args)},
        "batch": args.batch, "crop": args.crop, "torch_threads": args.threads,
        "measured_steps": args.steps, "warmup_steps_excluded": args.warmup, "report_every": args.report_every,
        "plain_steps_per_s": round(plain, 3),
        "plain_steps_per_s_before_after": [round(plain_before[0], 3), round(plain_after[0], 3)],
        "ray_steps_per_s": round(ray_rate, 3),
        "overhead_pct": round(100.0 * (plain / ray_rate - 1.0), 1),
        "plain_median_step_s": round(plain_median, 4),
        "ray_median_step_s": details["median_step_s"],
        "overhead_pct_median_step": round(100.0 * (details["median_step_s"] / plain_median - 1.0), 1),
        "target_overhead_pct": 10.0,
        "ray_steps": details,
        "excluded": ["Ray start-up", "worker/process group start-up", "dataset planning",
                     f"first {args.warmup} steps of each loop", "Ray's final validation + checkpoint"],
        "included_for_ray": ["Ray Data read/decode/crop tasks (streaming, in parallel with training)",
                             f"ray.train.report every {args.report_every} steps",
                             "MLflow per-step logging in the controller callback"],
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
