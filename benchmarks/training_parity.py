"""Training parity: does our multi-rate ROI training keep up with CompressAI's recipe?

On the same real photos (scikit-image's sample images, :mod:`pipeline.data.photos`: 12 to
train on, 7 held out) and the same total steps:

- one variable-rate model of each variant (``tlic``, ``sft``, ``tma``), trained the way
  our jobs train (random rate point and non-ROI value per step, lambda map
  ``alpha * exp(omega * m)`` on saliency masks), scored at uniform quality;
- CompressAI's ``MeanScaleHyperprior`` (the same transforms and hyperprior) trained
  separately at each of the rate points' lambdas, the steps split evenly among them;
- with ``--warm-steps``, ``tma`` warm-started from the middle-lambda MeanScaleHyperprior
  (:mod:`pipeline.codec.warm_start`) and fine-tuned for that many steps of our recipe.

Both follow the demo's CPU schedule: 64 px crops (batch 8, lr 1e-3, the last 20% at
lr / 10), then ``--finetune`` steps on 128 px crops (batch 4, lr 1e-4). Scores come from
real files on the held-out photos: BD-rate on PSNR of each variant at uniform quality
against the MeanScaleHyperprior curve (target: at most +10%), and the ROI knob, BD-rate
on ROI PSNR at roi-quality 0.1 against the same model at uniform quality (target: at
most -25%; the ROI is the spectral-residual saliency map binarised at 0.5).
The MeanScaleHyperprior's bytes are its entropy-coded strings; ours are whole ``.roic``
files (header included).

Usage: ``python benchmarks/training_parity.py [--steps 4400] [--jobs 2] [--mlflow-uri URI]``;
prints progress on stderr and JSON on stdout (about 40 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.codec.models import build_model  # noqa: E402
from pipeline.codec.warm_start import warm_started  # noqa: E402
from pipeline.data.photos import photos  # noqa: E402
from pipeline.eval.evaluate import learned_point, quantize8, quality  # noqa: E402
from pipeline.eval.rd import curve_bd  # noqa: E402
from pipeline.masks.saliency import get_saliency_model  # noqa: E402
from pipeline.train.loss import ROIRateDistortionLoss, rate_lambdas  # noqa: E402
from pipeline.train.steps import StepSettings, learning_rate, make_optimizers, set_learning_rate, train_step  # noqa: E402

RATES = (0.0, 0.25, 0.5, 0.75, 1.0)
ROI_QUALITY = 0.1
TARGET_PARITY, TARGET_ROI = 10.0, -25.0


def _tensor(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.array(arr))  # a writable copy
    return (t.permute(2, 0, 1).float() / 255.0 if t.ndim == 3 else t.float())[None]


def load_split(split: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, image (1,3,H,W), saliency (1,1,H,W)) of every photo of ``split``."""
    saliency = get_saliency_model()
    return [(name, _tensor(arr), _tensor(saliency(arr))[:, None]) for name, arr in photos(split).items()]


