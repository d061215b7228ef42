"""The perceptual stage's training step and its discriminator's checkpoint.

A step (:meth:`PerceptualStage.step`) samples the knobs as the MSE stage does (a rate point
per batch, a non-ROI value Q per image), then

1. the codec's step on :class:`~pipeline.train.perceptual.losses.PerceptualLoss` with the
   discriminator frozen (its gradients reach the codec through ``x_hat`` only); the MSE term
   is weighted by the effective mask ``delta`` (the ROI, the background at Q), the L1 terms
   split by the ROI mask; the rate weight is per rate point, ``MSE_REFERENCE / (alpha 255^2)``,
   so that with the default MSE weight each rate point keeps the first stage's rate/MSE balance;
2. the discriminator's step on real and decoded crops (one forward of both, so it runs under
   DDP), whose logits also give its accuracy;
3. the entropy bottleneck's auxiliary step.

For the first ``disc_warmup`` steps of the stage (counted from the step it started at, kept in
``discriminator.pt``) only the discriminator trains, on the frozen codec's decoded crops: a fresh
discriminator against a trained codec is at chance, and its gradients would only be noise to
the codec (on 2 CPU cores the stage's discriminator stayed at chance for 600 joint steps).

``discriminator.pt`` (next to ``model.pt`` and ``train_state.pt`` in every checkpoint folder):
the discriminator's weights, its Adam state and its shape, so a restarted worker resumes both
networks. A run that starts from an MSE checkpoint starts a fresh discriminator.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.masks.ops import assign_nonroi_value
from pipeline.train.loss import rate_lambdas
from pipeline.train.perceptual.discriminator import UNetDiscriminator
from pipeline.train.perceptual.losses import PerceptualLoss, PerceptualWeights
from pipeline.train.steps import StepSettings, sample_knobs

DISC_FILE = "discriminator.pt"
STAGES = ("mse", "perceptual")
MSE_REFERENCE = PerceptualWeights().mse  # the MSE weight at which the rate/MSE balance is the MSE stage's


def perceptual_weights(overrides: dict[str, float] | None) -> PerceptualWeights:
    """The default weights with ``overrides`` (keys of :class:`PerceptualWeights`); ValueError
    naming an unknown key or a negative weight."""
    overrides = dict(overrides or {})
    known = asdict(PerceptualWeights())
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown perceptual loss weight {key!r} (known: {', '.join(known)})")
        if not float(value) >= 0:
            raise ValueError(f"perceptual loss weight {key} must be >= 0, got {value}")
    return PerceptualWeights(**{k: float(v) for k, v in {**known, **overrides}.items()})


@dataclass
class DiscriminatorShape:
    """What builds the discriminator (saved with it)."""

    latent_ch: int
    base: int = 32
    depth: int = 4

    def build(self) -> UNetDiscriminator:
        return UNetDiscriminator(3, self.latent_ch, self.base, self.depth)


def real_fake_logits(disc: nn.Module, y_hat: torch.Tensor, x_hat: torch.Tensor, x: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The discriminator's (global, pixel) logits of the decoded crops then the originals, in
    one forward (codec outputs detached)."""
    y = y_hat.detach()
    return disc(torch.cat([y, y]), torch.cat([x_hat.detach(), x]))


