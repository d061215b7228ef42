"""The main job on real photographs: masks, training, evaluation, champion, in one go.

Stages, each with progress:

1. write scikit-image's bundled photos (:mod:`pipeline.data.photos`: 12 to train on, 7
   held out, a split fixed before any training): the photos with obvious objects as a
   COCO root (hand-made boxes as annotations), the textures and micrographs in a plain
   folder, and the held-out photos with their evaluation masks (the boxes, or the
   saliency map binarised at 0.5 for a photo without objects);
2. start a local Ray and precompute ROI masks into Parquet shards with Ray Data
   (:func:`pipeline.data.preprocess.preprocess`): from the COCO annotations (one row per
   photo, all its objects as the ROI) and, for the textures, the saliency map;
3. fine-tune the pretrained default model (:mod:`pipeline.codec.default_model`) on these
   photos with Ray Train on CPU (:func:`pipeline.train.trainer.train`; :data:`FROM_INIT`), or,
   with ``init=None``, train a small codec from scratch: first on 64 px crops (fast), then the
   same run resumed for a few hundred steps on 128 px crops at lr / 10, so that the hyperprior
   sees more than one hyper-latent cell per crop (see :data:`FINETUNE`); tracked in a local
   MLflow store, the model registered there; with ``perceptual_steps``, TLIC's perceptual stage
   from the result (its own run, ``<run>-perceptual``; the VGG losses when torchvision's cache
   has VGG-16);
4. evaluate it on the held-out images through real ``.roic`` files against JPEG, WebP
   and JPEG 2000 (RD sweep, BD-rate, plots) and set the MLflow ``champion`` alias
   (:func:`pipeline.eval.rd.select_champion`);
5. compare with JPEG at the same bpp, image by image, at each rate; write one picture per
   held-out photo (the original with its ROI outlined, ours, the perceptual model at the same
   file size when there is one, JPEG at that size, captioned), and print a summary with the
   command that serves the trained model (and, for a fine-tuned model, the same table for the
   model it started from).

Safe to run twice: the photos are rewritten byte for byte, the preprocessing skips
images it already has, training resumes the same run (and does nothing when it has
reached ``steps``), evaluation outputs are overwritten.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pipeline.mlflow_store import sqlite_store

SCRATCH_MODEL = {"N": 64, "M": 96, "n_rates": 3}  # the from-scratch model
DEMO_RATES = (0.0, 0.25, 0.5, 0.75, 1.0)
EXPERIMENT = "roicodec-demo"


@dataclass
class DemoPaths:
    """Where the demo writes; everything lives under one folder. The data, shard and run names
    differ from those of the demo on generated images it replaced, so an old ``demo_out``
    is neither resumed nor mixed in."""

    root: Path

    @property
    def train_set(self) -> Path:
        return self.root / "data" / "train_photos"

    @property
    def eval_set(self) -> Path:
        return self.root / "data" / "eval_photos"

    @property
    def train_textures(self) -> Path:
        return self.root / "data" / "train_textures"

    @property
    def pictures(self) -> Path:
        return self.root / "pictures"

    @property
    def eval_masks(self) -> Path:
        return self.root / "data" / "eval_photos" / "masks"

    @property
    def shards(self) -> Path:
        return self.root / "photo_shards"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def mlflow_uri(self) -> str:  # the demo's own store, whatever MLFLOW_TRACKING_URI says
        return sqlite_store(self.root)


def _stage(i: int, text: str) -> None:
    print(f"\n[{i}/5] {text}", flush=True)


def write_eval_masks(annotations: Path, images: Sequence[Path], out_dir: Path) -> None:
    """The ROI mask of every evaluation image as ``<stem>.png`` (white = ROI): its annotated
    objects, or for an image without any its saliency map binarised at 0.5."""
    from pipeline.masks.coco import load_coco
    from pipeline.masks.ops import binarize
    from pipeline.masks.saliency import get_saliency_model

    coco = load_coco(annotations)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in images:
        image_id = coco.image_id(path.name)
        if coco.categories_in(image_id):
            mask = coco.mask(image_id)
        else:
            mask = binarize(get_saliency_model()(np.asarray(Image.open(path).convert("RGB"))))
        Image.fromarray((mask * 255).astype(np.uint8)).save(out_dir / f"{path.stem}.png")


def jpeg_at_matched_bpp(checkpoint: Path, images: Sequence[Path], masks_dir: Path, roi_quality: float,
                        rates: Sequence[float]) -> list[dict[str, float]]:
    """For each rate: mean bpp and ROI PSNR of the codec's real files and of JPEG at each file's bpp."""
    from pipeline.eval.baselines import jpeg_at_bpp
    from pipeline.eval.evaluate import learned_point, load_model, load_pair, quality

    model, _ = load_model(checkpoint)
    pairs = [load_pair(p, masks_dir) for p in images]
    rows = []
    for rate in rates:
        ours, jpeg = [], []
        for image, x, mask, _ in pairs:
            point = learned_point(model, x, mask, roi_quality, rate)
            ref = jpeg_at_bpp(image, point["bpp"])
            ours.append((point["bpp"], point["roi_psnr"], point["psnr"]))
            q = quality(x, ref.x_hat, mask)
            jpeg.append((ref.bpp, q["roi_psnr"], q["psnr"]))
        o, j = np.mean(ours, axis=0), np.mean(jpeg, axis=0)
        rows.append({"rate": float(rate), "bpp": float(o[0]), "roi_psnr": float(o[1]), "psnr": float(o[2]),
                     "jpeg_bpp": float(j[0]), "jpeg_roi_psnr": float(j[1]), "jpeg_psnr": float(j[2])})
    return rows


def side_by_side_pictures(checkpoint: Path, images: Sequence[Path], masks_dir: Path, roi_quality: float,
                          rate: float, out_dir: Path, perceptual: Path | None = None) -> list[Path]:
    """One side-by-side PNG per image (:mod:`pipeline.eval.pictures`) from a real file at ``rate``;
    with ``perceptual``, that model's file of the same size next to it."""
    from pipeline.eval.evaluate import load_model
    from pipeline.eval.pictures import comparison_pictures

    model, _ = load_model(checkpoint)
    title = f"ours ({'MSE, ' if perceptual else ''}{model.variant}), rate {rate:g}, roi-quality {roi_quality:g}"
    models = [(title, model)] + ([("ours, perceptual stage", perceptual)] if perceptual else [])
    return comparison_pictures(models, images, masks_dir, roi_quality, rate, out_dir)


