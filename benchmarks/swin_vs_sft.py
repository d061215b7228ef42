"""Swin transformer backbone against the convolutional SFT codec on the same budget.

``swin`` and ``sft`` (the same SFT conditioning on convolutional transforms) at the same N/M,
rate points, seed, data and steps: the demo's photos and CPU schedule
(``benchmarks/training_parity.py``: scikit-image's photos, 12 to train on, 7 held out; 64 px
crops then 128 px crops). ``swin`` is built at its small CPU configuration by default
(``--swin-depths 1,1,2,1``; the paper's is 2,2,6,2). Scored from real ``.roic`` files on the
held-out photos: BD-rate and BD-PSNR of swin against sft on ROI PSNR at roi-quality 0.1, on PSNR
and ROI PSNR at uniform quality, and each one's training, encode and decode time. Reported
whatever it shows.

Usage: ``python benchmarks/swin_vs_sft.py [--steps 4400] [--jobs 2] [--mlflow-uri URI]``;
progress on stderr, JSON on stdout (about 45 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from context_vs_hyperprior import add_budget_arguments, coding_times  # noqa: E402
from training_parity import ROI_QUALITY, Crops, load_split, our_curves, schedule, train_ours  # noqa: E402

from pipeline.codec.checkpoint import save_checkpoint  # noqa: E402
from pipeline.codec.models import build_model  # noqa: E402
from pipeline.eval.rd import curve_bd  # noqa: E402


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train and score one model (in a worker process, one thread); save its checkpoint."""
    torch.set_num_threads(1)
    torch.manual_seed(task["seed"])
    train, held_out = load_split("train"), load_split("held_out")
    model = build_model(task["variant"], N=task["N"], M=task["M"], n_rates=task["n_rates"], **task["config"])
    t0 = time.perf_counter()
    train_ours(model, Crops(train, task["seed"]), schedule(task["steps"], task["finetune"]), task["lambdas"],
               task["variant"])
    out = {"variant": task["variant"], "config": model.config, "train_s": round(time.perf_counter() - t0, 1),
           "parameters": sum(p.numel() for p in model.parameters()), "curves": our_curves(model, held_out)}
    save_checkpoint(model, task["save"])
    return out


def compare(sft: dict[str, list], swin: dict[str, list]) -> dict[str, float]:
    """BD-rate (%) and BD-PSNR (dB) of swin's curves against sft's: ROI PSNR at roi-quality 0.1, PSNR and
    ROI PSNR at uniform quality. A BD-rate is NaN where the PSNR ranges do not overlap; BD-PSNR
    needs overlapping rates only."""
    roi, uniform = curve_bd(sft["roi"], swin["roi"]), curve_bd(sft["uniform"], swin["uniform"])
    out = {"bd_rate_roi_psnr": roi["bd_rate_roi"], "bd_psnr_roi_psnr": roi["bd_psnr_roi"],
           "bd_rate_psnr_uniform": uniform["bd_rate_psnr"], "bd_psnr_uniform": uniform["bd_psnr_psnr"],
           "bd_rate_roi_psnr_uniform": uniform["bd_rate_roi"], "bd_psnr_roi_psnr_uniform": uniform["bd_psnr_roi"]}
    return {k: round(v, 2) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_budget_arguments(p)
    p.add_argument("--swin-depths", default="1,1,2,1", help="Swin blocks per analysis stage (default 1,1,2,1)")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="swin-bench-"))
    common = {"N": args.N, "M": args.M, "n_rates": args.n_rates, "steps": args.steps, "finetune": args.finetune,
              "seed": 0, "lambdas": (args.alpha_low, args.alpha_high)}
    configs = {"sft": {}, "swin": {"depths": [int(d) for d in args.swin_depths.split(",")]}}
    tasks = [{**common, "variant": v, "config": c, "save": str(tmp / f"{v}.pt")} for v, c in configs.items()]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = {r["variant"]: r for r in pool.map(run_task, tasks)}
    torch.set_num_threads(args.threads)
    times = coding_times({t["variant"]: t["save"] for t in tasks})
    out = {**{k: v for k, v in common.items() if k != "seed"}, "swin_depths": configs["swin"]["depths"],
           "roi_quality": ROI_QUALITY, "wall_s": round(time.perf_counter() - t0, 1),
           **compare(results["sft"]["curves"], results["swin"]["curves"]),
           "train_time_ratio": round(results["swin"]["train_s"] / results["sft"]["train_s"], 2),
           "encode_time_ratio": round(times["swin"]["encode_s"] / times["sft"]["encode_s"], 2),
           "decode_time_ratio": round(times["swin"]["decode_s"] / times["sft"]["decode_s"], 2),
           "times": times, "models": results}
    if args.mlflow_uri:
        from pipeline.train import tracking

        keys = ("bd_rate_roi_psnr", "bd_psnr_roi_psnr", "bd_rate_psnr_uniform", "bd_psnr_uniform",
                "bd_rate_roi_psnr_uniform", "bd_psnr_roi_psnr_uniform", "train_time_ratio", "encode_time_ratio",
                "decode_time_ratio")
        rows = [(k, out[k], args.steps) for k in keys if math.isfinite(out[k])]
        params = {k: v for k, v in common.items() if k != "lambdas"} | {"swin_depths": args.swin_depths}
        out["mlflow_run_id"] = tracking.log_benchmark(args.mlflow_uri, f"swin-vs-sft-{args.steps}steps", params, rows,
                                                      out, "swin_vs_sft.json")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
