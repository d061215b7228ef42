"""Downstream task metrics: COCO detection and instance-segmentation AP of decoded images, over bpp.

:func:`task_sweep` takes a checkpoint, a COCO-format set (images + annotation file) and a
detector factory (:mod:`pipeline.eval.detectors`). Every image is coded by

- the learned codec at each rate of ``rates`` for each roi-quality (``roicodec`` at the
  main ``roi_quality``; ``learned_uniform`` at 1.0, uniform quality; ``roicodec_q0.10``...),
  real ``.roic`` bytes decoded back and rounded to 8 bits;
- each classic baseline (JPEG / WebP / JPEG 2000, :mod:`pipeline.eval.baselines`) at the
  setting whose bpp is nearest to the ``roicodec`` file's at that rate, per image;
- nothing: the ``original`` image, the ceiling;

the detector runs on every decoded image, and COCOeval scores each (codec, rate) point
over the set (:mod:`pipeline.eval.cocoeval`). ROI masks for the codec: the annotated
objects (default), or any source :func:`pipeline.masks.build_mask` takes (saliency,
prompts...), or a folder of mask PNGs. The metrics binarise the mask at 0.5.

**Ray Data batch inference**: one item per image -> :class:`CodecStage` actors (the
checkpoint loaded once per actor; one row per codec x rate with the decoded image as
PNG bytes) -> :class:`DetectorStage` actors (the detector built once per actor, on a GPU
each when the cluster has them) -> rows streamed back to the driver, which writes the
COCO results files (``<results_dir>/<curve>_r<rate>.<bbox|segm>.json``, the format
``COCO.loadRes`` reads; segm files carry no ``bbox``, so that mask area defines small /
medium / large, as detectron2 does) and scores them. An image that cannot be read or
masked is an error row, left out of every point.

The result has the shape of :func:`pipeline.eval.rd.rd_sweep`'s (``curves`` of ``points``
with ``bpp``, ``psnr``, ``roi_psnr``..., plus ``bbox_AP``, ``bbox_AP50``... and ``segm_*``
when the detector returns masks; ``original``; ``bd``), with ``kind: "task"``. BD keys:
``bd_rate_map_vs_<anchor>`` (bbox AP as the quality axis), ``bd_rate_segm_map_vs_...``,
``bd_ap_map_vs_...`` (mean AP gain in AP points), next to the ``roi`` / ``psnr`` ones.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.codec.checkpoint import load_checkpoint
from pipeline.codec.coding import bits_per_pixel, decode, encode, image_to_tensor, mask_to_tensor, open_image
from pipeline.eval import baselines as bl
from pipeline.eval.cocoeval import AP_NAMES, IOU_TYPES, TaskSet, coco_scores, load_task_set
from pipeline.eval.detectors import Detector
from pipeline.eval.evaluate import (DEFAULT_ROI_QUALITY, LEARNED, METRICS, UNIFORM, EvaluationError, check_knobs,
                                    mask_path, nanmean, quality, quantize8, resolve_checkpoint, to_json)
from pipeline.eval.rd import DEFAULT_RATES, bd_psnr, bd_rate, curve_name, plot_rd

ORIGINAL = "original"
TASK_DISTORTIONS = {"roi": "roi_psnr", "psnr": "psnr", "map": "bbox_AP", "segm_map": "segm_AP"}

ROW_SCHEMA = pa.schema([("image_id", pa.int64()), ("file", pa.string()), ("codec", pa.string()),
                        ("roi_quality", pa.float64()), ("rate", pa.float64()), ("setting", pa.float64()),
                        *((m, pa.float64()) for m in METRICS), ("png", pa.binary()), ("error", pa.string())])


# -- stage 1: code every image with every codec -------------------------------------------------

def _png(x: torch.Tensor) -> bytes:
    arr = (x[0].clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def roi_mask(image: Image.Image, file: str, plan: dict[str, Any]) -> np.ndarray | Image.Image:
    """The codec's ROI mask of one image: a mask file, else :func:`build_mask` of the plan's sources."""
    if plan.get("masks_dir"):
        return open_image(mask_path(plan["masks_dir"], Path(file)))  # mask_to_tensor reads it as gray
    from pipeline.masks import build_mask

    return build_mask(image, image_name=Path(file).name, **plan["mask_options"])


def code_image(model, path: Path, image_id: int, file: str, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row of one image: the original, each learned curve and each baseline at each rate."""
    image = open_image(path).convert("RGB")
    x = image_to_tensor(image)
    h, w = x.shape[-2:]
    m = mask_to_tensor(roi_mask(image, file, plan), (h, w))
    nan = float("nan")

    def row(codec: str, q: float, rate: float, setting: float, bpp: float, x_hat: torch.Tensor) -> dict[str, Any]:
        return {"image_id": image_id, "file": file, "codec": codec, "roi_quality": q, "rate": rate,
                "setting": setting, "bpp": bpp, **quality(x, x_hat, m), "png": _png(x_hat), "error": ""}

    rows = [row(ORIGINAL, nan, nan, nan, 24.0, x)]
    main = plan["roi_quality"]
    for r in plan["rates"]:
        main_bpp = nan
        for q in plan["roi_qualities"]:
            with torch.no_grad():
                data = encode(model, x, m, q, r)
                x_hat = quantize8(decode(model, data))
            bpp = bits_per_pixel(data, w, h)
            main_bpp = bpp if math.isclose(q, main) else main_bpp
            rows.append(row(curve_name(q, main), q, r, r, bpp, x_hat))
        for name in plan["baselines"]:
            res = bl.encode_at_bpp(name, image, main_bpp)
            rows.append(row(name, nan, r, res.setting, res.bpp, res.x_hat))
    return rows


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class CodecStage:
    """Ray Data stage: image items in, one row per (codec, rate) out; the checkpoint loaded once."""

    def __init__(self, checkpoint: str, plan: dict[str, Any], threads: int = 1, cuda: bool = False) -> None:
        torch.set_num_threads(threads)
        self.model = load_checkpoint(checkpoint)
        if cuda and torch.cuda.is_available():
            self.model = self.model.cuda()
        self.plan = plan

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows: list[dict[str, Any]] = []
        for image_id, file, path in zip(batch["image_id"], batch["file"], batch["path"]):
            try:
                rows.extend(code_image(self.model, Path(path), int(image_id), str(file), self.plan))
            except (ValueError, OSError) as exc:  # unreadable image, bad mask, codec refusal
                rows.append({"image_id": int(image_id), "file": str(file), "codec": "", "png": b"",
                             "error": _first_line(exc)})
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# -- stage 2: detect ------------------------------------------------------------------------------