DEMO_INIT = "default"  # the demo fine-tunes the pretrained default model (pipeline.codec.default_model)
# Fine-tuning from the default model: one stage on 128 px crops at a low rate (the default model
# was trained at 3e-4 on the same crops), the last 20% at lr / 10.
FROM_INIT = {"steps": 600, "crop": 128, "batch_size": 8, "lr": 1e-4}
SCRATCH_STEPS = 4400  # from scratch (``init=None``): a small model, two stages
# The second stage from scratch, resumed in the same run: 64 px crops give the hyper-latent z
# (stride 64) a single cell, so its entropy model never learns how neighbouring cells combine,
# and on whole images it mispredicts the latent scales. On the demo's images, coding 64 px tiles
# of an image took 2.7x fewer bits than coding it whole at the same ROI PSNR; a few hundred steps
# on 128 px crops (2x2 cells) remove that gap; 800 rather than 400 of them gave the ROI another
# ~0.5 dB at the highest rate (in-memory runs from the same first-stage checkpoint).
FINETUNE = {"steps": 800, "crop": 128, "batch_size": 4}


def init_source(init: str) -> tuple[Path | None, dict[str, int]]:
    """What ``init`` names (``default``: the installed model; anything ``--init`` takes): its
    roicodec checkpoint file, the model the demo compares its fine-tuned one with (None for
    CompressAI's weights), and its number of rate points as model options. ``InitError`` when
    the weights are missing."""
    from pipeline.codec.warm_start import load_init_source

    source = load_init_source(init)
    if source.kind != "roicodec":
        return None, {}
    n_rates = source.model_config.get("n_rates")
    return source.path, ({"n_rates": int(n_rates)} if n_rates else {})


