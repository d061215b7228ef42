"""The ``roicodec evaluate`` command: arguments and handler.

Errors are :class:`~pipeline.eval.evaluate.EvaluationError` (a ``ValueError``) with a
one-line message, or the codec's ``CheckpointError`` (also a ``ValueError``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.argtypes import positive_int, unit_interval
from pipeline.codec.default_model import DEFAULT, default_checkpoint

if TYPE_CHECKING:
    from pipeline.eval.perceptual import LPIPSDistance

EVALUATE_HELP = "evaluate a checkpoint: bpp, ROI/non-ROI PSNR, MS-SSIM vs JPEG/WebP/JPEG 2000"

EVALUATE_DESCRIPTION = """\
Evaluate a checkpoint on a folder of images with real bitstreams.

Every image is compressed to a .roic file with its mask and decoded back; bpp is
the real file size. JPEG, WebP and JPEG 2000 (Pillow) are run at the setting whose
bpp is nearest to the learned file's, and the same checkpoint with ROI off
(uniform quality, rate searched for the nearest bpp) is the learned baseline.
Per image and mean: bpp, psnr, roi_psnr, nonroi_psnr, weighted_psnr (each
pixel's error weighted by its quality m + (1 - m) Q), ms_ssim for every codec,
and perceptual metrics: haarpsi (1 = identical), gmsd (0 = identical), and
texture_roi / texture_nonroi (fine-band Laplacian energy of the decoded image over
the original's inside / outside the ROI: 1 = as detailed as the original, < 1
smoother, > 1 noisier). With --vgg-weights also lpips, lpips_roi, lpips_nonroi.

Masks are MASKS/<image stem>.png (white = ROI). Without --masks the whole image
is ROI: roi_psnr equals psnr and nonroi_psnr is null. With --soft the codec takes
each mask as a graded quality map (m + (1 - m) Q, ramps kept: a step per latent
cell) rather than a binary ROI; quality maps themselves: --soft --roi-quality 0. Unreadable images are
listed under "errors" in the JSON and skipped.

With --sweep: RD curves over --sweep-rates rates for each --sweep-roi-quality
(and the baselines over their own quality range), BD-rate and BD-PSNR on ROI
PSNR, PSNR and quality-weighted PSNR against every baseline, PNG plots and CSV tables.

With --task-annotations ANN.json (a COCO-format set: --images holds its images):
task metrics. Every image is coded at each of --sweep-rates (the baselines at the
bpp nearest to the learned file's), a torchvision detector runs on the decoded
images and on the originals (the ceiling), and pycocotools' COCOeval scores each
point (bbox AP, and segm AP with Mask R-CNN): AP-vs-bpp plots next to ROI PSNR
and PSNR, BD-rate on mAP, COCO results files. Runs as Ray Data batch inference
(codec actors, then detector actors; GPUs when the cluster has them)."""

EVALUATE_EPILOG = """\
examples:
  roicodec evaluate --checkpoint ckpt.pt --images imgs/ --masks masks/ --json eval.json
  roicodec evaluate --checkpoint ckpt.pt --images imgs/ --masks masks/ --json rd.json \\
      --sweep --plots rd_plots/
  roicodec evaluate --checkpoint ckpt.pt --images val2017/ --json task.json \\
      --task-annotations annotations/instances_val2017.json --detector maskrcnn_resnet50_fpn

MLflow: when the checkpoint belongs to a run (its metadata has mlflow_run_id, or a
Ray Train run_name found in the store), the metrics and files are logged to that
run (store: --mlflow-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value}: a curve needs at least 2 rates")
    return value


def add_evaluate_arguments(parser: argparse.ArgumentParser, default_model: bool = False) -> None:
    """Add the ``roicodec evaluate`` options to ``parser`` (``default_model``: without
    ``--checkpoint``, the installed pretrained model)."""
    from pipeline.eval.baselines import BASELINES
    from pipeline.eval.evaluate import DEFAULT_RATE, DEFAULT_ROI_QUALITY

    parser.add_argument("--checkpoint", default=DEFAULT if default_model else None, metavar="CKPT",
                        help="model checkpoint (.pt, or a Ray Train checkpoint folder with model.pt)"
                             + ("; default: the pretrained model installed with roicodec" if default_model else ""))
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images to evaluate")
    parser.add_argument("--masks", metavar="DIR", default=None,
                        help="folder of masks DIR/<image stem>.png, white = ROI (default: whole image is ROI)")
    parser.add_argument("--json", required=True, metavar="OUT.json", help="where to write the results")
    parser.add_argument("--roi-quality", type=unit_interval, default=DEFAULT_ROI_QUALITY, metavar="Q",
                        help="value of non-ROI pixels in [0,1]; 1 = uniform quality (default %(default)s)")
    parser.add_argument("--soft", action="store_true",
                        help="graded quality maps: each latent cell's step from the soft mask's quality "
                             "m + (1 - m) Q instead of a binary ROI (masks that are quality maps: --roi-quality 0)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=unit_interval, default=DEFAULT_RATE, metavar="R",
                      help="continuous rate in [0,1] of the single operating point (default %(default)s)")
    mode.add_argument("--sweep", action="store_true",
                      help="RD curves over rates and roi-qualities, BD-rate/BD-PSNR, plots and CSV")
    parser.add_argument("--sweep-rates", type=_count, default=5, metavar="K",
                        help="with --sweep or --task-annotations: K rates evenly spaced on [0,1] "
                             "(default %(default)s)")
    parser.add_argument("--sweep-roi-quality", dest="sweep_roi_qualities", type=unit_interval, nargs="+",
                        default=None, metavar="Q",
                        help="with --sweep: roi-qualities to sweep besides --roi-quality (default: 1.0, "
                             "the uniform learned baseline)")
    parser.add_argument("--plots", metavar="DIR", default=None,
                        help="with --sweep or --task-annotations: folder for the PNG plots and CSV tables "
                             "(default: <OUT>_rd/ or <OUT>_task/ next to the JSON)")
    parser.add_argument("--baselines", nargs="+", choices=BASELINES, default=list(BASELINES),
                        help="classic codecs to compare with (default: all)")
    parser.add_argument("--vgg-weights", metavar="FILE", default=None,
                        help="torchvision's VGG-16 weights (vgg16-397923af.pth; never downloaded): adds LPIPS, "
                             "whole and inside/outside the ROI (default: no LPIPS)")
    parser.add_argument("--pictures", metavar="DIR", default=None,
                        help="with a single operating point: one picture per image in DIR, original | this "
                             "checkpoint at --rate | JPEG at the same file size, captioned with bpp, PSNR and "
                             "background texture")
    parser.add_argument("--pictures-against", metavar="CKPT", default=None,
                        help="with --pictures: another checkpoint shown first at --rate, this one at the same "
                             "file size (e.g. the MSE model a perceptual stage started from)")
    add_task_arguments(parser)
    parser.add_argument("--mlflow-uri", default=None, metavar="URI",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The task-metric options (COCO detection / segmentation on decoded images)."""
    from pipeline.eval.detectors import DEFAULT_DETECTOR, DEFAULT_WEIGHTS, DETECTOR_ARCHS

    g = parser.add_argument_group("task metrics on a COCO-format set (detection / instance segmentation AP)")
    g.add_argument("--task-annotations", metavar="ANN.json", default=None,
                   help="COCO annotation file of the --images set: evaluate detector AP over bpp")
    g.add_argument("--detector", choices=DETECTOR_ARCHS, default=DEFAULT_DETECTOR,
                   help="torchvision detection model (maskrcnn_* also give segm AP; default %(default)s)")
    g.add_argument("--detector-weights", default=DEFAULT_WEIGHTS, metavar="W",
                   help="a weights file, a torchvision weight name read from the local torch cache "
                        "(DEFAULT, COCO_V1; never downloaded), or 'random' (smoke runs only); default %(default)s")
    g.add_argument("--detector-min-size", type=positive_int, default=800, metavar="PX",
                   help="the detector's input resize, shorter side (default %(default)s)")
    g.add_argument("--detector-max-size", type=positive_int, default=1333, metavar="PX",
                   help="the detector's input resize, longer side at most (default %(default)s)")
    g.add_argument("--detector-score-threshold", type=unit_interval, default=0.05, metavar="S",
                   help="drop detections scored below S (default %(default)s)")
    g.add_argument("--roi-from", choices=("annotations", "saliency"), default="annotations",
                   help="the codec's ROI masks when --masks is not given: the annotated objects or "
                        "saliency (default %(default)s)")
    g.add_argument("--roi-prompt", nargs="+", default=None, metavar="TEXT",
                   help="the codec's ROI masks from CLIP text prompts instead (CLIP weights cached locally)")
    g.add_argument("--task-limit", type=positive_int, default=None, metavar="N", help="only the first N images")
    g.add_argument("--codec-actors", type=positive_int, default=1, metavar="N",
                   help="Ray actors coding images (default %(default)s)")
    g.add_argument("--detector-actors", type=positive_int, default=1, metavar="N",
                   help="Ray actors running the detector, one GPU each when the cluster has GPUs "
                        "(default %(default)s)")
    g.add_argument("--codec-gpus", type=unit_interval, default=0.0, metavar="G",
                   help="GPU share of each codec actor, e.g. 0.5 (default %(default)s: CPU)")


def detector_spec(args: argparse.Namespace):
    """The detector factory the task options describe."""
    from pipeline.eval.detectors import TorchvisionDetectorSpec

    return TorchvisionDetectorSpec(args.detector, args.detector_weights, args.detector_min_size,
                                   args.detector_max_size, args.detector_score_threshold)


def task_keywords(args: argparse.Namespace) -> dict:
    """:func:`pipeline.eval.task.task_sweep`'s keywords from the task options."""
    if args.roi_prompt:
        mask_options = {"prompts": args.roi_prompt}
    elif args.roi_from == "saliency":
        mask_options = {"saliency": True}
    else:
        mask_options = None  # the annotated objects
    return {"annotations": args.task_annotations, "detector": detector_spec(args), "mask_options": mask_options,
            "limit": args.task_limit, "codec_actors": args.codec_actors, "detector_actors": args.detector_actors,
            "codec_gpus": args.codec_gpus}


def run_task_command(args: argparse.Namespace) -> dict:
    """``roicodec evaluate --task-annotations``: the task sweep, its files, MLflow; prints a summary."""
    from pipeline.eval.evaluate import to_json
    from pipeline.eval.rd import log_to_mlflow
    from pipeline.eval.task import task_summary_lines, task_sweep, write_task_outputs

    out_json = Path(args.json)
    plots_dir = Path(args.plots) if args.plots else out_json.with_name(out_json.stem + "_task")
    result = task_sweep(args.checkpoint, args.images, args.masks, roi_quality=args.roi_quality,
                        rates=sweep_rates(args.sweep_rates), roi_qualities=args.sweep_roi_qualities,
                        baselines=args.baselines, results_dir=plots_dir / "results",
                        progress=not args.no_progress, **task_keywords(args))
    files = write_task_outputs(result, plots_dir, json_path=out_json)
    if not args.no_mlflow:
        info = log_to_mlflow(result, [files["json"], files["points_csv"], files["bd_csv"], *files["plots"]],
                             args.mlflow_uri)
        if info.get("run_id"):  # the JSON again, with the MLflow run (the plots stay as drawn)
            result["files"], result["mlflow"] = files, info
            to_json(result, out_json)
    for line in task_summary_lines(result):
        print(line)
    print(f"{out_json}; plots, CSV and COCO results files in {plots_dir}")
    return result


def lpips_from_args(args: argparse.Namespace) -> LPIPSDistance | None:
    """The LPIPS model of ``--vgg-weights``, or None without it (LPIPS is not a task metric)."""
    if getattr(args, "vgg_weights", None) is None:
        return None
    if getattr(args, "task_annotations", None) is not None:
        from pipeline.eval.evaluate import EvaluationError
        raise EvaluationError("--vgg-weights (LPIPS) works with evaluate and --sweep, not --task-annotations")
    from pipeline.eval.perceptual import load_lpips
    return load_lpips(args.vgg_weights)


def write_pictures(args: argparse.Namespace, result: dict, lpips: LPIPSDistance | None) -> Path:
    """``--pictures``: one comparison picture per image the evaluation read; returns the folder."""
    from pipeline.eval.pictures import checkpoint_label, comparison_pictures

    shown = [args.checkpoint] if args.pictures_against is None else [args.pictures_against, args.checkpoint]
    images = [Path(args.images) / row["image"] for row in result["images"]]
    comparison_pictures([(checkpoint_label(c), c) for c in shown], images, args.masks,
                        args.roi_quality, args.rate, args.pictures, lpips)
    return Path(args.pictures)


def sweep_rates(k: int) -> list[float]:
    """K rates evenly spaced on [0, 1]."""
    return [round(i / (k - 1), 6) for i in range(k)]


def run_evaluate_command(args: argparse.Namespace) -> int:
    """Handler of ``roicodec evaluate``; prints a summary and returns 0."""
    from pipeline.eval.evaluate import EvaluationError, evaluate_checkpoint, summary_lines, to_json
    from pipeline.eval.rd import log_to_mlflow, rd_sweep, write_rd_outputs

    if getattr(args, "checkpoint", None) is None:
        raise EvaluationError("--checkpoint is required")
    if args.checkpoint == DEFAULT:
        args.checkpoint = str(default_checkpoint())
    if args.plots is not None and not (args.sweep or args.task_annotations):
        raise EvaluationError("--plots needs --sweep or --task-annotations (plots are RD curves)")
    if args.pictures_against is not None and args.pictures is None:
        raise EvaluationError("--pictures-against needs --pictures DIR")
    if args.soft and (args.pictures is not None or args.task_annotations is not None):
        raise EvaluationError("--soft (graded quality maps) evaluates --rate and --sweep points; "
                              "it does not apply to --pictures or --task-annotations")
    if args.pictures is not None and (args.sweep or args.task_annotations):
        raise EvaluationError("--pictures shows a single operating point (--rate), not --sweep or --task-annotations")
    progress = not args.no_progress
    out_json = Path(args.json)
    lpips = lpips_from_args(args)
    if args.task_annotations is not None:
        if args.sweep:
            raise EvaluationError("choose --sweep (pixel metrics) or --task-annotations (task metrics, which "
                                  "include ROI PSNR and PSNR)")
        result = run_task_command(args)
    elif args.sweep:
        result = rd_sweep(args.checkpoint, args.images, args.masks, roi_quality=args.roi_quality,
                          rates=sweep_rates(args.sweep_rates), roi_qualities=args.sweep_roi_qualities,
                          baselines=args.baselines, progress=progress, lpips=lpips, graded=args.soft)
        plots_dir = Path(args.plots) if args.plots else out_json.with_name(out_json.stem + "_rd")
        files = write_rd_outputs(result, plots_dir, json_path=out_json)
        logged = [files["json"], files["points_csv"], files["bd_csv"], *files["plots"]]
        mlflow_info = None if args.no_mlflow else log_to_mlflow(result, logged, args.mlflow_uri)
        if mlflow_info is not None and mlflow_info.get("run_id"):
            result["files"], result["mlflow"] = files, mlflow_info
            to_json(result, out_json)
        bd = result["bd"]
        print(f"{result['n_images']} images ({len(result['errors'])} skipped), {len(result['curves'])} curves")
        for key in sorted(bd):
            if key.startswith("bd_rate"):
                print(f"  {key:<28} {bd[key]:+8.2f} %")
        print(f"{out_json}; plots and CSV in {plots_dir}")
    else:
        result = evaluate_checkpoint(args.checkpoint, args.images, args.masks, roi_quality=args.roi_quality,
                                     rate=args.rate, baselines=args.baselines, progress=progress, lpips=lpips,
                                     graded=args.soft)
        to_json(result, out_json)
        if not args.no_mlflow:
            info = log_to_mlflow(result, [out_json], args.mlflow_uri)
            if info.get("run_id"):
                result["mlflow"] = info
                to_json(result, out_json)
        for line in summary_lines(result):
            print(line)
        print(out_json)
        if args.pictures is not None:
            print(f"pictures: {write_pictures(args, result, lpips)}")
    info = result.get("mlflow")
    if info and info.get("run_id"):
        state = "logged to" if info["logged"] else f"NOT logged ({info.get('error')}) to"
        print(f"MLflow: {state} run {info['run_id']} ({info['tracking_uri']})", file=sys.stderr)
    return 0