class DetectorStage:
    """Ray Data stage: decoded rows in, their detections (JSON) out; the detector built once."""

    def __init__(self, detector_factory: Callable[[], Detector], threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.detector = detector_factory()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.drop_columns(["png"]).to_pylist()
        pngs = batch.column("png").to_pylist()
        ok = [k for k, r in enumerate(rows) if not r["error"]]
        images = [np.asarray(Image.open(io.BytesIO(pngs[k])).convert("RGB")) for k in ok]
        found = self.detector(images, [rows[k]["image_id"] for k in ok]) if ok else []
        if len(found) != len(ok):
            raise EvaluationError(f"the detector returned {len(found)} result lists for {len(ok)} images")
        detections = [""] * len(rows)
        for k, dets in zip(ok, found):
            detections[k] = json.dumps([{**d, "image_id": rows[k]["image_id"]} for d in dets])
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA.remove(ROW_SCHEMA.get_field_index("png"))
                                    ).append_column("detections", pa.array(detections, pa.string()))


# -- the sweep ------------------------------------------------------------------------------------

def _rate_tag(rate: float) -> str:
    return f"r{rate:.2f}"


def _results_by_type(detections: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """bbox results (no segmentation) and, when masks came back, segm results (no bbox)."""
    out = {"bbox": [{k: v for k, v in d.items() if k != "segmentation"} for d in detections]}
    if any("segmentation" in d for d in detections):
        out["segm"] = [{k: v for k, v in d.items() if k != "bbox"} for d in detections if "segmentation" in d]
    return out


def _score_point(task_set: TaskSet, image_ids: list[int], rows: list[dict[str, Any]], iou_types: list[str],
                 results_dir: Path, stem: str) -> dict[str, Any]:
    detections = [d for r in rows for d in json.loads(r["detections"])]
    by_type = _results_by_type(detections)
    point: dict[str, Any] = {"n_images": len(rows), "results": {}}
    for iou in iou_types:
        results = by_type.get(iou, [])
        path = results_dir / f"{stem}.{iou}.json"
        path.write_text(json.dumps(results))
        point["results"][iou] = str(path)
        point.update({f"{iou}_{k}": v for k, v in coco_scores(task_set.coco, results, iou, image_ids).items()})
    return point


def _bd(anchor: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for short, key in TASK_DISTORTIONS.items():
        if key not in test[0] or key not in anchor[0]:
            continue
        scale = 100.0 if key.endswith("_AP") else 1.0  # AP in points
        args = ([p["bpp"] for p in anchor], [scale * p[key] for p in anchor],
                [p["bpp"] for p in test], [scale * p[key] for p in test])
        out[f"bd_rate_{short}"] = bd_rate(*args)
        out[f"bd_{'ap' if scale != 1.0 else 'psnr'}_{short}"] = bd_psnr(*args)
    return out


def task_plan(rates: Sequence[float], roi_quality: float, roi_qualities: Sequence[float] | None,
              baselines: Sequence[str], annotations: str | Path, masks_dir: str | Path | None = None,
              mask_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What :class:`CodecStage` does per image: the rates, the roi-qualities (the main one first,
    then ``roi_qualities``, default 1.0), the baselines that run, where the ROI masks come from
    (absolute paths: Ray's workers may run elsewhere). Checks the knobs."""
    rates = sorted({float(r) for r in rates})
    if not rates:
        raise EvaluationError("the task evaluation needs at least one rate")
    qs = [float(roi_quality)] + [float(q) for q in (roi_qualities if roi_qualities is not None else (1.0,))
                                 if not math.isclose(q, roi_quality)]
    for q in qs:
        for r in rates:
            check_knobs(q, r)
    return {"rates": rates, "roi_qualities": qs, "roi_quality": float(roi_quality), "baselines": list(baselines),
            "masks_dir": None if masks_dir is None else str(Path(masks_dir).resolve()),
            "mask_options": mask_options if mask_options is not None else
            {"coco_annotations": str(Path(annotations).resolve())}}


def task_sweep(checkpoint: str | Path, images_dir: str | Path, masks_dir: str | Path | None = None, *,
               annotations: str | Path, detector: Callable[[], Detector],
               mask_options: dict[str, Any] | None = None, roi_quality: float = DEFAULT_ROI_QUALITY,
               rates: Sequence[float] = DEFAULT_RATES, roi_qualities: Sequence[float] | None = None,
               baselines: Iterable[str] = bl.BASELINES, results_dir: str | Path | None = None,
               limit: int | None = None, codec_actors: int = 1, detector_actors: int = 1,
               actor_cpus: float = 1.0, use_gpu: bool | None = None, codec_gpus: float = 0.0,
               batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Task metrics of a checkpoint and the baselines on a COCO-format set (see the module docstring).

    ``detector``: a picklable factory, called once per detector actor. ``mask_options``:
    :func:`pipeline.masks.build_mask` keywords (default: the annotated objects); ignored
    with ``masks_dir``. ``results_dir``: where the COCO results files stay (default: a
    temporary folder, removed). ``use_gpu=None``: one GPU per detector actor when the Ray
    cluster has them; ``codec_gpus``: the GPU share of each codec actor (0: CPU; entropy
    coding stays on the CPU either way). Raises :class:`EvaluationError` (one line) on bad input.
    """
    t0 = time.perf_counter()
    run, skipped = bl.available_baselines([bl.get_baseline(n).name for n in baselines])
    plan = task_plan(rates, roi_quality, roi_qualities, run, annotations, masks_dir, mask_options)
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise EvaluationError(f"masks folder not found: {masks_dir}")
    if min(codec_actors, detector_actors, batch_size) < 1 or actor_cpus <= 0 or codec_gpus < 0:
        raise EvaluationError("actors and batch size must be >= 1, actor CPUs > 0 and codec GPUs >= 0")
    task_set = load_task_set(annotations, images_dir, limit)
    if hasattr(detector, "check"):
        detector.check()  # missing weights: fail before starting Ray
    ckpt = resolve_checkpoint(checkpoint).resolve()  # absolute: Ray's workers may run elsewhere
    variant = load_checkpoint(ckpt).variant
    items = [{"image_id": i, "file": f, "path": str(p.resolve())} for i, f, p in task_set.images]
    rows_per_image = 1 + len(plan["rates"]) * (len(plan["roi_qualities"]) + len(run))

    import ray

    from pipeline.ray_session import ensure_ray

    started = ensure_ray()
    tmp = tempfile.TemporaryDirectory(prefix="roicodec-task-") if results_dir is None else None
    out_dir = Path(tmp.name if tmp is not None else results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        gpus = use_gpu if use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
        threads = max(1, int(actor_cpus))
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(CodecStage, fn_constructor_args=(str(ckpt), plan),
                            fn_constructor_kwargs={"threads": threads, "cuda": codec_gpus > 0}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=codec_actors), num_cpus=actor_cpus,
                            num_gpus=codec_gpus)
        ds = ds.map_batches(DetectorStage, fn_constructor_args=(detector,), fn_constructor_kwargs={"threads": threads},
                            batch_size=batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=detector_actors), num_cpus=actor_cpus,
                            num_gpus=1 if gpus else 0)
        groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
        errors: dict[str, str] = {}
        bar = tqdm(total=len(items) * rows_per_image, desc="task eval", unit="code", disable=not progress,
                   file=sys.stderr)
        for row in ds.iter_rows():
            if row["error"]:
                errors[row["file"]] = row["error"]
                bar.update(rows_per_image)
                continue
            key = (row["codec"], None if row["codec"] == ORIGINAL else row["rate"])  # the original's rate: nan
            groups.setdefault(key, []).append(row)
            bar.update()
        bar.close()
    finally:
        if started:
            ray.shutdown()
    try:
        result = _score(task_set, groups, errors, plan, out_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    seconds = time.perf_counter() - t0
    result.update({"checkpoint": str(ckpt), "variant": variant, "images_dir": str(images_dir),
                   "annotations": str(annotations), "masks_dir": plan["masks_dir"],
                   "mask_options": plan["mask_options"], "detector": repr(detector),
                   "baselines_skipped": skipped, "results_dir": None if tmp is not None else str(out_dir),
                   "seconds": round(seconds, 2), "images_per_s": round(len(items) / seconds, 4),
                   "codes_per_s": round(len(items) * rows_per_image / seconds, 4), "gpu": bool(gpus)})
    return result


def _score(task_set: TaskSet, groups: dict[tuple[str, float | None], list[dict[str, Any]]], errors: dict[str, str],
           plan: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """COCOeval every (codec, rate) group; curves, the original's scores and the BD numbers."""
    bad = set(errors)
    image_ids = [i for i, f, _ in task_set.images if f not in bad]
    if not image_ids:
        first = next(iter(errors.values()), "nothing to do")
        raise EvaluationError(f"no image of {task_set.images_dir} could be evaluated ({len(errors)} errors; "
                              f"first: {first})")
    has_masks = any('"segmentation"' in r["detections"] for rows in groups.values() for r in rows)
    iou_types = [t for t in IOU_TYPES if t == "bbox" or has_masks]
    curves: dict[str, dict[str, Any]] = {}
    original: dict[str, Any] = {}
    for (codec, rate), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0)):
        stem = ORIGINAL if codec == ORIGINAL else f"{codec}_{_rate_tag(rate)}"
        point = _score_point(task_set, image_ids, rows, iou_types, out_dir, stem)
        point.update({k: nanmean(r[k] for r in rows) for k in METRICS})
        if codec == ORIGINAL:
            original = point
            continue
        point.update({"rate": rate, "setting": nanmean(r["setting"] for r in rows)})
        learned = codec not in plan["baselines"]
        c = curves.setdefault(codec, {"kind": "learned" if learned else "baseline",
                                      "roi_quality": rows[0]["roi_quality"] if learned else None, "points": []})
        c["points"].append(point)
    for c in curves.values():
        c["points"].sort(key=lambda p: p["bpp"])
    anchors = {n: n for n in plan["baselines"] if n in curves}
    if UNIFORM in curves:
        anchors["uniform"] = UNIFORM
    bd_by_curve = {name: {a: _bd(curves[src]["points"], c["points"]) for a, src in anchors.items() if src != name}
                   for name, c in curves.items() if c["kind"] == "learned"}
    bd = {f"{k}_vs_{a}": v for a, vals in bd_by_curve.get(LEARNED, {}).items() for k, v in vals.items()}
    return {"kind": "task", "roi_quality": plan["roi_quality"], "rates": plan["rates"],
            "roi_qualities": plan["roi_qualities"], "iou_types": iou_types, "n_images": len(image_ids),
            "errors": [{"image": f, "error": e} for f, e in sorted(errors.items())],
            "original": original, "curves": curves, "bd": bd, "bd_by_curve": bd_by_curve}


# -- outputs --------------------------------------------------------------------------------------

def task_plot_metrics(result: dict[str, Any]) -> list[str]:
    """The metrics plotted against bpp: AP of each IoU type, then ROI PSNR and PSNR."""
    return [f"{t}_AP" for t in result["iou_types"]] + ["roi_psnr", "psnr"]


def write_task_outputs(result: dict[str, Any], out_dir: str | Path, json_path: str | Path | None = None
                       ) -> dict[str, Any]:
    """Plots (``task_<metric>.png``), ``task_points.csv``, ``task_bd.csv`` and the JSON.

    Returns {"json", "points_csv", "bd_csv", "plots": [...]}, like :func:`pipeline.eval.rd.write_rd_outputs`.
    """
    import csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = [f"{t}_{a}" for t in result["iou_types"] for a in AP_NAMES]
    points_csv = out / "task_points.csv"
    with points_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["curve", "kind", "roi_quality", "rate", "setting", *METRICS, *scores, "n_images"])
        rows = [(ORIGINAL, "original", None, {**result["original"], "rate": None, "setting": None})]
        rows += [(n, c["kind"], c["roi_quality"], p) for n, c in result["curves"].items() for p in c["points"]]
        for name, kind, q, p in rows:
            w.writerow([name, kind, _fmt(q), _fmt(p["rate"]), _fmt(p["setting"]),
                        *(_fmt(p.get(k)) for k in (*METRICS, *scores)), p["n_images"]])
    bd_csv = out / "task_bd.csv"
    with bd_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["curve", "anchor", "key", "value"])
        for cname, per_anchor in result["bd_by_curve"].items():
            for anchor, vals in per_anchor.items():
                for key, v in vals.items():
                    w.writerow([cname, anchor, key, _fmt(v)])
    plots = []
    for metric in task_plot_metrics(result):
        short = next((s for s, k in TASK_DISTORTIONS.items() if k == metric), "psnr")
        plots.append(str(plot_rd(result, metric, out / f"task_{metric}.png", bd_key=short,
                                 reference=result["original"].get(metric) if metric.endswith("_AP") else None)))
    jp = Path(json_path) if json_path is not None else out / "task.json"
    files = {"json": str(jp), "points_csv": str(points_csv), "bd_csv": str(bd_csv), "plots": plots}
    to_json({**result, "files": files}, jp)
    return files


def _fmt(v: Any) -> str:
    return "" if v is None or not math.isfinite(float(v)) else f"{float(v):.6g}"


def task_summary_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines: the original's AP, each curve's bpp and AP per rate, the BD-rates on mAP."""
    iou = result["iou_types"]
    lines = [f"{result['n_images']} images ({len(result['errors'])} skipped), detector {result['detector']}",
             "  original         " + "  ".join(f"{t} AP {result['original'][f'{t}_AP']:.3f}" for t in iou)]
    for name, c in result["curves"].items():
        pts = ", ".join(f"{p['bpp']:.3f} bpp: " + "/".join(f"{p[f'{t}_AP']:.3f}" for t in iou) for p in c["points"])
        lines.append(f"  {name:<16} {pts}")
    for key in sorted(k for k in result["bd"] if k.startswith("bd_rate_") and "map" in k):
        lines.append(f"  {key:<30} {result['bd'][key]:+8.2f} %")
    return lines
