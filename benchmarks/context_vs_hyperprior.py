"""Context entropy model against the hyperprior: same variant, data, steps and lambdas.

Two models of one variant (``tma`` by default), identical but for ``entropy=`` (``hyperprior``
or ``context``: channel groups with a checkerboard context, :mod:`pipeline.codec.latent.context`), are
trained with the same seed on the demo's photos and CPU schedule (``benchmarks/training_parity.py``:
scikit-image's photos, 12 to train on, 7 held out; 64 px crops then 128 px crops). Scored from
real ``.roic`` files on the held-out photos: BD-rate of context against hyperprior on PSNR at
uniform quality and on ROI PSNR at roi-quality 0.1 (target: at most -5%), and the encode and
decode time of each on the same images (target: the context model's decode at most 2x the
hyperprior's on CPU).

Usage: ``python benchmarks/context_vs_hyperprior.py [--variant tma] [--steps 4400] [--jobs 2]
[--mlflow-uri URI]``; progress on stderr, JSON on stdout (about 25 minutes on 2 cores).
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

from training_parity import ROI_QUALITY, Crops, _bd, load_split, our_curves, schedule, train_ours  # noqa: E402

from pipeline.codec.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.codec.coding import decode, encode  # noqa: E402
from pipeline.codec.models import ENTROPY_MODELS, build_model  # noqa: E402

TARGET_BD, TARGET_DECODE_RATIO = -5.0, 2.0


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train and score one model (in a worker process, one thread); save its checkpoint."""
    torch.set_num_threads(1)
    torch.manual_seed(task["seed"])
    train, held_out = load_split("train"), load_split("held_out")
    extra = {"context_hidden": task["context_hidden"]} if task["entropy"] == "context" else {}
    model = build_model(task["variant"], N=task["N"], M=task["M"], n_rates=task["n_rates"], entropy=task["entropy"],
                        **extra)
    t0 = time.perf_counter()
    train_ours(model, Crops(train, task["seed"]), schedule(task["steps"], task["finetune"]), task["lambdas"],
               task["entropy"])
    out = {"entropy": task["entropy"], "train_s": round(time.perf_counter() - t0, 1),
           "parameters": sum(p.numel() for p in model.parameters()), "curves": our_curves(model, held_out)}
    save_checkpoint(model, task["save"])
    return out


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """The options two-model comparisons on the demo's budget share: schedule, size, lambdas, processes."""
    p.add_argument("--steps", type=int, default=4400, help="steps per model (the demo's 4400)")
    p.add_argument("--finetune", type=int, default=800, help="of which on 128 px crops at the end (default 800)")
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--M", type=int, default=96)
    p.add_argument("--n-rates", type=int, default=3)
    p.add_argument("--alpha-low", type=float, default=0.0035)
    p.add_argument("--alpha-high", type=float, default=0.0483)
    p.add_argument("--jobs", type=int, default=2, help="models trained in parallel, one thread each")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the timing (default 2)")
    p.add_argument("--mlflow-uri", help="log the JSON and the BD-rates to this MLflow store")


def coding_times(paths: dict[str, str], repeats: int = 3) -> dict[str, dict[str, float]]:
    """Seconds to encode and decode every held-out photo (uniform quality, top rate), the best
    of ``repeats`` rounds, the models taking turns so both see the same machine load."""
    images = [x for _, x, _ in load_split("held_out")]
    models = {name: load_checkpoint(path) for name, path in paths.items()}
    files = {name: [encode(m, x) for x in images] for name, m in models.items()}
    best: dict[str, dict[str, float]] = {name: {"encode_s": math.inf, "decode_s": math.inf} for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            for x in images:
                encode(model, x)
            t1 = time.perf_counter()
            for data in files[name]:
                decode(model, data)
            t2 = time.perf_counter()
            best[name]["encode_s"] = min(best[name]["encode_s"], t1 - t0)
            best[name]["decode_s"] = min(best[name]["decode_s"], t2 - t1)
    return {name: {k: round(v, 3) for k, v in t.items()} for name, t in best.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tma", help="codec variant (default tma, the demo's)")
    add_budget_arguments(p)
    p.add_argument("--context-hidden", type=int, help="width of the context model's channel context (default N)")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="context-bench-"))
    common = {"variant": args.variant, "N": args.N, "M": args.M, "n_rates": args.n_rates, "steps": args.steps,
              "finetune": args.finetune, "seed": 0, "lambdas": (args.alpha_low, args.alpha_high),
              "context_hidden": args.context_hidden or args.N}
    tasks = [{**common, "entropy": e, "save": str(tmp / f"{e}.pt")} for e in ENTROPY_MODELS]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = {r["entropy"]: r for r in pool.map(run_task, tasks)}
    torch.set_num_threads(args.threads)
    times = coding_times({t["entropy"]: t["save"] for t in tasks})
    hyper, context = results["hyperprior"], results["context"]
    bd_psnr = _bd(hyper["curves"]["uniform"], context["curves"]["uniform"])["bd_rate_psnr"]
    bd_roi = _bd(hyper["curves"]["roi"], context["curves"]["roi"])["bd_rate_roi"]
    decode_ratio = round(times["context"]["decode_s"] / times["hyperprior"]["decode_s"], 2)
    out = {**{k: v for k, v in common.items() if k != "seed"}, "roi_quality": ROI_QUALITY,
           "wall_s": round(time.perf_counter() - t0, 1),
           "bd_rate_psnr_uniform": bd_psnr, "bd_rate_roi_psnr": bd_roi,
           "decode_time_ratio": decode_ratio,
           "encode_time_ratio": round(times["context"]["encode_s"] / times["hyperprior"]["encode_s"], 2),
           "targets": {"bd_rate": TARGET_BD, "decode_time_ratio": TARGET_DECODE_RATIO},
           "bd_met": bool(bd_psnr <= TARGET_BD and bd_roi <= TARGET_BD),
           "decode_time_met": bool(decode_ratio <= TARGET_DECODE_RATIO),
           "times": times, "models": results}
    if args.mlflow_uri:
        from pipeline.train import tracking

        rows = [(k, out[k], args.steps) for k in ("bd_rate_psnr_uniform", "bd_rate_roi_psnr", "decode_time_ratio",
                                                  "encode_time_ratio") if math.isfinite(out[k])]
        out["mlflow_run_id"] = tracking.log_benchmark(
            args.mlflow_uri, f"context-vs-hyperprior-{args.variant}-{args.steps}steps-hidden{common['context_hidden']}",
            {k: v for k, v in common.items() if k != "lambdas"}, rows, out, "context_vs_hyperprior.json")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