class Crops:
    """Random crops (flipped half the time) of a list of differently sized images, seeded."""

    def __init__(self, data: list[tuple[str, torch.Tensor, torch.Tensor]], seed: int) -> None:
        self.data, self.gen = data, torch.Generator().manual_seed(seed)

    def __call__(self, batch: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ms = [], []
        for _ in range(batch):
            _, x, m = self.data[int(torch.randint(len(self.data), (1,), generator=self.gen))]
            h, w = x.shape[-2:]
            top = int(torch.randint(h - crop + 1, (1,), generator=self.gen))
            left = int(torch.randint(w - crop + 1, (1,), generator=self.gen))
            x, m = x[..., top:top + crop, left:left + crop], m[..., top:top + crop, left:left + crop]
            if bool(torch.rand(1, generator=self.gen) < 0.5):
                x, m = x.flip(-1), m.flip(-1)
            xs.append(x)
            ms.append(m)
        return torch.cat(xs), torch.cat(ms)


def schedule(steps: int, finetune: int) -> list[tuple[int, int, int, float, float]]:
    """Stages of (steps, batch, crop, lr, lr_drop): the demo's two-stage CPU schedule."""
    finetune = min(finetune, steps // 2)
    return [(steps - finetune, 8, 64, 1e-3, 0.2), (finetune, 4, 128, 1e-4, 0.0)]


def _progress(name: str, done: int, total: int, t0: float) -> None:
    if done % 500 == 0 or done == total:
        print(f"[{name}] step {done}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


def train_ours(model, crops: Crops, stages, lambdas: tuple[float, float], name: str) -> None:
    """Our recipe (``train_step``: random rate point and non-ROI value, ROI lambda map)."""
    settings = StepSettings(n_rates=model.n_rates, lambda_low=lambdas[0], lambda_high=lambdas[1])
    loss_fn = ROIRateDistortionLoss(omega=3.0, normalize="roi")
    optimizer, aux_optimizer = make_optimizers(model, 1e-3, 1e-2)
    rng, total, done, t0 = random.Random(0), sum(s[0] for s in stages), 0, time.perf_counter()
    model.train()
    for steps, batch, crop, lr, drop in stages:
        for step in range(steps):
            set_learning_rate(optimizer, learning_rate(step, steps, lr, drop))
            x, m = crops(batch, crop)
            train_step(model, x, m, loss_fn, optimizer, aux_optimizer, settings, rng)
            done += 1
            _progress(name, done, total, t0)
    model.eval().update(force=True)


def train_compressai(net, crops: Crops, stages, lmbda: float, name: str) -> None:
    """CompressAI's recipe: its ``RateDistortionLoss`` at one lambda, the same optimisers and clipping."""
    from compressai.losses import RateDistortionLoss

    main = [p for n, p in net.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in net.named_parameters() if n.endswith(".quantiles")]
    optimizer, aux_optimizer = torch.optim.Adam(main, lr=1e-3), torch.optim.Adam(aux, lr=1e-2)
    criterion = RateDistortionLoss(lmbda=lmbda)
    total, done, t0 = sum(s[0] for s in stages), 0, time.perf_counter()
    net.train()
    for steps, batch, crop, lr, drop in stages:
        for step in range(steps):
            set_learning_rate(optimizer, learning_rate(step, steps, lr, drop))
            x, _ = crops(batch, crop)
            optimizer.zero_grad(set_to_none=True)
            criterion(net(x), x)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(main, 1.0)
            optimizer.step()
            aux_optimizer.zero_grad(set_to_none=True)
            net.aux_loss().backward()
            aux_optimizer.step()
            done += 1
            _progress(name, done, total, t0)
    net.eval().update(force=True)


def our_curves(model, held_out) -> dict[str, list[dict[str, float]]]:
    """Mean bpp (real files), PSNR and ROI PSNR over the held-out photos at each rate."""
    curves = {}
    for setting, q in (("uniform", 1.0), ("roi", ROI_QUALITY)):
        points = []
        for rate in RATES:
            rows = [learned_point(model, x, m, q, rate, eval_mask=(m >= 0.5).float()) for _, x, m in held_out]
            points.append({k: float(np.mean([r[k] for r in rows])) for k in ("bpp", "psnr", "roi_psnr")}
                          | {"rate": rate})
        curves[setting] = points
    return curves


@torch.no_grad()
def compressai_point(net, held_out) -> dict[str, float]:
    """The MeanScaleHyperprior's mean bpp (its strings) and PSNR over the held-out photos."""
    from pipeline.codec.models import pad_to_multiple

    rows = []
    for _, x, m in held_out:
        h, w = x.shape[-2:]
        enc = net.compress(pad_to_multiple(x, 64))
        x_hat = quantize8(net.decompress(enc["strings"], enc["shape"])["x_hat"][..., :h, :w])
        bits = 8 * sum(len(s[0]) for s in enc["strings"])
        rows.append({"bpp": bits / (h * w), **quality(x, x_hat, (m >= 0.5).float())})
    return {k: float(np.mean([r[k] for r in rows])) for k in ("bpp", "psnr", "roi_psnr")}


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train and score one model (runs in a worker process, one thread)."""
    from compressai.models import MeanScaleHyperprior

    torch.set_num_threads(1)
    torch.manual_seed(task["seed"])
    train, held_out = load_split("train"), load_split("held_out")
    crops = Crops(train, task["seed"])
    stages = schedule(task["steps"], task["finetune"])
    t0 = time.perf_counter()
    out: dict[str, Any] = {"name": task["name"], "steps": sum(s[0] for s in stages)}
    if task["kind"] == "compressai":
        net = MeanScaleHyperprior(task["N"], task["M"])
        train_compressai(net, crops, stages, task["lambda"], task["name"])
        out["train_s"] = round(time.perf_counter() - t0, 1)
        out["point"] = compressai_point(net, held_out) | {"lambda": task["lambda"]}
        if task.get("save"):
            torch.save(net.state_dict(), task["save"])
        return out
    if task.get("init"):
        lambdas = rate_lambdas(task["n_rates"], *task["lambdas"])
        model, report = warm_started(task["variant"], task["init"], lambdas, task["init_lambda"], N=task["N"],
                                     M=task["M"])
        out["warm_start"] = {"fresh": report.fresh, "rate_point": report.rate_point}
    else:
        model = build_model(task["variant"], N=task["N"], M=task["M"], n_rates=task["n_rates"])
    train_ours(model, crops, stages, task["lambdas"], task["name"])
    out["train_s"] = round(time.perf_counter() - t0, 1)
    out["curves"] = our_curves(model, held_out)
    return out


def _bd(anchor: list[dict[str, float]], test: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in curve_bd(anchor, test).items() if k.startswith("bd_rate")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4400, help="total steps per comparison (the demo's 4400)")
    p.add_argument("--finetune", type=int, default=800, help="of which on 128 px crops at the end (default 800)")
    p.add_argument("--variants", default="tlic,sft,tma", help="comma-separated variants (default tlic,sft,tma)")
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--M", type=int, default=96)
    p.add_argument("--n-rates", type=int, default=3, help="rate points = MeanScaleHyperprior lambdas (default 3)")
    p.add_argument("--alpha-low", type=float, default=0.0035)
    p.add_argument("--alpha-high", type=float, default=0.0483)
    p.add_argument("--warm-steps", type=int, default=1100,
                   help="steps of a tma warm-started from the middle-lambda MeanScaleHyperprior (0: skip)")
    p.add_argument("--jobs", type=int, default=2, help="models trained in parallel, one thread each")
    p.add_argument("--mlflow-uri", help="log the JSON and BD numbers to this MLflow store")
    args = p.parse_args(argv)
    if args.n_rates < 2:
        p.error("--n-rates must be at least 2 (a curve per model)")

    lambdas = rate_lambdas(args.n_rates, args.alpha_low, args.alpha_high)
    common = {"N": args.N, "M": args.M, "n_rates": args.n_rates, "finetune": args.finetune, "seed": 0,
              "lambdas": (args.alpha_low, args.alpha_high)}
    variants = [v for v in args.variants.split(",") if v]
    tmp = Path(tempfile.mkdtemp(prefix="parity-"))
    middle = len(lambdas) // 2
    per_lambda = args.steps // len(lambdas)
    tasks = [{**common, "kind": "compressai", "name": f"msh@{lam:.4g}", "lambda": lam, "steps": per_lambda,
              "finetune": args.finetune // len(lambdas), "save": str(tmp / "msh.pth") if i == middle else None}
             for i, lam in enumerate(lambdas)]
    tasks += [{**common, "kind": "ours", "name": v, "variant": v, "steps": args.steps} for v in variants]
    out: dict[str, Any] = {"steps": args.steps, "finetune": args.finetune, "N": args.N, "M": args.M,
                           "lambdas": lambdas, "roi_quality": ROI_QUALITY, "rates": list(RATES),
                           "targets": {"bd_rate_psnr_vs_compressai": TARGET_PARITY, "bd_rate_roi_knob": TARGET_ROI}}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = {r["name"]: r for r in pool.map(run_task, tasks)}
        if args.warm_steps > 0:
            warm = {**common, "kind": "ours", "name": "tma-warm", "variant": "tma", "steps": args.warm_steps,
                    "finetune": min(args.finetune, args.warm_steps // 2), "init": str(tmp / "msh.pth"),
                    "init_lambda": lambdas[middle]}
            results["tma-warm"] = next(pool.map(run_task, [warm]))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    anchor = [results[t["name"]]["point"] for t in tasks if t["kind"] == "compressai"]
    out["compressai"] = anchor
    out["train_s"] = {name: r["train_s"] for name, r in results.items()}
    out["variants"] = {}
    for name, r in results.items():
        if "curves" not in r:
            continue
        parity = _bd(anchor, r["curves"]["uniform"])["bd_rate_psnr"]
        knob = _bd(r["curves"]["uniform"], r["curves"]["roi"])["bd_rate_roi"]
        out["variants"][name] = {"steps": r["steps"], "bd_rate_psnr_vs_compressai": parity,
                                 "bd_rate_roi_knob": knob, "parity_met": bool(parity <= TARGET_PARITY),
                                 "knob_met": bool(knob <= TARGET_ROI), "curves": r["curves"],
                                 **({"warm_start": r["warm_start"]} if "warm_start" in r else {})}
    if args.mlflow_uri:
        from pipeline.train import tracking

        rows = [(f"{name}/{k}", v, args.steps) for name, r in out["variants"].items()
                for k, v in r.items() if k.startswith("bd_rate") and math.isfinite(v)]
        out["mlflow_run_id"] = tracking.log_benchmark(args.mlflow_uri, f"training-parity-{args.steps}steps",
                                                      {k: out[k] for k in ("steps", "finetune", "N", "M")}, rows,
                                                      out, "training_parity.json")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