def training_stages(base: Any, steps: int, lr: float, from_init: bool, finetune: dict[str, int] | None,
                    max_side: int) -> list[Any]:
    """The demo's training as :class:`TrainConfig` stages of one run, each resumed from the last
    (``base`` gives the run, the data and the model). From an init: :data:`FROM_INIT`'s one
    stage. From scratch: 64 px crops (a quarter of the cost of 128 px ones per step), half of
    them centred on an object (the objects are small), the last 20% at lr / 10; then
    ``finetune`` (over :data:`FINETUNE`; ``steps`` 0 skips it) on larger crops at lr / 10."""
    crop_cap = max_side // 64 * 64
    if from_init:
        return [replace(base, steps=steps, crop=min(FROM_INIT["crop"], crop_cap), batch_size=FROM_INIT["batch_size"],
                        lr=lr, lr_drop=0.2, checkpoint_every=max(steps // 3, 1))]
    tune = {**FINETUNE, **(finetune or {})}
    tune.update(steps=min(tune["steps"], steps // 2), crop=min(tune["crop"], crop_cap))
    first = replace(base, steps=steps - tune["steps"], batch_size=8, crop=64, lr=lr, lr_drop=0.2, aux_lr=1e-2,
                    checkpoint_every=max(steps // 3, 1))
    if tune["steps"] == 0:
        return [first]
    return [first, replace(first, steps=steps, crop=tune["crop"], batch_size=tune["batch_size"], lr=lr / 10,
                           lr_drop=0.0, checkpoint_every=tune["steps"])]


def run_stages(stages: Sequence[Any]) -> Any:
    """Train the stages in turn (one run); a stage the run is already past is skipped, except the
    last, which a re-run resumes (and finds done). The last stage's outcome."""
    from pipeline.train.trainer import latest_checkpoint, train

    outcome = None
    for i, stage in enumerate(stages):
        latest = latest_checkpoint(stage.storage_path, stage.run_name)
        if i == len(stages) - 1 or latest is None or latest[0] < stage.steps:
            if i > 0:
                print(f"  then {stage.steps - stages[i - 1].steps} steps on {stage.crop} px crops at lr {stage.lr:g}"
                      f" (same run)")
            outcome = train(stage)
    return outcome


def perceptual_stage(base: Any, checkpoint: Path, steps: int, crop: int, batch_size: int, lr: float) -> Path:
    """TLIC's second stage from ``checkpoint`` (:class:`TrainConfig` ``base`` as the MSE run's):
    its own run ``<run>-perceptual``, resumed when run again; its latest ``model.pt``."""
    from pipeline.train.perceptual.losses import vgg16_cache_path
    from pipeline.train.trainer import MODEL_FILE, latest_checkpoint, train

    run_name = f"{base.run_name}-perceptual"
    latest = latest_checkpoint(base.storage_path, run_name)
    if latest is not None and latest[0] >= steps:  # a re-run: the stage is done
        return latest[1] / MODEL_FILE
    vgg = vgg16_cache_path().is_file()
    print(f"  perceptual stage: {steps} steps on {crop} px crops from {checkpoint.parent.name}"
          f" ({'LPIPS and style losses' if vgg else 'no VGG-16 weights in the torch cache: L1, Laplacian, adversarial'})")
    outcome = train(replace(base, run_name=run_name, stage="perceptual", init=str(checkpoint),
                            steps=steps, crop=crop, batch_size=batch_size, lr=lr, lr_drop=0.0,
                            vgg_losses=vgg, checkpoint_every=steps, report_every=max(steps // 10, 1)))
    if outcome.checkpoint is None:
        raise RuntimeError("the perceptual stage finished without a checkpoint")
    return Path(outcome.checkpoint) / MODEL_FILE


def run_demo(out_dir: str | Path = "demo_out", steps: int | None = None, variant: str = "tma",
             max_side: int = 512, roi_quality: float = 0.1, model: dict[str, Any] | None = None,
             lr: float | None = None, finetune: dict[str, int] | None = None, picture_rate: float = 0.5,
             held_out: Sequence[str] | None = None, entropy: str | None = None,
             family: str | None = None, perceptual_steps: int = 0, init: str | None = DEMO_INIT) -> dict[str, Any]:
    """Run the whole pipeline on the real photos; return (and write) the summary.

    ``init`` (default ``"default"``, the pretrained default model; anything ``--init`` takes)
    is the model the demo fine-tunes for ``steps`` (default :data:`FROM_INIT`'s) at ``lr``
    (default 1e-4), and compares with the result; ``init=None`` trains a small model from
    scratch instead (``steps`` default :data:`SCRATCH_STEPS` in two stages, ``finetune``
    overriding :data:`FINETUNE`, ``lr`` default 1e-3). ``model`` gives the model's options
    (from an init: the weights' by default); ``entropy`` (the latent structure) and ``family``
    (the entropy family) override them (each choice its own training run:
    ``demo-photos-<variant>[-<entropy>][-<family>][-from-<init>]``). ``max_side`` bounds the
    photos' longer side; ``picture_rate`` is the rate of the side-by-side pictures; ``held_out``
    evaluates on some of the held-out photos only (default: all of them);
    ``perceptual_steps`` > 0 adds the perceptual stage and its model to the pictures.
    """
    import ray

    from pipeline.codec.models import MODELS, family_options
    from pipeline.data.photos import HELD_OUT, OBJECTS, TRAIN, write_photo_set
    from pipeline.data.preprocess import preprocess
    from pipeline.eval.evaluate import EvaluationError
    from pipeline.eval.rd import DEFAULT_CRITERION, select_champion
    from pipeline.ray_session import ensure_ray
    from pipeline.train.trainer import MODEL_FILE, TrainConfig

    start, init_options = init_source(init) if init is not None else (None, {})  # before anything runs
    paths = DemoPaths(Path(out_dir).resolve())
    _stage(1, f"real photos (scikit-image's samples) -> {paths.root / 'data'}")
    objects = [n for n in TRAIN if n in OBJECTS]
    textures = [n for n in TRAIN if n not in OBJECTS]
    train_set = write_photo_set(paths.train_set, objects, max_side)
    write_photo_set(paths.train_textures, textures, max_side, annotate=False)  # saliency is their ROI
    held_out = list(held_out or HELD_OUT)
    if not set(held_out) <= set(HELD_OUT):
        raise ValueError(f"held-out photos are {', '.join(HELD_OUT)}")
    eval_set = write_photo_set(paths.eval_set, held_out, max_side)
    write_eval_masks(eval_set.annotations, eval_set.image_files, paths.eval_masks)
    print(f"  training: {', '.join(objects)} (boxes: {', '.join(train_set.prompts.read_text().splitlines())})"
          f" and {', '.join(textures)} (saliency)\n  held out: {', '.join(held_out)}")

    started = ensure_ray()
    try:
        _stage(2, f"ROI masks + saliency with Ray Data -> {paths.shards}")
        # one row per photo with all its objects as the ROI, as in the evaluation masks
        prep = preprocess(paths.train_set, paths.shards, roi_source="coco", rows_per_shard=8, combine_prompts=True)
        more = preprocess(paths.train_textures, paths.shards, roi_source="saliency", rows_per_shard=8)
        prep = {k: prep[k] + more[k] for k in ("rows_written", "error_rows", "skipped_keys")}
        print(f"  rows written {prep['rows_written']}, already there {prep['skipped_keys']}, "
              f"errors {prep['error_rows']}")

        if init is not None:
            steps = FROM_INIT["steps"] if steps is None else steps
            lr = FROM_INIT["lr"] if lr is None else lr
            model = dict(model or init_options)
            origin = "-from-" + (init.replace(":", "-") if start is None or init == DEMO_INIT else Path(init).stem)
            _stage(3, f"fine-tuning {init} ({variant}) with Ray Train ({steps} steps, CPU)")
        else:
            steps = SCRATCH_STEPS if steps is None else steps
            lr = 1e-3 if lr is None else lr
            model = dict(model or {**SCRATCH_MODEL, **MODELS[variant].SMALL})
            origin = ""
            _stage(3, f"training a small {variant} codec ({entropy or 'hyperprior'}) with Ray Train "
                      f"({steps} steps, CPU)")
        if entropy is not None:
            model["entropy"] = entropy
        model.update(family_options(variant, family))
        run_name = "-".join([f"demo-photos-{variant}", *([entropy] if entropy not in (None, "hyperprior") else []),
                             *([model["family"]] if "family" in model else [])]) + origin
        base = TrainConfig(
            shards=str(paths.shards), variant=variant, model=model, init=init, val_crop=128, roi_crop_fraction=0.5,
            report_every=max(steps // 50, 1), keep=2, num_workers=1, cpus_per_worker=1.0,
            # one thread for the small model: on 2 cores a second intra-op thread made its small
            # steps ~15% slower; two for the default model's size
            torch_threads=2 if init is not None else 1, run_name=run_name,
            storage_path=str(paths.runs), mlflow_uri=paths.mlflow_uri, experiment=EXPERIMENT)
        stages = training_stages(base, steps, lr, init is not None, finetune, max_side)
        outcome = run_stages(stages)
        if outcome.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        checkpoint = Path(outcome.checkpoint) / MODEL_FILE
        perceptual = (perceptual_stage(stages[0], checkpoint, perceptual_steps, stages[-1].crop,
                                       stages[-1].batch_size, lr / 10)
                      if perceptual_steps > 0 else None)
    finally:
        if started:
            ray.shutdown()

    _stage(4, "RD sweep against JPEG / WebP / JPEG 2000 on the held-out images; MLflow champion")
    try:
        champion = select_champion([checkpoint], paths.eval_set / "images", paths.eval_masks,
                                   tracking_uri=paths.mlflow_uri, registered_model=f"roicodec-{variant}",
                                   out_dir=paths.report, roi_quality=roi_quality, rates=DEMO_RATES)
    except EvaluationError as exc:  # e.g. no overlap with JPEG's curve after very short training
        print(f"  no champion by BD-rate: {exc}; the champion stays the one training chose (val_loss)")
        champion = {"alias": None, "criterion": DEFAULT_CRITERION, "best": {"value": float("nan")}}

    _stage(5, f"the codec against JPEG at the same bpp (roi-quality {roi_quality}); pictures")
    matched = jpeg_at_matched_bpp(checkpoint, eval_set.image_files, paths.eval_masks, roi_quality, DEMO_RATES)
    before = (jpeg_at_matched_bpp(start, eval_set.image_files, paths.eval_masks, roi_quality, DEMO_RATES)
              if start is not None else None)
    pictures = side_by_side_pictures(checkpoint, eval_set.image_files, paths.eval_masks, roi_quality, picture_rate,
                                     paths.pictures, perceptual)
    summary = {"checkpoint": str(checkpoint), "perceptual_checkpoint": perceptual and str(perceptual),
               "mlflow_uri": paths.mlflow_uri, "mlflow_run_id": outcome.mlflow_run_id,
               "champion": champion["alias"], "report": champion["best"].get("files"), "train": outcome.summary(),
               "preprocess": prep, "bd": {champion["criterion"]: champion["best"]["value"]}, "vs_jpeg": matched,
               "init": init, "init_vs_jpeg": before,
               "pictures": [str(p) for p in pictures],
               "serve": f"python jobs/deploy.py --checkpoint {checkpoint}"}
    (paths.root / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print_summary(summary, paths)
    return summary


def print_summary(summary: dict[str, Any], paths: DemoPaths) -> None:
    """The short human summary: where things are, and the codec against JPEG."""
    report = summary["report"] or {"json": None, "plots": []}
    alias = summary["champion"]
    print(f"\ncheckpoint:  {summary['checkpoint']}")
    if summary.get("perceptual_checkpoint"):
        print(f"perceptual:  {summary['perceptual_checkpoint']}")
    print(f"report:      {report.get('json')}")
    print(f"plots:       {', '.join(report.get('plots', []))}")
    print(f"pictures:    {', '.join(summary['pictures'])}")
    print(f"MLflow:      {summary['mlflow_uri']} (run {summary['mlflow_run_id']})")
    if alias:
        print(f"champion:    models:/{alias['registered_model']}/{alias['version']} "
              f"(alias @{alias['alias']})")
    for key, value in summary["bd"].items():
        print(f"{key}: {value:+.1f}%" if math.isfinite(value) else f"{key}: n/a (curves do not overlap)")
    _print_rows("the trained model", summary["vs_jpeg"])
    if summary.get("init_vs_jpeg"):
        _print_rows(f"the model it started from ({summary['init']}), for comparison", summary["init_vs_jpeg"])
    print(f"\nsummary:     {paths.root / 'summary.json'}")
    print(f"serve it:    {summary['serve']}   # then open http://127.0.0.1:8000/")


def _print_rows(title: str, rows: Sequence[dict[str, float]]) -> None:
    """One table of :func:`jpeg_at_matched_bpp` rows."""
    print(f"\n{title} against JPEG at the same bpp:")
    print(f"{'rate':>5} {'bpp':>6} {'ROI PSNR':>9} {'PSNR':>6} {'JPEG bpp':>9} {'JPEG ROI':>9} {'JPEG PSNR':>9} "
          f"{'ROI gain':>8}")
    for r in rows:
        print(f"{r['rate']:>5.2f} {r['bpp']:>6.3f} {r['roi_psnr']:>9.2f} {r['psnr']:>6.2f} {r['jpeg_bpp']:>9.3f} "
              f"{r['jpeg_roi_psnr']:>9.2f} {r['jpeg_psnr']:>9.2f} {r['roi_psnr'] - r['jpeg_roi_psnr']:>+8.2f}")
