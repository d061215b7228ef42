"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (Train V2 API).

Every worker:

1. builds the variant (same seed everywhere; DDP also broadcasts rank 0's weights),
   and, when Ray Train hands it a checkpoint (a restarted worker group after a
   failure, or a re-submitted run with the same name), loads the weights, both
   optimizers' states and the **step counter** from it;
2. wraps the model with :func:`ray.train.torch.prepare_model` (DDP when there are
   several workers). CompressAI specifics: the entropy bottleneck's ``quantiles``
   are trained by the separate aux loss, outside the DDP forward, so they are
   excluded from DDP's gradient sync (each worker trains its own copy; they are
   averaged before each checkpoint); buffers are not re-synced every forward
   (``forward_sync_buffers=False``: the CDF tables are buffers whose size changes
   with ``update()``, and there are no batch-norm statistics to share);
   ``aux_loss`` is forwarded from the DDP wrapper to the codec;
   ``find_unused_parameters`` (off by default: every parameter of tlic/sft/tma gets a
   gradient every step) can be turned on for a variant with branches a batch skips;
3. draws batches of crops from its shard of the ``train`` dataset (epoch after epoch
   until the step budget is spent) and takes :func:`~pipeline.train.steps.train_step`
   steps (bfloat16 autocast on GPU when ``amp`` is on);
4. every ``report_every`` steps calls ``ray.train.report`` with the mean metrics of
   the interval and the per-step ``history`` (the MLflow callback on the controller
   logs every step from it); every ``checkpoint_every`` steps and at the end, rank 0
   runs validation and writes a checkpoint directory:

   - ``model.pt``: :func:`~pipeline.codec.checkpoint.save_checkpoint` of a copy with
     its entropy-coding tables built (loadable by ``load_checkpoint`` and the CLI);
   - ``train_state.pt``: both optimizers' states, the step counter, the config;
   - ``discriminator.pt`` in the perceptual stage (``stage="perceptual"``, see
     :mod:`pipeline.train.perceptual.stage`): the discriminator and its optimizer.

Validation (rank 0, on the held-out centre crops the driver put in the object store
(``config["_val"]``, see :func:`pipeline.data.dataset.validation_crops`), eval mode, a copy
of the codec with ``update(force=True)``) measures, at each (roi_quality, rate) point
of ``val_points``: the estimated bpp from the likelihoods, PSNR, ROI and non-ROI PSNR,
the RD loss, and on the first ``val_encode_images`` crops the real bpp of
:func:`~pipeline.codec.coding.encode` bytes and the PSNR after ``decode``. These are
the RD points. ``val_loss`` (the mean RD loss over the points) ranks checkpoints.

Testing hook: ``fail_at_step`` makes rank 0 die (``os._exit(1)``) once, just before
that step, if the ``fail_marker`` file does not exist yet (it creates it first). It
first waits until the controller has processed every report, so the checkpoint the
restart resumes from is known; a real crash can come before the controller has
committed the last checkpoint, and the restart then uses the one before.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from pipeline.codec.checkpoint import (CODING_FORMATS, MODEL_FILE, check_fingerprint, checkpoint_state_dict,
                                       read_checkpoint, save_checkpoint)
from pipeline.codec.coding import bits_per_pixel as file_bpp
from pipeline.codec.coding import decode, encode
from pipeline.codec.models import ROICodec, build_model
from pipeline.eval.metrics import psnr, roi_psnr
from pipeline.masks.ops import assign_nonroi_value
from pipeline.train.loss import ROIRateDistortionLoss, bits_per_pixel
from pipeline.train.perceptual.stage import DISC_FILE, PerceptualStage, load_discriminator_state
from pipeline.train.steps import StepSettings, learning_rate, make_optimizers, set_learning_rate, train_step

if TYPE_CHECKING:
    import ray.train

STATE_FILE = "train_state.pt"
DEFAULT_VAL_POINTS = ((1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0))
DEFAULT_CHECKPOINT_EVERY = 500  # steps between checkpoints (TrainConfig's and jobs/train.py's default too)
DEFAULT_REPORT_EVERY = 10  # steps between reports


def point_name(roi_quality: float, rate: float) -> str:
    """Metric prefix of an RD point, e.g. ``rd/q0_r1``."""
    return f"rd/q{roi_quality:g}_r{rate:g}"


def rate_lambda(rate: float, low: float, high: float) -> float:
    """The lambda of a continuous rate position: geometric between the trained end points
    (equal to :func:`~pipeline.train.loss.rate_lambdas` at the trained points)."""
    return low * (high / low) ** rate


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


# -- validation ---------------------------------------------------------------------------------

