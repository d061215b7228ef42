"""One optimisation step of a codec variant, shared by every training loop."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from pipeline.codec.models import ROICodec
from pipeline.masks.ops import assign_nonroi_value
from pipeline.train.loss import ROIRateDistortionLoss, rate_lambdas


def make_optimizers(model: ROICodec, lr: float = 1e-4, aux_lr: float = 1e-3
                    ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Adam for the network, Adam for the entropy bottleneck's quantiles (CompressAI's split)."""
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    return torch.optim.Adam(main, lr=lr), torch.optim.Adam(aux, lr=aux_lr)


@dataclass
class StepSettings:
    """What a step samples: a rate point per batch and a non-ROI value per image."""

    n_rates: int
    lambda_low: float = 0.0035
    lambda_high: float = 0.0483
    min_roi_quality: float = 0.0
    max_roi_quality: float = 1.0
    uniform_fraction: float = 0.25  # share of images trained with Q = 1 (ROI off)
    clip_norm: float = 1.0
    rate_points: tuple[int, ...] | None = None  # the rate points a batch draws from (None: all)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_roi_quality <= self.max_roi_quality <= 1.0:
            raise ValueError(f"need 0 <= roi-quality range low <= high <= 1, got "
                             f"{self.min_roi_quality}, {self.max_roi_quality}")
        if not 0.0 <= self.uniform_fraction <= 1.0:
            raise ValueError(f"uniform fraction must be in [0, 1], got {self.uniform_fraction}")
        if self.rate_points is not None:
            self.rate_points = tuple(int(r) for r in self.rate_points)
            if not self.rate_points or not all(0 <= r < self.n_rates for r in self.rate_points):
                raise ValueError(f"rate points must be among 0..{self.n_rates - 1}, got {list(self.rate_points)}")


def learning_rate(step: int, total: int, lr: float, drop_fraction: float) -> float:
    """The step schedule: ``lr``, then ``lr / 10`` for the last ``drop_fraction`` of ``total`` steps.

    A function of the step alone, so a resumed run picks up the same schedule.
    """
    return lr / 10 if step >= total * (1.0 - drop_fraction) else lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def sample_knobs(settings: StepSettings, batch: int, rng: random.Random
                 ) -> tuple[int, torch.Tensor]:
    """A random rate point for the batch and a random non-ROI value Q for each image."""
    points = settings.rate_points
    rate_index = rng.choice(points) if points else rng.randrange(settings.n_rates)
    q = [1.0 if rng.random() < settings.uniform_fraction
         else rng.uniform(settings.min_roi_quality, settings.max_roi_quality) for _ in range(batch)]
    return rate_index, torch.tensor(q)


def train_step(model: ROICodec, x: torch.Tensor, mask: torch.Tensor, loss_fn: ROIRateDistortionLoss,
               optimizer: torch.optim.Optimizer, aux_optimizer: torch.optim.Optimizer,
               settings: StepSettings, rng: random.Random, amp: bool = False) -> dict[str, float]:
    """Sample the knobs, take one RD step and one auxiliary (quantile) step; return metrics.

    ``amp`` runs the transforms in bfloat16 autocast (GPU); the entropy models always
    run in float32 (see :meth:`ROICodec.forward`), and bf16 needs no loss scaling.
    """
    rate_index, q = sample_knobs(settings, x.shape[0], rng)
    q = q.to(x.device)
    rate = rate_index / max(settings.n_rates - 1, 1)
    alpha = rate_lambdas(settings.n_rates, settings.lambda_low, settings.lambda_high)[rate_index]
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, enabled=amp, dtype=torch.bfloat16):
        out = model(x, mask, q, rate)
    out["x_hat"] = out["x_hat"].float()
    losses = loss_fn(out, x, assign_nonroi_value(mask, q), alpha)
    losses["loss"].backward()
    if settings.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
    optimizer.step()
    aux_optimizer.zero_grad(set_to_none=True)
    aux = model.aux_loss()
    aux.backward()
    aux_optimizer.step()
    metrics = {k: float(v.detach()) for k, v in losses.items()}
    metrics.update(aux_loss=float(aux.detach()), rate_index=float(rate_index))
    return metrics