def discriminator_step(disc: nn.Module, optimizer: torch.optim.Optimizer, y_hat: torch.Tensor,
                       x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """One step on ``-log(1 - D(y_hat, x_hat)) - log D(y_hat, x)`` (both heads); its loss and
    the global head's accuracy on this batch (before the step)."""
    b = x.shape[0]
    optimizer.zero_grad(set_to_none=True)
    global_logits, pixel_logits = real_fake_logits(disc, y_hat, x_hat, x)
    loss = x.new_zeros(())
    for logits in (global_logits, pixel_logits):
        labels = torch.cat([torch.zeros_like(logits[:b]), torch.ones_like(logits[b:])])
        # the mean over each half, summed: as discriminator_loss
        loss = loss + 2 * F.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        right = (global_logits[:b] < 0).sum() + (global_logits[b:] > 0).sum()
    return {"disc_loss": float(loss.detach()), "disc_accuracy": float(right) / (2 * b)}


class PerceptualStage:
    """The second stage of one worker: the loss, the discriminator (and its DDP wrapper) and
    its optimiser. ``config`` is the training loop's (``loss_weights``, ``vgg_losses``,
    ``vgg_weights``, ``disc_lr``, ``disc_width``, ``disc_warmup``)."""

    def __init__(self, config: dict[str, Any], latent_ch: int, device: torch.device,
                 saved: dict[str, Any] | None = None) -> None:
        self.loss = PerceptualLoss(perceptual_weights(config.get("loss_weights")), vgg=bool(config.get("vgg_losses")),
                                   vgg_weights=config.get("vgg_weights")).to(device)
        self.shape = DiscriminatorShape(latent_ch, int(config.get("disc_width") or 32))
        if saved is not None:
            self.shape = DiscriminatorShape(**saved["shape"])
        torch.manual_seed(int(config.get("seed", 0)) + 1)
        self.disc = self.shape.build().to(device)
        self.optimizer = torch.optim.Adam(self.disc.parameters(), lr=float(config.get("disc_lr") or 1e-4),
                                          betas=(0.5, 0.999))
        self.warmup = int(config.get("disc_warmup") or 0)
        self.resumed_step = None
        self.first_step: int | None = None  # the step the stage started at (the MSE checkpoint's)
        if saved is not None:
            self.disc.load_state_dict(saved["state_dict"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.resumed_step = int(saved["step"])
            self.first_step = saved.get("first_step")
        self.disc_net: nn.Module = self.disc

    def prepare(self) -> None:
        """Wrap the discriminator for DDP (``ray.train.torch.prepare_model``)."""
        import ray.train.torch

        self.disc_net = ray.train.torch.prepare_model(self.disc, move_to_device=False)

    def warming_up(self, step: int) -> bool:
        """Whether ``step`` (0-based, the run's) only trains the discriminator."""
        if self.first_step is None:
            self.first_step = step
        return step < self.first_step + self.warmup

    def step(self, net: nn.Module, x: torch.Tensor, mask: torch.Tensor, optimizer: torch.optim.Optimizer,
             aux_optimizer: torch.optim.Optimizer, settings: StepSettings, rng: random.Random,
             amp: bool = False, step: int = 0) -> dict[str, float]:
        """One codec step, one discriminator step, one auxiliary step; every term's value. During
        the warm-up (:meth:`warming_up`), the discriminator's step alone on the frozen codec."""
        rate_index, q = sample_knobs(settings, x.shape[0], rng)
        q = q.to(x.device)
        rate = rate_index / max(settings.n_rates - 1, 1)
        if self.warming_up(step):
            with torch.no_grad(), torch.autocast(x.device.type, enabled=amp, dtype=torch.bfloat16):
                out = net(x, mask, q, rate)
            metrics = discriminator_step(self.disc_net, self.optimizer, out["y_hat"].float(), out["x_hat"].float(), x)
            return {**metrics, "rate_index": float(rate_index)}
        alpha = rate_lambdas(settings.n_rates, settings.lambda_low, settings.lambda_high)[rate_index]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, enabled=amp, dtype=torch.bfloat16):
            out = net(x, mask, q, rate)
        out["x_hat"] = out["x_hat"].float()
        out["y_hat"] = out["y_hat"].float()
        self.disc.requires_grad_(False)
        losses = self.loss(out, x, mask, disc=self.disc if self.loss.weights.adv > 0 else None,
                           rate_scale=MSE_REFERENCE / (alpha * 255.0 ** 2), delta=assign_nonroi_value(mask, q))
        losses["loss"].backward()
        self.disc.requires_grad_(True)
        if settings.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), settings.clip_norm)
        optimizer.step()
        metrics = {k: float(v.detach()) for k, v in losses.items()}
        metrics.update(discriminator_step(self.disc_net, self.optimizer, out["y_hat"], out["x_hat"], x))
        aux_optimizer.zero_grad(set_to_none=True)
        aux = net.aux_loss()
        aux.backward()
        aux_optimizer.step()
        metrics.update(aux_loss=float(aux.detach()), rate_index=float(rate_index))
        return metrics

    def save(self, path: str | Path, step: int) -> None:
        """``discriminator.pt``: weights, Adam state, shape and step."""
        torch.save({"state_dict": self.disc.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "shape": asdict(self.shape), "step": step, "first_step": self.first_step}, path)


def load_discriminator_state(folder: str | Path) -> dict[str, Any] | None:
    """A checkpoint folder's ``discriminator.pt`` (data only), or None when it has none (an MSE
    checkpoint)."""
    path = Path(folder) / DISC_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
