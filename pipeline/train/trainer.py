"""Distributed training job: Ray Data crops -> Ray Train ``TorchTrainer`` -> checkpoints + MLflow.

:func:`train` is the library entry point; ``jobs/train.py`` and ``jobs/train_ggm.py``
only parse arguments (:func:`cli_main`) and call it.

Where things go (``storage_path``, default ``$ROICODEC_STORAGE`` or ``~/roicodec_runs``; the one
setting that moves a job from a laptop to a cluster, see :func:`default_storage_path`):

- ``<storage_path>/<run_name>/``: the Ray Train run: ``checkpoint_XXXXXXXX/``
  folders (``model.pt`` + ``train_state.pt``; the best ``keep`` by ``val_loss`` plus
  the latest are kept) and Ray's run snapshot;
- ``<storage_path>/mlflow.db`` and ``<storage_path>/mlartifacts/``: the default
  MLflow store (see :mod:`pipeline.train.tracking`);
- ``<storage_path>/smoke_shards/``: the tiny shards the smoke run generates.

``storage_path`` is a local folder, a shared filesystem mounted at the same path on
every node (NFS, EFS, Filestore, a ReadWriteMany volume), or an object-store URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``). A URI goes to Ray Train's
``RunConfig(storage_path=...)`` untouched (Ray uploads the checkpoints); as a SQLite
file cannot live there, the MLflow store must then be a tracking server given by
``--mlflow-uri`` / ``MLFLOW_TRACKING_URI``, and shards stay on a filesystem path
(``--shards``; ``--smoke`` needs a filesystem storage path for its generated shards).

Resuming: Ray Train V2 has no ``Trainer.restore``/``resume_from_checkpoint`` any more
(both raise a deprecation error in 2.60). Instead its controller loads the run
snapshot it finds under ``storage_path/run_name`` and hands the latest checkpoint to
the workers through ``ray.train.get_checkpoint()``: a worker-group restart after a
failure (``max_failures``) and a re-submitted job with the same run name both resume
from there, and the loop continues the step counter saved in the checkpoint. The
MLflow run is found again by the same run name.

Ray: an already initialised Ray is used as is; with ``RAY_ADDRESS`` set (``ray job
submit``) the job connects to that cluster; otherwise a local Ray starts with
``max(4, 2 * cores)`` logical CPUs so the Ray Data read/crop tasks keep CPUs next to
the training workers (``cpus_per_worker`` each, default 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from pipeline.codec.models import ENTROPY_FAMILIES, ENTROPY_MODELS, MODELS, family_options
from pipeline.data.dataset import DatasetError, check_crop, plan_shards, training_datasets
from pipeline.errors import run_cli
from pipeline.mlflow_store import resolve_tracking_uri
from pipeline.ray_session import ensure_ray
from pipeline.train import tracking
from pipeline.train.loss import NORMALIZATIONS
from pipeline.train.perceptual.stage import STAGES, perceptual_weights
from pipeline.train.loop import (DEFAULT_CHECKPOINT_EVERY, DEFAULT_REPORT_EVERY, DEFAULT_VAL_POINTS, MODEL_FILE,
                                 train_loop_per_worker)
from pipeline.train.steps import StepSettings

DEFAULT_MODEL = {"N": 128, "M": 192, "n_rates": 4}
SMOKE_MODEL = {"N": 16, "M": 24, "n_rates": 2}


PERCEPTUAL_DEFAULTS = dataclasses.asdict(perceptual_weights(None))
PERCEPTUAL_HELP = {"rate": "rate term (1: each rate point's rate/MSE balance of the MSE stage)",
                   "mse": "MSE term, weighted by the ROI (the background at its Q)",
                   "l1_roi": "L1 term inside the ROI", "l1_nonroi": "L1 term outside the ROI",
                   "lpips": "LPIPS (VGG-16) term", "style": "Gram-matrix style term (VGG-16)",
                   "lap": "Laplacian-pyramid term", "adv": "adversarial term"}

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class TrainError(ValueError):
    """Bad training settings or a failed run; the message is one line."""


def is_uri(path: str | Path) -> bool:
    """True for a remote storage URI (``s3://``, ``gs://``, ...); ``file://`` counts as a local path."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def normalize_storage(path: str | Path) -> str:
    """A storage root as Ray needs it: a URI untouched (no trailing slash), a path absolute
    (a job submitted with ``--working-dir`` runs in a temporary folder)."""
    text = str(path).removeprefix("file://")
    if is_uri(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def storage_join(root: str, *parts: str) -> str:
    """``root/parts...`` for a path or a URI (``Path`` would turn ``s3://b`` into ``s3:/b``)."""
    if is_uri(root):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def default_storage_path() -> str:
    """``$ROICODEC_STORAGE`` or ``~/roicodec_runs``: a local or NFS path (made absolute), or an
    ``s3://`` / ``gs://`` URI (kept as is)."""
    return normalize_storage(os.environ.get("ROICODEC_STORAGE") or "~/roicodec_runs")


@dataclass
class TrainConfig:
    """Everything a training job needs; every field is an MLflow parameter."""

    shards: str | list[str] = ""
    variant: str = "tma"
    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    init: str | None = None  # warm start: compressai:mbt2018-mean:Q or a weights file (pipeline.codec.warm_start)
    init_lambda: float | None = None  # the lambda the init weights were trained for (default: the zoo's)
    steps: int = 10_000
    batch_size: int = 8
    crop: int = 256
    crops_per_image: int | None = None  # None: auto (see pipeline.data.dataset)
    saliency_weight: float = 0.0
    roi_crop_fraction: float = 0.0  # share of training windows centred on the ROI
    val_crop: int = 256
    val_fraction: float = 0.1
    max_val_samples: int = 16
    val_encode_images: int = 2
    val_points: list[tuple[float, float]] = field(default_factory=lambda: [list(p) for p in DEFAULT_VAL_POINTS])
    lr: float = 1e-4
    lr_drop: float = 0.1  # the last 10% of the steps run at lr / 10
    aux_lr: float = 1e-3
    lambda_low: float = 0.0035
    lambda_high: float = 0.0483
    omega: float = 3.0
    roi_quality_range: tuple[float, float] = (0.0, 1.0)  # the non-ROI values Q a step draws from
    uniform_fraction: float = 0.25  # share of images trained with Q = 1 (ROI off)
    rate_points: list[int] | None = None  # the rate points a step draws from (None: all)
    lambda_norm: str = "roi"  # see pipeline.train.loss
    ms_ssim_weight: float = 0.0
    stage: str = "mse"  # "perceptual": the second stage (pipeline.train.perceptual.stage)
    loss_weights: dict[str, float] = field(default_factory=dict)  # the perceptual loss's, over its defaults
    vgg_losses: bool = True  # LPIPS and the style loss (need VGG-16 weights)
    vgg_weights: str | None = None  # default: torchvision's cache
    disc_lr: float = 1e-4
    disc_width: int = 32
    disc_warmup: int = 0  # perceptual stage: its first steps train the discriminator alone
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    report_every: int = DEFAULT_REPORT_EVERY
    keep: int = 3
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    amp: bool | None = None  # None: on with GPUs
    torch_threads: int | None = None
    find_unused_parameters: bool = False
    max_failures: int = 2
    placement_strategy: str = "PACK"  # Ray placement group strategy of the workers
    run_name: str | None = None
    storage_path: str | None = None
    mlflow_uri: str | None = None
    experiment: str = "roicodec"
    registered_model: str | None = None  # default roicodec-<variant>
    champion_metric: str = "val_loss"
    seed: int = 0
    # testing / benchmarking hooks
    fail_at_step: int | None = None
    fail_marker: str | None = None
    record_step_times: bool = False

    def resolved(self) -> "TrainConfig":
        """A copy with defaults filled in (run name, paths, URIs) and settings checked."""
        c = dataclasses.replace(self, model=dict(self.model))
        if not c.shards:
            raise TrainError("no shards given (--shards FOLDER, or --smoke to generate tiny ones)")
        c.storage_path = normalize_storage(c.storage_path or default_storage_path())
        c.run_name = c.run_name or f"{c.variant}-{time.strftime('%Y%m%d-%H%M%S')}"
        if "/" in c.run_name or c.run_name.startswith("."):
            raise TrainError(f"run name must be a plain folder name, got {c.run_name!r}")
        try:
            c.mlflow_uri = resolve_tracking_uri(c.mlflow_uri, storage_path=c.storage_path)
        except ValueError as exc:  # an object-store storage path and no tracking server
            raise TrainError(str(exc)) from None
        c.placement_strategy = str(c.placement_strategy).upper()
        if c.placement_strategy not in PLACEMENT_STRATEGIES:
            raise TrainError(f"placement strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"got {c.placement_strategy!r}")
        if c.stage not in STAGES:
            raise TrainError(f"stage must be one of {', '.join(STAGES)}, got {c.stage!r}")
        try:
            perceptual_weights(c.loss_weights)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        suffix = "-perceptual" if c.stage == "perceptual" else ""
        c.registered_model = c.registered_model or f"roicodec-{c.variant}{suffix}"
        if c.disc_lr <= 0 or c.disc_width < 1 or c.disc_warmup < 0:
            raise TrainError(f"need disc_lr > 0, disc_width >= 1 and disc_warmup >= 0, got {c.disc_lr}, "
                             f"{c.disc_width}, {c.disc_warmup}")
        for name in ("steps", "batch_size", "checkpoint_every", "report_every", "keep", "num_workers"):
            if getattr(c, name) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(c, name)}")
        if c.torch_threads is not None and c.torch_threads < 1:
            raise TrainError(f"torch_threads must be at least 1, got {c.torch_threads}")
        if c.max_failures < 0:
            raise TrainError("max_failures must be >= 0")
        if c.init_lambda is not None and not c.init_lambda > 0:
            raise TrainError(f"init lambda must be positive, got {c.init_lambda}")
        lo, hi = c.roi_quality_range
        try:  # the workers' checks, before Ray starts (an n_rates left to the --init weights: no upper bound)
            StepSettings(n_rates=c.model.get("n_rates") or 1 + max([0, *(c.rate_points or [])]),
                         min_roi_quality=lo, max_roi_quality=hi, uniform_fraction=c.uniform_fraction,
                         rate_points=c.rate_points)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        if not 0 < c.lambda_low <= c.lambda_high:
            raise TrainError(f"need 0 < alpha-low <= alpha-high, got {c.lambda_low}, {c.lambda_high}")
        try:
            check_crop(c.crop, "crop")
            check_crop(c.val_crop, "val_crop")
        except DatasetError as exc:
            raise TrainError(str(exc)) from None
        if c.lambda_norm not in NORMALIZATIONS:
            raise TrainError(f"lambda normalisation must be one of {', '.join(NORMALIZATIONS)}, got {c.lambda_norm!r}")
        for name in ("lr_drop", "roi_crop_fraction"):
            if not 0 <= getattr(c, name) <= 1:
                raise TrainError(f"{name} must lie in [0, 1], got {getattr(c, name)}")
        if c.ms_ssim_weight > 0 and c.crop <= 160:
            raise TrainError(f"the MS-SSIM term needs crops larger than 160 px, got {c.crop}")
        for q, r in c.val_points:
            if not (0 <= q <= 1 and 0 <= r <= 1):
                raise TrainError(f"validation points must be (roi_quality, rate) in [0,1], got {(q, r)}")
        return c

    def loop_config(self) -> dict[str, Any]:
        """The dict handed to every worker (plain values only)."""
        return dataclasses.asdict(self)


@dataclass
class TrainOutcome:
    """What :func:`train` returns."""

    run_name: str
    run_path: str
    checkpoint: str | None  # the latest checkpoint folder (model.pt inside)
    metrics: dict[str, Any]  # the last report of rank 0
    mlflow_run_id: str
    mlflow_uri: str
    resumed: bool  # the MLflow run (and so the Ray run name) existed before
    model_version: str | None
    champion_version: str | None
    ray_result: Any = None

    def summary(self) -> dict[str, Any]:
        keep = ("step", "start_step", "loss", "bpp", "val_loss", "val_bpp", "val_psnr")
        return {"run_name": self.run_name, "run_path": self.run_path, "checkpoint": self.checkpoint,
                "model_file": storage_join(self.checkpoint, MODEL_FILE) if self.checkpoint else None,
                "mlflow_uri": self.mlflow_uri, "mlflow_run_id": self.mlflow_run_id, "resumed": self.resumed,
                "model_version": self.model_version, "champion_version": self.champion_version,
                "metrics": {k: self.metrics[k] for k in keep if k in self.metrics}}


def _check_model(cfg: TrainConfig) -> None:
    """The variant and its options build a model (before Ray starts)."""
    from pipeline.codec.models import build_model

    if cfg.variant not in MODELS:
        raise TrainError(f"codec variant {cfg.variant!r} is not registered (available: {', '.join(sorted(MODELS))})")
    if not cfg.init:  # with --init, N and M come from the weights: warm_start_model builds it
        try:
            build_model(cfg.variant, **cfg.model)
        except ValueError as exc:
            raise TrainError(f"model: {exc}") from None


def _check_perceptual(cfg: TrainConfig) -> None:
    """The perceptual stage's VGG-16 weights load (before Ray starts): one line naming the options."""
    if cfg.stage != "perceptual" or not cfg.vgg_losses:
        return
    from pipeline.train.perceptual.losses import PerceptualWeightsError, VGGFeatures

    try:
        VGGFeatures(cfg.vgg_weights)
    except PerceptualWeightsError as exc:
        raise TrainError(str(exc)) from None


def warm_start_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """The model every worker of a fresh run starts from, warm-started from ``cfg.init`` (N and M
    the weights' unless ``cfg.model`` gives them), and the
    :class:`~pipeline.codec.warm_start.WarmStartReport`. Raises :class:`TrainError`."""
    from pipeline.codec.warm_start import InitError, warm_started
    from pipeline.train.loss import rate_lambdas

    lambdas = rate_lambdas(cfg.model.get("n_rates", DEFAULT_MODEL["n_rates"]), cfg.lambda_low, cfg.lambda_high)
    try:
        model, report = warm_started(cfg.variant, cfg.init, lambdas, cfg.init_lambda, **cfg.model)
    except InitError as exc:
        raise TrainError(str(exc)) from None
    return model, report


def run_config(cfg: TrainConfig, run_id: str, scored: bool = True):  # -> ray.train.RunConfig
    """Ray Train's ``RunConfig`` of a resolved config: ``storage_path`` as given (a path or a
    URI), checkpoint retention, failure retries, and the MLflow callbacks (``run_id``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=cfg.run_name, storage_path=cfg.storage_path,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep,
                                           checkpoint_score_attribute="val_loss" if scored else None,
                                           checkpoint_score_order="min"),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        callbacks=[tracking.MlflowCallback(cfg.mlflow_uri, run_id),
                   *tracking.placement_callbacks(cfg.mlflow_uri, run_id)])


def ordered_ingest():  # -> ray.data.ExecutionOptions
    """Ray Data options for the training crops: the driver's, with blocks consumed in dataset
    order, so a one-worker run with a given seed sees the same batches however its tasks finish."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def train(config: TrainConfig | dict[str, Any]) -> TrainOutcome:
    """Run (or resume) a training job; see the module docstring. Raises :class:`TrainError`."""
    import ray
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = (config if isinstance(config, TrainConfig) else TrainConfig(**config)).resolved()
    _check_model(cfg)
    _check_perceptual(cfg)
    try:
        plan = plan_shards(cfg.shards, cfg.val_fraction)  # bad data fails here, before Ray starts
    except DatasetError as exc:
        raise TrainError(str(exc)) from None
    init_model, init_report = warm_start_model(cfg) if cfg.init else (None, None)  # bad weights fail here too
    if init_model is not None:  # what the workers build: the warm-started model's options
        cfg.model = dict(init_model.config)
    ensure_ray()
    try:
        data = training_datasets(plan, crop=cfg.crop, val_crop=cfg.val_crop, val_fraction=cfg.val_fraction,
                                 crops_per_image=cfg.crops_per_image, saliency_weight=cfg.saliency_weight,
                                 roi_crop_fraction=cfg.roi_crop_fraction, max_val_samples=cfg.max_val_samples,
                                 global_batch=cfg.batch_size * cfg.num_workers, steps=cfg.steps, seed=cfg.seed)
    except DatasetError as exc:
        raise TrainError(str(exc)) from None
    val_ref = ray.put(data.val) if data.val is not None else None  # read by rank 0 only

    params = {**cfg.loop_config(), "train_images": data.train_images, "val_images": data.val_images,
              "shard_files": len(data.files),
              "train_rows": data.train_rows, "crops_per_image_used": data.crops_per_image}
    run_id, resumed = tracking.start_run(cfg.mlflow_uri, cfg.experiment, cfg.run_name, params,
                                         tags={tracking.STORAGE_TAG: cfg.storage_path, "variant": cfg.variant})
    init_ref = None
    if init_report is not None:
        sys.stdout.write("\n".join(init_report.lines()) + "\n")
        tracking.log_warm_start(cfg.mlflow_uri, run_id, init_report.as_dict())
        init_ref = ray.put(init_model.state_dict())  # used by workers only when there is no checkpoint to resume
    finished = latest_checkpoint(cfg.storage_path, cfg.run_name) if resumed else None
    if finished is not None and finished[0] >= cfg.steps:
        # a re-submitted finished run: nothing to train, so no workers to start
        metrics = {"step": finished[0], "start_step": finished[0], "history": []}
        done = tracking.finish_run(cfg.mlflow_uri, run_id, checkpoint_dir=finished[1], final_metrics=metrics,
                                   registered_model=cfg.registered_model, register=False)
        return TrainOutcome(cfg.run_name, storage_join(cfg.storage_path, cfg.run_name), str(finished[1]), metrics,
                            run_id, cfg.mlflow_uri, resumed, done["model_version"], done["champion_version"])
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={**cfg.loop_config(), "mlflow_run_id": run_id, "_val": val_ref,
                                                   "_init": init_ref,
                                                   "shuffle_buffer": max(4 * cfg.batch_size, 64)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources, placement_strategy=cfg.placement_strategy),
        # the perceptual stage keeps its latest checkpoints: val_loss (MSE) would prefer its start
        run_config=run_config(cfg, run_id, scored=data.val is not None and cfg.stage == "mse"), datasets={"train": data.train},
        dataset_config=ray.train.DataConfig(execution_options=ordered_ingest()))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        msg = _first_line(exc)
        tracking.fail_run(cfg.mlflow_uri, run_id, msg)
        raise TrainError(f"training run {cfg.run_name!r} failed: {msg}") from exc
    metrics = dict(result.metrics or {})
    trained = metrics.get("step", 0) > metrics.get("start_step", 0)

    def finish(local_dir: str | None) -> dict[str, Any]:
        return tracking.finish_run(cfg.mlflow_uri, run_id, checkpoint_dir=local_dir, final_metrics=metrics,
                                   registered_model=cfg.registered_model, champion_metric=cfg.champion_metric,
                                   register=trained)

    if result.checkpoint is None:
        ckpt_dir, done = None, finish(None)
    elif is_uri(cfg.storage_path):
        # Ray's checkpoint path has no scheme (bucket/prefix/...): report the URI, and hand
        # MLflow a downloaded copy of the checkpoint.
        ckpt_dir = storage_join(cfg.storage_path, cfg.run_name, PurePosixPath(result.checkpoint.path).name)
        with result.checkpoint.as_directory() as local_dir:
            done = finish(local_dir)
    else:
        ckpt_dir = result.checkpoint.path
        done = finish(ckpt_dir)
    return TrainOutcome(cfg.run_name, storage_join(cfg.storage_path, cfg.run_name), ckpt_dir, metrics, run_id,
                        cfg.mlflow_uri, resumed, done["model_version"], done["champion_version"], result)


def latest_checkpoint(storage_path: str, run_name: str) -> tuple[int, Path] | None:
    """(step, folder) of a run's latest ``checkpoint_<step>`` on local storage; None without
    one, or on object storage (where Ray Train finds it)."""
    if is_uri(storage_path):
        return None
    found = [(int(p.name.split("_", 1)[1]), p) for p in (Path(storage_path) / run_name).glob("checkpoint_*")
             if p.name.split("_", 1)[1].isdigit() and (p / MODEL_FILE).is_file()]
    return max(found, default=None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # Ray's errors wrap the worker traceback; keep the innermost "Error: message" line.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln.split(":", 1)[0] or "Exception" in ln.split(":", 1)[0]:
            return ln[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


# -- smoke data ---------------------------------------------------------------------------------

def write_smoke_shards(out_dir: str | Path, n_images: int = 12, size: int = 96, seed: int = 0,
                       error_rows: int = 1) -> Path:
    """Tiny shards from the bundled sample set (masks from the drawn objects, no CLIP):
    one row per image with its objects' mask, plus ``error_rows`` error rows. Idempotent."""
    from PIL import Image

    from pipeline.data.samples import objects_mask, photo_like_image
    from pipeline.data.shards import shard_files, write_shard
    from pipeline.masks.ops import to_png

    out = Path(out_dir).expanduser().resolve()
    if shard_files(out):
        return out
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        arr, objects = photo_like_image(size, size, seed * 100_003 + i)
        path = images / f"sample_{i:04d}.png"
        Image.fromarray(arr).save(path)
        mask = objects_mask(objects, size, size)
        rows.append({"image_id": path.name, "uri": str(path), "width": size, "height": size, "prompt": "objects",
                     "roi_mask": to_png(mask), "saliency": None, "mask_source": "coco", "error": None})
    for j in range(error_rows):
        rows.append({"image_id": f"broken_{j}.png", "uri": str(images / f"broken_{j}.png"), "width": None,
                     "height": None, "prompt": "objects", "roi_mask": None, "saliency": None,
                     "mask_source": "coco", "error": "UnidentifiedImageError: not an image file"})
    write_shard(rows, out / "part-smoke-00000.parquet", metadata={"run_id": "smoke"})
    return out


# -- command line -------------------------------------------------------------------------------

def build_parser(variant: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """The ``jobs/train.py`` arguments; ``variant`` fixes the variant (no ``--variant``)."""
    p = argparse.ArgumentParser(
        description=description or "Train a ROI codec with Ray Train (DDP workers), checkpoints and MLflow.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Re-running with the same --run-name and --storage-path resumes from the latest checkpoint "
               "(step counter included) and logs into the same MLflow run.")
    if variant is None:
        p.add_argument("--variant", default="tma", choices=sorted(MODELS),
                       help="codec variant (its transforms, and its entropy family unless --family says otherwise): "
                            "tlic, sft, tma, swin (Gaussian) or ggm (sft with a generalized Gaussian)")
    p.add_argument("--shards", help="folder (or file) of Parquet mask shards from jobs/preprocess_masks.py; "
                                    "optional with --smoke")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker; bfloat16 autocast on")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    p.add_argument("--torch-threads", type=int,
                   help="torch intra-op threads per worker (default: Ray's, one per reserved CPU)")
    p.add_argument("--steps", type=int, help="total optimisation steps (a resumed run continues to this count); "
                                             "default 10000, 80 with --smoke")
    p.add_argument("--batch-size", type=int, help="crops per worker per step (default 8, 4 with --smoke)")
    p.add_argument("--crop", type=int, help="training crop side, a multiple of 64 (default 256, 64 with --smoke); "
                                            "finish a run on 128 or more (docs/training.md)")
    p.add_argument("--crops-per-image", type=int,
                   help="random crops per row per epoch (default: auto, 1 unless the data set is tiny)")
    p.add_argument("--N", type=int, dest="n_channels", help="codec width N (default 128, 16 with --smoke)")
    p.add_argument("--M", type=int, dest="m_channels", help="latent channels M (default 192, 24 with --smoke)")
    p.add_argument("--n-rates", type=int, help="trained rate points of the gain units (default 4, 2 with --smoke)")
    p.add_argument("--entropy", choices=ENTROPY_MODELS, default="hyperprior",
                   help="entropy model of the latent: hyperprior (mean-scale) or context (channel groups with a "
                        "checkerboard context, ELIC-style; see docs/training.md)")
    p.add_argument("--family", choices=ENTROPY_FAMILIES,
                   help="entropy family of the latent (default: the variant's; ggm's is generalized_gaussian)")
    p.add_argument("--beta-mode", choices=("element", "channel"),
                   help="generalized Gaussian shape per element (predicted) or per channel (learned); default element")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="warm start a new run from compressai:mbt2018-mean:Q (CompressAI's pretrained weights of "
                        "quality 1-8, read from the torch hub cache), default (the pretrained model installed with roicodec), a file (a CompressAI MeanScaleHyperprior "
                        "state dict, or one of our checkpoints of the same variant); N and M default to the "
                        "weights'. Ignored when the run resumes from its own checkpoint")
    p.add_argument("--init-lambda", type=float,
                   help="lambda the --init weights were trained for: the rate point nearest it starts exactly as "
                        "those weights (default: the zoo quality's lambda; for a file, the middle rate point)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4, 2e-3 with --smoke)")
    p.add_argument("--lr-drop", type=float, default=0.1,
                   help="share of the steps, at the end, that run at lr / 10")
    p.add_argument("--aux-lr", type=float, default=1e-3, help="learning rate of the entropy-bottleneck quantiles")
    p.add_argument("--alpha-low", type=float, help="lambda of the lowest rate point (default 0.0035, 0.0483 with "
                                                   "--smoke: a few steps only show learning at high lambdas)")
    p.add_argument("--alpha-high", type=float, help="lambda of the highest rate point (default 0.0483, 0.18 with "
                                                    "--smoke)")
    p.add_argument("--omega", type=float, default=3.0, help="ROI weight: lambda_i = alpha * exp(omega * m_i)")
    p.add_argument("--lambda-norm", default="roi", choices=NORMALIZATIONS,
                   help="roi: ROI pixels get alpha, the background alpha * exp(-omega (1 - Q)); mean: the map's "
                        "mean is alpha (Q moves bits at a similar size)")
    p.add_argument("--ms-ssim-weight", type=float, default=0.0, help="weight of an MS-SSIM term (crops > 160 px)")
    p.add_argument("--stage", choices=STAGES, default="mse",
                   help="mse: rate-distortion training; perceptual: TLIC's second stage (perceptual, style, "
                        "Laplacian and adversarial losses, a U-Net discriminator), usually with --init of an MSE "
                        "checkpoint (docs/training.md)")
    for key, default in PERCEPTUAL_DEFAULTS.items():
        p.add_argument(f"--loss-{key.replace('_', '-')}", type=float, dest=f"loss_{key}", metavar="W", default=default,
                       help=f"perceptual stage: weight of the {PERCEPTUAL_HELP[key]}")
    p.add_argument("--no-vgg-losses", action="store_true",
                   help="perceptual stage without LPIPS and the style loss (no VGG-16 weights needed)")
    p.add_argument("--vgg-weights", metavar="FILE",
                   help="torchvision's VGG-16 weights (vgg16-397923af.pth) for LPIPS and the style loss "
                        "(default: torchvision's cache; never downloaded)")
    p.add_argument("--disc-lr", type=float, default=1e-4, help="perceptual stage: the discriminator's learning rate")
    p.add_argument("--disc-width", type=int, default=32,
                   help="perceptual stage: the discriminator's first-layer channels")
    p.add_argument("--disc-warmup", type=int, default=0, metavar="STEPS",
                   help="perceptual stage: train the discriminator alone (codec frozen) for its first STEPS steps, "
                        "so that the codec's adversarial term starts from a discriminator that tells decoded "
                        "crops from real ones")
    p.add_argument("--roi-quality-range", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="the non-ROI values Q the steps draw from (default 0 1; e.g. 0 0.3 for a perceptual "
                        "stage aimed at coarse backgrounds)")
    p.add_argument("--uniform-fraction", type=float, default=0.25,
                   help="share of the images trained at Q = 1 (uniform quality)")
    p.add_argument("--rate-points", type=int, nargs="+", metavar="I",
                   help="the rate points the steps draw from (default: all)")
    p.add_argument("--saliency-weight", type=float, default=0.0,
                   help="blend saliency into the ROI mask: max(roi, w * saliency)")
    p.add_argument("--roi-crops", type=float, default=0.0, dest="roi_crop_fraction",
                   help="share of the training crops centred on the ROI (helps with small objects)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of images held out (by image-id hash)")
    p.add_argument("--val-crop", type=int, help="validation centre-crop side (default 256, 64 with --smoke)")
    p.add_argument("--checkpoint-every", type=int, help="validate + checkpoint every N steps "
                                                        f"(default {DEFAULT_CHECKPOINT_EVERY}, 20 with --smoke)")
    p.add_argument("--report-every", type=int, default=DEFAULT_REPORT_EVERY,
                   help="report metrics to Ray/MLflow every N steps")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (best by val_loss, plus the latest)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before the run fails")
    p.add_argument("--placement-strategy", default="PACK", type=str.upper, choices=PLACEMENT_STRATEGIES,
                   help="Ray placement of the workers: PACK fills nodes first, SPREAD / STRICT_SPREAD put them "
                        "on different nodes")
    p.add_argument("--run-name", help="Ray Train run name = MLflow run name (default <variant>-<time>); "
                                      "reuse it to resume")
    p.add_argument("--storage-path", help="root of runs, checkpoints and the default MLflow store: a local or "
                                          "NFS path, or an s3:// / gs:// URI (default $ROICODEC_STORAGE or "
                                          "~/roicodec_runs)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                        "sqlite:///<storage-path>/mlflow.db; required with a URI storage path)")
    p.add_argument("--experiment", default="roicodec", help="MLflow experiment name")
    p.add_argument("--registered-model", help="MLflow registered model name (default roicodec-<variant>)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, 64 px crops, few steps; generates tiny shards if --shards is not given")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the outcome as JSON to FILE (or, without FILE, as the last line of stdout)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML file of options: keys are the long option names (batch-size or batch_size, N, M), "
                        "values as on the command line (true for a flag); flags given on the command line "
                        "override the file")
    return p


def config_argv(parser: argparse.ArgumentParser, path: str | Path) -> list[str]:
    """The command-line tokens a ``--config`` YAML file stands for (see :func:`parse_args`).

    Keys are the parser's long option names without ``--``, ``_`` accepted for ``-``; a flag
    (``--smoke``, ``--use-gpu``) takes true or false; other values are written as on the
    command line (numbers, strings; a list for an option of several values), so the parser
    checks types, counts and choices as usual.
    Raises :class:`TrainError` (one line) for an unreadable file or an unknown key."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TrainError(f"cannot read config {path}: {' '.join(str(exc).split())}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise TrainError(f"config {path}: expected a mapping of option names to values")
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:  # noqa: SLF001 (argparse has no public accessor)
        for opt in action.option_strings:
            if opt.startswith("--") and opt not in ("--help", "--config"):
                options[opt[2:]] = action
    argv: list[str] = []
    for key, value in data.items():
        name = str(key)
        action = options.get(name) or options.get(name.replace("_", "-"))
        if action is None:
            raise TrainError(f"config {path}: unknown option {name!r} (keys are {parser.prog}'s long option "
                             "names, e.g. batch-size)")
        opt = "--" + (name if name in options else name.replace("_", "-"))
        if action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise TrainError(f"config {path}: {name} is a flag, give true or false, got {value!r}")
            if value:
                argv.append(opt)
        elif value is None:
            continue
        elif isinstance(value, list) and action.nargs not in (None, "?"):  # e.g. rate-points: [0, 1]
            argv += [opt, *(str(v) for v in value)]
        elif isinstance(value, (list, dict)) or isinstance(value, bool):
            raise TrainError(f"config {path}: {name} takes one value, got {value!r}")
        else:
            argv += [opt, str(value)]
    return argv


def parse_args(argv: Sequence[str] | None = None, variant: str | None = None,
               description: str | None = None) -> argparse.Namespace:
    """``jobs/train.py``'s arguments: with ``--config FILE``, the file's options first and the
    command line after them, so that a flag on the command line overrides the file."""
    parser = build_parser(variant, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            argv = config_argv(parser, known.config) + argv
        except TrainError as exc:
            parser.error(str(exc))
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace, variant: str | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from parsed arguments (smoke defaults applied)."""
    smoke = args.smoke
    variant = variant or args.variant
    storage = normalize_storage(args.storage_path) if args.storage_path else default_storage_path()
    shards = args.shards
    if shards is None and smoke:
        if is_uri(storage):
            raise TrainError(f"--smoke writes its tiny shards under the storage path, which here is the URI {storage}; "
                             "give --shards a folder every node can read (local or NFS)")
        shards = str(write_smoke_shards(Path(storage) / "smoke_shards"))

    def pick(value: Any, normal: Any, small: Any) -> Any:
        return value if value is not None else (small if smoke else normal)

    base = SMOKE_MODEL if smoke else DEFAULT_MODEL
    model = {"N": pick(args.n_channels, base["N"], base["N"]), "M": pick(args.m_channels, base["M"], base["M"]),
             "n_rates": pick(args.n_rates, base["n_rates"], base["n_rates"])}
    if args.entropy != "hyperprior":
        model["entropy"] = args.entropy
    model.update(family_options(variant, args.family, args.beta_mode))
    if smoke and variant in MODELS:
        model.update(MODELS[variant].SMALL)
    if args.init:  # N and M not given: the --init weights' (train() reads them)
        if args.n_channels is None:
            del model["N"]
        if args.m_channels is None:
            del model["M"]
    return TrainConfig(
        shards=shards or "", variant=variant, model=model, init=args.init, init_lambda=args.init_lambda,
        steps=pick(args.steps, 10_000, 80), batch_size=pick(args.batch_size, 8, 4), crop=pick(args.crop, 256, 64),
        crops_per_image=args.crops_per_image, saliency_weight=args.saliency_weight,
        roi_crop_fraction=args.roi_crop_fraction, lr_drop=args.lr_drop, lambda_norm=args.lambda_norm,
        val_crop=pick(args.val_crop, 256, 64), val_fraction=args.val_fraction,
        max_val_samples=4 if smoke else 16, val_encode_images=1 if smoke else 2,
        lr=pick(args.lr, 1e-4, 2e-3), aux_lr=args.aux_lr, lambda_low=pick(args.alpha_low, 0.0035, 0.0483),
        lambda_high=pick(args.alpha_high, 0.0483, 0.18),
        omega=args.omega, ms_ssim_weight=args.ms_ssim_weight, roi_quality_range=tuple(args.roi_quality_range),
        uniform_fraction=args.uniform_fraction, rate_points=args.rate_points,
        stage=args.stage, vgg_losses=not args.no_vgg_losses, vgg_weights=args.vgg_weights, disc_lr=args.disc_lr,
        disc_width=args.disc_width, disc_warmup=args.disc_warmup,
        loss_weights={k: getattr(args, f"loss_{k}") for k in PERCEPTUAL_DEFAULTS},
        checkpoint_every=pick(args.checkpoint_every, DEFAULT_CHECKPOINT_EVERY, 20), report_every=args.report_every,
        keep=args.keep,
        num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
        torch_threads=args.torch_threads,
        max_failures=args.max_failures, placement_strategy=args.placement_strategy,
        run_name=args.run_name or (f"smoke-{variant}-{time.strftime('%Y%m%d-%H%M%S')}" if smoke else None),
        storage_path=storage, mlflow_uri=args.mlflow_uri, experiment=args.experiment,
        registered_model=args.registered_model, seed=args.seed)


def _print_outcome(outcome: TrainOutcome, json_out: str | None) -> None:
    """A finished run as three lines, or as JSON: to the file ``json_out`` (and the three lines),
    or with ``-`` as the last line of stdout."""
    summary = outcome.summary()
    if json_out and json_out != "-":
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if json_out == "-":
        print(json.dumps(summary, default=str), flush=True)
    else:
        m = summary["metrics"]
        print(f"run {summary['run_name']}: steps {m.get('start_step', 0)} -> {m.get('step')}"
              + (f", val_loss {m['val_loss']:.4f}" if "val_loss" in m else ""))
        print(f"  checkpoint: {summary['model_file']}")
        print(f"  MLflow:     {summary['mlflow_uri']} (run {summary['mlflow_run_id']}, "
              f"model version {summary['model_version']}, champion {summary['champion_version']})")


def cli_main(argv: Sequence[str] | None = None, *, variant: str | None = None,
             description: str | None = None) -> int:
    """``jobs/train.py`` (and ``jobs/train_ggm.py`` with ``variant="ggm"``): 0 on success; bad
    settings or data: one ``error:`` line and 2, other bad input (an unreadable file, ...): 1."""
    args = parse_args(argv, variant, description)
    outcome: TrainOutcome | None = None

    def run() -> None:
        nonlocal outcome
        outcome = train(config_from_args(args, variant))

    code = run_cli(run, None, (TrainError, DatasetError, ValueError, OSError), message=_first_line,
                   exit_code=lambda exc: 2 if isinstance(exc, (TrainError, DatasetError)) else 1)
    if code == 0:
        _print_outcome(outcome, args.json)
    return code