@torch.no_grad()
def validate(model: ROICodec, images: torch.Tensor, masks: torch.Tensor,
             points: list[tuple[float, float]] | tuple[tuple[float, float], ...], loss_fn: ROIRateDistortionLoss,
             lambda_low: float, lambda_high: float, encode_images: int = 2, batch: int = 8
             ) -> tuple[dict[str, float], list[dict[str, float]], ROICodec]:
    """RD points of ``model`` on (N,3,H,W)/(N,1,H,W) crops in [0,1].

    Returns the flat metrics (``val_loss``, ``val_bpp``, ``val_psnr`` and per point
    ``rd/q{Q}_r{R}/...``), the RD points as a list of dicts, and the coding-ready copy
    (eval mode, tables built) that was measured.
    """
    coder = copy.deepcopy(model).eval()
    coder.update(force=True)
    device = next(coder.parameters()).device
    rd: list[dict[str, float]] = []
    for q, r in points:
        alpha = rate_lambda(r, lambda_low, lambda_high)
        sums = {"bpp_est": 0.0, "psnr": 0.0, "loss": 0.0}
        roi_vals, nonroi_vals = [], []
        n = images.shape[0]
        for i in range(0, n, batch):
            x = images[i:i + batch].to(device)
            m = masks[i:i + batch].to(device)
            out = coder(x, m, q, r)
            x_hat = out["x_hat"].clamp(0, 1)
            b, _, h, w = x.shape
            sums["bpp_est"] += float(bits_per_pixel(out["likelihoods"], b * h * w)) * b
            sums["loss"] += float(loss_fn({**out, "x_hat": out["x_hat"].float()}, x,
                                          assign_nonroi_value(m, q), alpha)["loss"]) * b
            for j in range(b):
                sums["psnr"] += psnr(x_hat[j:j + 1].cpu(), x[j:j + 1].cpu())
                roi, nonroi = roi_psnr(x_hat[j:j + 1].cpu(), x[j:j + 1].cpu(), m[j:j + 1].cpu())
                if not math.isnan(roi):
                    roi_vals.append(roi)
                if not math.isnan(nonroi):
                    nonroi_vals.append(nonroi)
        point = {"roi_quality": float(q), "rate": float(r), **{k: v / n for k, v in sums.items()},
                 "roi_psnr": sum(roi_vals) / len(roi_vals) if roi_vals else float("nan"),
                 "nonroi_psnr": sum(nonroi_vals) / len(nonroi_vals) if nonroi_vals else float("nan")}
        coded_bpp, coded_psnr = [], []
        for j in range(min(encode_images, n)):
            x, m = images[j:j + 1], masks[j:j + 1]
            data = encode(coder, x, m, q, r)
            coded_bpp.append(file_bpp(data, x.shape[-1], x.shape[-2]))
            coded_psnr.append(psnr(decode(coder, data), x))
        if coded_bpp:
            point["bpp"] = sum(coded_bpp) / len(coded_bpp)
            point["psnr_decoded"] = sum(coded_psnr) / len(coded_psnr)
        rd.append(point)
    metrics: dict[str, float] = {
        "val_loss": sum(p["loss"] for p in rd) / len(rd),
        "val_bpp": sum(p["bpp_est"] for p in rd) / len(rd),
        "val_psnr": sum(p["psnr"] for p in rd) / len(rd),
    }
    for p in rd:
        prefix = point_name(p["roi_quality"], p["rate"])
        for k, v in p.items():
            if k not in ("roi_quality", "rate"):
                metrics[f"{prefix}/{k}"] = v
    return metrics, rd, coder


