"""A single-process training loop over in-memory images: the demo's and the tests' trainer.

The distributed Ray Train loop uses the same :func:`~pipeline.train.steps.train_step`;
this one exists for small jobs that need no cluster (a laptop demo, a test fixture, the
plain-PyTorch baseline of the training benchmark).
"""

from __future__ import annotations

import random
from typing import Callable

import torch
from tqdm import tqdm

from pipeline.codec.models import ROICodec
from pipeline.train.loss import ROIRateDistortionLoss
from pipeline.train.steps import StepSettings, learning_rate, make_optimizers, set_learning_rate, train_step


def random_crops(images: torch.Tensor, masks: torch.Tensor, batch: int, crop: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random crops (the same window for image and mask) from (N,3,H,W)/(N,1,H,W)."""
    n, _, h, w = images.shape
    if h < crop or w < crop:
        raise ValueError(f"images of {h}x{w} are smaller than the {crop}px crop")
    idx = torch.randint(0, n, (batch,), generator=gen)
    top = torch.randint(0, h - crop + 1, (batch,), generator=gen)
    left = torch.randint(0, w - crop + 1, (batch,), generator=gen)
    xs = [images[i, :, t:t + crop, lf:lf + crop] for i, t, lf in zip(idx, top, left)]
    ms = [masks[i, :, t:t + crop, lf:lf + crop] for i, t, lf in zip(idx, top, left)]
    flip = torch.rand(batch, generator=gen) < 0.5
    xs = [x.flip(-1) if f else x for x, f in zip(xs, flip)]
    ms = [m.flip(-1) if f else m for m, f in zip(ms, flip)]
    return torch.stack(xs), torch.stack(ms)


def train_local(model: ROICodec, images: torch.Tensor, masks: torch.Tensor, steps: int,
                batch: int = 8, crop: int = 64, lr: float = 1e-3, aux_lr: float = 1e-2,
                settings: StepSettings | None = None, loss_fn: ROIRateDistortionLoss | None = None,
                lr_drop: float = 0.0, seed: int = 0, progress: bool = False,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train ``model`` for ``steps`` steps on random crops; return the per-step metrics.

    The learning rate drops to ``lr / 10`` for the last ``lr_drop`` of the steps.

    Leaves the model in eval mode with its entropy-coding tables built.
    """
    settings = settings or StepSettings(n_rates=model.n_rates)
    loss_fn = loss_fn or ROIRateDistortionLoss()
    device = next(model.parameters()).device
    optimizer, aux_optimizer = make_optimizers(model, lr, aux_lr)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    history = []
    model.train()
    for step in tqdm(range(steps), desc=f"train {model.variant}", disable=not progress):
        x, m = random_crops(images, masks, batch, crop, gen)
        set_learning_rate(optimizer, learning_rate(step, steps, lr, lr_drop))
        metrics = train_step(model, x.to(device), m.to(device), loss_fn, optimizer, aux_optimizer,
                             settings, rng)
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    model.eval()
    model.update(force=True)
    return history