def _load_val(config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The validation crops the driver put in the object store (``config["_val"]``)."""
    import ray

    ref = config.get("_val")
    if ref is None:
        return None
    arrays = ray.get(ref)
    if arrays["image"].shape[0] == 0:
        return None
    return (torch.from_numpy(arrays["image"]).float() / 255.0, torch.from_numpy(arrays["mask"]).float() / 255.0)


# -- checkpoints --------------------------------------------------------------------------------

def load_training_checkpoint(directory: str | Path, model: ROICodec) -> dict[str, Any]:
    """Load ``model.pt`` weights into ``model`` (checked as :func:`load_checkpoint` checks them:
    a damaged file is a ``CheckpointError``); return the ``train_state.pt`` dict."""
    directory = Path(directory)
    blob = read_checkpoint(directory / MODEL_FILE)
    if blob["variant"] != model.variant:
        raise ValueError(f"checkpoint holds variant {blob['variant']!r}, training {model.variant!r}")
    # a run started before checkpoint format 2 resumes too: the coding state it lacks is
    # derived, and rebuilt by the next checkpoint's update()
    saved = checkpoint_state_dict(blob)
    model.load_state_dict(saved, strict=blob["format"] in CODING_FORMATS)
    check_fingerprint(model, blob, directory / MODEL_FILE)
    # optimizer states, the step and the run's config: data, never code
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    saved = model.upgrade_state_dict(saved)
    if list(saved) != list(model.state_dict()):  # another parameter order: a run from before the parts
        params = [n for n, _ in model.named_parameters()]
        old = [n for n in saved if n in set(params)]
        for key, aux in (("optimizer", False), ("aux_optimizer", True)):
            if key in state:
                pick = [n for n in params if n.endswith(".quantiles") == aux]
                state[key] = reorder_optimizer_state(state[key], [n for n in old if n in set(pick)], pick)
    return state


def reorder_optimizer_state(state: dict[str, Any], saved_order: list[str], order: list[str]) -> dict[str, Any]:
    """An optimizer state dict (one parameter group, by position) saved for parameters in
    ``saved_order``, for the same parameters in ``order``."""
    if sorted(saved_order) != sorted(order) or len(state["param_groups"]) != 1:
        raise ValueError("the checkpoint's optimizer state does not fit this model's parameters")
    position = {name: i for i, name in enumerate(saved_order)}
    moved = {i: state["state"][position[name]] for i, name in enumerate(order) if position[name] in state["state"]}
    return {"state": moved, "param_groups": [{**state["param_groups"][0], "params": list(range(len(order)))}]}


def _average_quantiles(model: ROICodec, world: int) -> None:
    """Average the (DDP-ignored) entropy-bottleneck quantiles across workers."""
    if world <= 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".quantiles"):
                dist.all_reduce(p.data)
                p.data /= world


# -- the loop -----------------------------------------------------------------------------------

def _batches(config: dict[str, Any], device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=config["batch_size"], drop_last=True,
                                          device=device, local_shuffle_buffer_size=config.get("shuffle_buffer"),
                                          local_shuffle_seed=config["seed"] + epoch):
            n += 1
            yield b["image"].float().div_(255.0), b["mask"].float().div_(255.0)
        if n == 0:
            raise RuntimeError(f"epoch {epoch}: this worker's share of the training crops is smaller than "
                               f"one batch of {config['batch_size']}; use more data, more crops per image, "
                               "fewer workers or a smaller batch")
        epoch += 1


def _print_progress(metrics: dict[str, Any], total: int) -> None:
    """One line per report on the job's output (the full metrics go to MLflow)."""
    parts = [f"step {metrics['step']}/{total}"]
    for key, fmt in (("loss", "loss {:.3g}"), ("bpp", "bpp {:.3f}"), ("steps_per_s", "{:.2f} steps/s"),
                     ("val_loss", "val_loss {:.3g}"), ("val_psnr", "val_psnr {:.2f} dB")):
        if key in metrics and isinstance(metrics[key], float) and math.isfinite(metrics[key]):
            parts.append(fmt.format(metrics[key]))
    # Not print(): Ray Train patches it to log *and* echo, which shows every line twice.
    sys.stdout.write("[train] " + "  ".join(parts) + "\n")
    sys.stdout.flush()


def _quiet_ray_report_log() -> None:
    """Ray Train logs every report's whole metrics dict at INFO; keep that at WARNING."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


@dataclass
class _Worker:
    """What one worker trains with (see :func:`_setup_worker`)."""

    config: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    amp: bool
    net: torch.nn.Module  # what the steps run: the DDP wrapper, or the codec itself on one worker
    codec: ROICodec
    optimizer: torch.optim.Optimizer
    aux_optimizer: torch.optim.Optimizer
    settings: StepSettings
    loss_fn: ROIRateDistortionLoss  # the MSE stage's (validation ranks checkpoints by it in both stages)
    rng: random.Random
    start_step: int
    total: int
    perceptual: PerceptualStage | None  # the second stage's loss and discriminator


def _device(config: dict[str, Any]) -> tuple[torch.device, bool]:
    """This worker's device (with ``torch_threads`` applied) and whether bfloat16 autocast is on
    (``amp``; None: on GPU)."""
    import ray.train.torch

    if config.get("torch_threads"):
        torch.set_num_threads(int(config["torch_threads"]))
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    amp = bool(config.get("amp")) if config.get("amp") is not None else device.type == "cuda"
    return device, amp


def _build_or_resume(config: dict[str, Any]) -> tuple[ROICodec, dict[str, Any] | None]:
    """The variant built with the run's seed, and the ``train_state.pt`` dict when Ray Train hands
    this worker a checkpoint (its weights loaded; ``state["discriminator"]`` the checkpoint's
    discriminator, if any); without one, the driver's warm start if any."""
    import ray
    import ray.train

    torch.manual_seed(config["seed"])
    model = build_model(config["variant"], **config["model"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_training_checkpoint(d, model)
            state["discriminator"] = load_discriminator_state(d)
            return model, state
    if config.get("_init") is not None:  # a fresh warm-started run (the driver did the warm start)
        model.load_state_dict(ray.get(config["_init"]))
    return model, None


def _prepare_ddp(model: ROICodec, config: dict[str, Any]) -> tuple[torch.nn.Module, ROICodec]:
    """``prepare_model`` (DDP with several workers): the network the steps run, and the codec in it.
    The aux-trained quantiles stay out of gradient sync (see the module docstring)."""
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    quantiles = [n for n, _ in model.named_parameters() if n.endswith(".quantiles")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, quantiles)
    net = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={
        "find_unused_parameters": bool(config.get("find_unused_parameters", False)),
        "forward_sync_buffers": False})
    codec: ROICodec = net.module if isinstance(net, DistributedDataParallel) else net
    if net is not codec:
        net.aux_loss = codec.aux_loss  # DDP does not forward attribute lookups to the module
    return net, codec


def _setup_worker(config: dict[str, Any]) -> _Worker:
    """The model (built or resumed), its DDP wrapper, both optimizers (their states resumed too),
    the loss and the knob sampler of this worker."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device, amp = _device(config)
    model, state = _build_or_resume(config)
    start_step = int(state["step"]) if state else 0
    net, codec = _prepare_ddp(model, config)
    optimizer, aux_optimizer = make_optimizers(codec, config["lr"], config["aux_lr"])
    if state:
        optimizer.load_state_dict(state["optimizer"])
        aux_optimizer.load_state_dict(state["aux_optimizer"])
    lo, hi = config["roi_quality_range"]
    settings = StepSettings(n_rates=codec.n_rates, lambda_low=config["lambda_low"],
                            lambda_high=config["lambda_high"], min_roi_quality=lo, max_roi_quality=hi,
                            uniform_fraction=config["uniform_fraction"], rate_points=config["rate_points"])
    loss_fn = ROIRateDistortionLoss(omega=config["omega"], normalize=config["lambda_norm"],
                                    ms_ssim_weight=config["ms_ssim_weight"])
    perceptual = None
    if config.get("stage", "mse") == "perceptual":
        perceptual = PerceptualStage(config, codec.M, device, (state or {}).get("discriminator"))
        perceptual.prepare()
    # Knob sampling: a different stream per worker and per (re)start point.
    rng = random.Random(hash((config["seed"], rank, start_step)) & 0xFFFFFFFF)
    return _Worker(config, rank, world, device, amp, net, codec, optimizer, aux_optimizer, settings, loss_fn, rng,
                   start_step, int(config["steps"]), perceptual)


def _crash_once_if_asked(config: dict[str, Any], step: int, rank: int) -> None:
    """The ``fail_at_step`` testing hook: rank 0 dies before that step unless ``fail_marker`` exists."""
    import ray.train

    fail_at, marker = config.get("fail_at_step"), config.get("fail_marker")
    if fail_at is None or step != int(fail_at) or rank != 0 or not marker or os.path.exists(marker):
        return
    # Crash only once the controller has taken in every report so far (V2 commits a
    # checkpoint when it processes the report, asynchronously), so the test knows
    # which checkpoint the restart must use; a real crash may lose the last one.
    ray.train.get_all_reported_checkpoints(timeout_s=300)
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(f"failed once at step {step}\n")
    os._exit(1)


class _Reporter:
    """Collects the steps' metrics and reports them to Ray Train: the interval's means and
    ``history`` every ``report_every`` steps; every ``checkpoint_every`` steps and at the end
    with a checkpoint, which rank 0 validates and writes."""

    def __init__(self, w: _Worker):
        config = w.config
        self.w = w
        self.val = _load_val(config) if w.rank == 0 else None
        self.points = [tuple(p) for p in config.get("val_points") or DEFAULT_VAL_POINTS]
        self.report_every = max(1, int(config.get("report_every", DEFAULT_REPORT_EVERY)))
        self.checkpoint_every = max(1, int(config.get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)))
        self.record_times = bool(config.get("record_step_times"))
        self.history: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self.t_interval = time.perf_counter()

    def step_done(self, done: int, metrics: dict[str, float]) -> None:
        """Record step ``done``'s metrics; report (and checkpoint) when it is time."""
        if self.record_times:
            self.step_times.append(time.perf_counter())
        self.history.append({"step": float(done), **metrics})
        is_checkpoint = done % self.checkpoint_every == 0 or done == self.w.total
        if is_checkpoint or done % self.report_every == 0:
            self.report(done, is_checkpoint)

    def _interval_metrics(self, done: int) -> dict[str, Any]:
        """The means of the steps since the last report, their ``history`` and the throughput."""
        elapsed = time.perf_counter() - self.t_interval
        metrics: dict[str, Any] = {"step": done, "start_step": self.w.start_step, "world_size": self.w.world}
        if self.w.perceptual is not None and self.w.perceptual.resumed_step is not None:
            metrics["disc_start_step"] = self.w.perceptual.resumed_step
        if self.history:
            metrics.update({k: v for k, v in _mean(self.history).items() if k != "step"})
            metrics["steps_per_s"] = len(self.history) / max(elapsed, 1e-9)
        metrics["history"] = self.history
        if self.record_times and done == self.w.total:
            metrics["step_times"] = self.step_times
        return metrics

    def report(self, done: int, with_checkpoint: bool) -> None:
        """``ray.train.report`` of the interval (every rank), with a checkpoint directory from rank 0."""
        import ray.train

        w = self.w
        metrics = self._interval_metrics(done)
        if not with_checkpoint:
            ray.train.report(metrics)
        else:
            _average_quantiles(w.codec, w.world)
            with tempfile.TemporaryDirectory(prefix="roicodec-ckpt-") as tmp:
                ckpt = self._write_checkpoint(Path(tmp), done, metrics) if w.rank == 0 else None
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{done:08d}")
        if w.rank == 0:
            _print_progress(metrics, w.total)
        self.history = []
        self.t_interval = time.perf_counter()

    def _write_checkpoint(self, folder: Path, done: int, metrics: dict[str, Any]) -> ray.train.Checkpoint:
        """Rank 0: validate (the val metrics and ``rd_points`` go into ``metrics``), write ``model.pt``
        of the coding-ready copy and ``train_state.pt`` into ``folder``; its ``ray.train.Checkpoint``."""
        import ray.train

        w = self.w
        w.codec.eval()
        if self.val is not None:
            vm, rd, coder = validate(w.codec, self.val[0], self.val[1], self.points, w.loss_fn,
                                     w.config["lambda_low"], w.config["lambda_high"],
                                     w.config.get("val_encode_images", 2))
            metrics.update(vm)
            metrics["rd_points"] = rd
        else:
            coder = copy.deepcopy(w.codec).eval()
            coder.update(force=True)
        w.codec.train()
        extra = {"step": done, "run_name": w.config.get("run_name"),
                 **{k: float(v) for k, v in metrics.items() if k.startswith("val_")}}
        save_checkpoint(coder, folder / MODEL_FILE, extra=extra)
        torch.save({"step": done, "optimizer": w.optimizer.state_dict(), "aux_optimizer": w.aux_optimizer.state_dict(),
                    "config": {k: v for k, v in w.config.items() if not k.startswith("_")}}, folder / STATE_FILE)
        if w.perceptual is not None:
            w.perceptual.save(folder / DISC_FILE, done)
        return ray.train.Checkpoint.from_directory(folder)


def _train_step(w: _Worker, step: int, x: torch.Tensor, m: torch.Tensor) -> dict[str, float]:
    """One step at the learning rate of its place in the schedule; its metrics."""
    set_learning_rate(w.optimizer, learning_rate(step, w.total, w.config["lr"], w.config["lr_drop"]))
    if w.perceptual is not None:
        return w.perceptual.step(w.net, x, m, w.optimizer, w.aux_optimizer, w.settings, w.rng, amp=w.amp, step=step)
    return train_step(w.net, x, m, w.loss_fn, w.optimizer, w.aux_optimizer, w.settings, w.rng, amp=w.amp)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The body every Ray Train worker runs; ``config`` is :meth:`TrainConfig.loop_config`."""
    import ray.train

    _quiet_ray_report_log()
    w = _setup_worker(config)
    batches = _batches(config, w.device)
    reporter = _Reporter(w)
    w.net.train()
    for step in range(w.start_step, w.total):
        _crash_once_if_asked(config, step, w.rank)
        x, m = next(batches)
        reporter.step_done(step + 1, _train_step(w, step, x, m))
    if w.start_step >= w.total:
        # Nothing left to train (a re-submitted finished run): report once, no new checkpoint.
        ray.train.report({"step": w.start_step, "start_step": w.start_step, "world_size": w.world, "history": []})
