"""The mask preprocessing job: images (+ prompts / COCO) -> Ray Data -> Parquet shards.

Stages (Ray Data, streaming):

1. **decode + saliency** (tasks): read each file, decode with Pillow (grayscale,
   palette, RGBA, 16-bit are converted to 8-bit RGB; alpha dropped), shrink to at most
   ``max_side`` pixels on the longer side for the computation, compute the saliency
   map. Anything that fails here (corrupt or non-image file, decompression bomb)
   becomes rows with ``error`` set, never a failed job. A learned saliency model
   (``u2net``, ``u2netp``) runs in an actor pool instead (:class:`SaliencyStage`: one
   model load per actor, one GPU per actor when the cluster has GPUs).
2. **ROI masks**: ``clip`` in a callable-class actor pool (one model load per actor,
   one GPU per actor when the cluster has GPUs), ``coco`` in a one-actor pool (one
   annotation load), ``saliency`` in tasks (the ROI mask is the saliency map).
3. **shards**: the driver streams result batches of ``rows_per_shard`` rows into
   Parquet files with the schema of :mod:`pipeline.data.shards`, each written
   atomically under a name unique to the run.

Masks are stored at the original image size (width/height columns), upsampled from
the computation size. With ``combine_prompts`` an image gets one row instead, whose
mask is the union (pixelwise max) of its prompts' masks and whose prompt is the prompts
joined by :data:`COMBINED_SEPARATOR` (e.g. every annotated object of a COCO image as
one ROI). Rows are keyed by (image_id, prompt); keys already in the output
are skipped, so a re-run adds nothing and an interrupted run resumes with only the
missing work. A file that cannot be decoded gives one error row per key (per prompt),
so its keys count as done too; delete its rows' shard to retry it.

ROI source (``roi_source``, default: ``coco`` with annotations, else ``clip`` with
prompts, else ``saliency``); prompts are the given list, or per image the categories
annotated in the COCO file. An image with no prompt at all (a COCO image without
annotations) gets one row with a null prompt: its ROI mask is the saliency map for the
``saliency`` source and all zeros otherwise.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from pipeline.data.shards import SHARD_SCHEMA, existing_keys, shard_name, write_shard
from pipeline.masks.coco import CocoMasks
from pipeline.masks.ops import combine, from_png, resize, to_png, to_rgb_array
from pipeline.masks.saliency import DEFAULT_SALIENCY_MODEL, LEARNED_SALIENCY_MODELS, get_saliency_model
from pipeline.masks.text import (DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, TextMasker, load_clip_config,
                                 plan_clip_load)
from pipeline.ray_session import ensure_ray

log = logging.getLogger(__name__)

ROI_SOURCES = ("clip", "coco", "saliency")
COMBINED_SEPARATOR = " + "  # joins an image's prompts into one row's prompt (combine_prompts)

_DECODED_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("uri", pa.string()), ("prompts", pa.string()),  # prompts: JSON list
    ("width", pa.int32()), ("height", pa.int32()),
    ("pixels", pa.binary()), ("pix_h", pa.int32()), ("pix_w", pa.int32()),  # RGB at computation size
    ("saliency", pa.binary()), ("error", pa.string()),
])


class PreprocessError(ValueError):
    """Bad job settings or input; the message is one line."""


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a text file: one per line; blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise PreprocessError(f"cannot read prompts file {path}: {exc.strerror or exc}") from exc
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def load_image_for_masks(data: bytes, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode image bytes to uint8 RGB no larger than ``max_side``; also return the original (w, h)."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message would name a BytesIO object
        raise UnidentifiedImageError("not an image file (unknown format)") from None
    with img:
        width, height = img.size
        scale = max_side / max(width, height)
        if scale < 1:  # JPEG: decode at a reduced DCT scale (still at least the target size)
            img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        rgb = to_rgb_array(img)
    if max(rgb.shape[:2]) > max_side:
        scale = max_side / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC, reducing_gap=3.0))
    return rgb, (width, height)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def decode_batch(batch: pa.Table, max_side: int, saliency_model: str | None) -> pa.Table:
    """Stage 1: read, decode, shrink, saliency; failures become error rows.

    Input columns: ``image_id``, ``uri`` and ``prompts`` (a JSON list of the image's
    pending prompts, ``[null]`` for a saliency-only row). The next stages turn each
    decoded image into one shard row per prompt.
    """
    saliency = get_saliency_model(saliency_model) if saliency_model else None
    out = []
    for row in batch.to_pylist():
        rec = {**row, "width": None, "height": None, "pixels": None, "pix_h": None, "pix_w": None,
               "saliency": None, "error": None}
        try:
            rgb, (width, height) = load_image_for_masks(Path(row["uri"]).read_bytes(), max_side)
            rec.update(width=width, height=height, pixels=rgb.tobytes(), pix_h=rgb.shape[0], pix_w=rgb.shape[1])
            if saliency is not None:
                rec["saliency"] = to_png(resize(saliency(rgb), (height, width)))
        except Exception as exc:  # untrusted files: Pillow raises many types; record, never crash
            rec["error"] = _first_line(exc)
        out.append(rec)
    return pa.Table.from_pylist(out, schema=_DECODED_SCHEMA)


def _pixels(row: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(row["pixels"], np.uint8).reshape(row["pix_h"], row["pix_w"], 3)


class SaliencyStage:
    """Actor stage: saliency maps of the decoded images from a learned model loaded once per actor."""

    def __init__(self, model: str, weights: str, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.model = get_saliency_model(model, weights)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            if row["error"] is None:
                try:
                    row["saliency"] = to_png(resize(self.model(_pixels(row)), (row["height"], row["width"])))
                except Exception as exc:  # one bad image is its error row
                    row["error"] = _first_line(exc)
        return pa.Table.from_pylist(rows, schema=_DECODED_SCHEMA)


MasksFn = Callable[[list[dict[str, Any]]], list[list[bytes]]]


def combined_prompt(prompts: Sequence[str | None]) -> str | None:
    """The one prompt (shard key) of an image's prompts under ``combine_prompts``."""
    named = [p for p in prompts if p is not None]
    return COMBINED_SEPARATOR.join(named) if named else None


def _expand(rows: list[dict[str, Any]], masks_fn: MasksFn, source: str, combine_prompts: bool = False) -> pa.Table:
    """One output row per (image, prompt), or per image with ``combine_prompts`` (the union
    of its prompts' masks); ``masks_fn`` gives the good images' ROI PNGs per prompt."""
    for row in rows:
        row["prompts"] = json.loads(row["prompts"])
    good = [r for r in rows if r["error"] is None]
    pngs = dict(zip((r["image_id"] for r in good), masks_fn(good))) if good else {}
    out = []
    for r in rows:
        masks = [None] * len(r["prompts"]) if r["error"] else pngs[r["image_id"]]
        pairs = list(zip(r["prompts"], masks))
        if combine_prompts and len(pairs) > 1:
            union = None if r["error"] else to_png(combine([from_png(m) for m in masks]))
            pairs = [(combined_prompt(r["prompts"]), union)]
        for prompt, mask in pairs:
            out.append({"image_id": r["image_id"], "uri": r["uri"], "width": r["width"], "height": r["height"],
                        "prompt": prompt, "roi_mask": mask,
                        "saliency": r["saliency"], "mask_source": source, "error": r["error"]})
    return pa.Table.from_pylist(out, schema=SHARD_SCHEMA)


def _zeros_png(row: dict[str, Any]) -> bytes:
    return to_png(np.zeros((row["height"], row["width"]), np.float32))


class TextMaskStage:
    """Actor: loads the CLIP model once, then turns decoded images into text-mask rows."""

    def __init__(self, clip: dict[str, Any], threads: int | None, combine_prompts: bool = False) -> None:
        self.combine_prompts = combine_prompts
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.masker = TextMasker(**clip)

    def _masks(self, rows: list[dict[str, Any]]) -> list[list[bytes]]:
        prompts = sorted({p for r in rows for p in r["prompts"] if p is not None})
        probs = self.masker.prompt_probabilities([_pixels(r) for r in rows], prompts) if prompts else None
        index = {p: j for j, p in enumerate(prompts)}
        return [[to_png(resize(probs[i, index[p]], (r["height"], r["width"]))) if p is not None else _zeros_png(r)
                 for p in r["prompts"]] for i, r in enumerate(rows)]

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _expand(batch.to_pylist(), self._masks, "clip", self.combine_prompts)


class CocoMaskStage:
    """Actor: loads the annotation file once, then draws ground-truth rows."""

    def __init__(self, annotations: str, combine_prompts: bool = False) -> None:
        self.coco = CocoMasks(annotations)
        self.combine_prompts = combine_prompts

    def _masks(self, rows: list[dict[str, Any]]) -> list[list[bytes]]:
        out = []
        for r in rows:
            image_id, size = self.coco.image_id(r["image_id"]), (r["height"], r["width"])
            out.append([to_png(self.coco.mask(image_id, [p], size=size)) if p is not None else _zeros_png(r)
                        for p in r["prompts"]])
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _expand(batch.to_pylist(), self._masks, "coco", self.combine_prompts)


def saliency_rows(batch: pa.Table) -> pa.Table:
    """Task: rows whose ROI mask is the saliency map itself."""
    return _expand(batch.to_pylist(), lambda rows: [[r["saliency"]] * len(r["prompts"]) for r in rows],
                   "saliency")


def _list_folder(folder: Path) -> list[tuple[str, Path]]:
    """Every regular, non-hidden file under ``folder`` (recursively) as (relative id, path), sorted."""
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((rel.as_posix(), path.resolve()))
    return sorted(files)


def preprocess(input: str | Path, output: str | Path, *, prompts: Sequence[str] = (),
               prompts_file: str | Path | None = None, coco_annotations: str | Path | None = None,
               roi_source: str | None = None, saliency: bool = True, saliency_model: str = DEFAULT_SALIENCY_MODEL,
               saliency_weights: str | None = None, saliency_actors: int = 1, rows_per_shard: int = 1000,
               num_text_actors: int = 1, text_actor_cpus: float | None = None,
               use_gpu: bool | None = None, batch_size: int = 16, clip_model: str = DEFAULT_CLIP_MODEL,
               clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED, clip_config: str | Path | None = None,
               clip_download: bool = False, clip_input_size: int | None = None, max_side: int = 1024,
               limit: int | None = None, run_id: str | None = None, combine_prompts: bool = False) -> dict[str, Any]:
    """Compute ROI masks (+ saliency maps) for a folder or COCO root and append them as Parquet shards.

    ``input`` is an image folder (every non-hidden file under it is an input; ones that
    are not images become error rows) or a COCO root (``annotations.json`` next to an
    ``images/`` folder); ``coco_annotations`` names the annotation file explicitly, with
    ``input`` the folder holding its images. ``use_gpu=None`` uses GPUs when the Ray
    cluster has them, one per text actor. ``text_actor_cpus`` defaults to 1 with GPUs,
    else to this machine's cores shared among the text actors (also their torch thread
    count). Actor settings the cluster cannot fit now fail at once rather than hang.
    ``combine_prompts`` writes one row per image with the union of its prompts' masks.
    ``saliency_weights``: the weights file of a learned ``saliency_model`` (run by
    ``saliency_actors`` actors, a GPU each when the cluster has them and ``use_gpu`` allows).
    Returns a summary: rows written, error rows, keys skipped, images/s, ...
    """
    t_start = time.perf_counter()
    if rows_per_shard < 1 or num_text_actors < 1 or batch_size < 1 or max_side < 16:
        raise PreprocessError("rows_per_shard, text actors and batch size must be >= 1 and max_side >= 16")
    wanted = list(dict.fromkeys([*prompts, *(read_prompts_file(prompts_file) if prompts_file else [])]))
    if any(not p.strip() for p in wanted):
        raise PreprocessError("empty prompt")
    root = Path(input)
    if not root.is_dir():
        raise PreprocessError(f"input folder not found: {root}")
    images_dir = root
    if coco_annotations is None and (root / "annotations.json").is_file() and (root / "images").is_dir():
        coco_annotations, images_dir = root / "annotations.json", root / "images"
    roi_source = roi_source or ("coco" if coco_annotations else "clip" if wanted else "saliency")
    if roi_source not in ROI_SOURCES:
        raise PreprocessError(f"unknown ROI source {roi_source!r} (use one of {', '.join(ROI_SOURCES)})")
    if roi_source == "saliency" and not saliency:
        raise PreprocessError("nothing to compute: saliency is off and there are no prompts or COCO annotations")
    if roi_source == "coco" and coco_annotations is None:
        raise PreprocessError("the coco ROI source needs COCO annotations (--coco-annotations)")
    if roi_source == "clip" and not (wanted or coco_annotations):
        raise PreprocessError("the clip ROI source needs prompts (--prompts / --prompts-file) or COCO categories")
    saliency_name = saliency_model if saliency else None
    learned_saliency = saliency_name in LEARNED_SALIENCY_MODELS
    if saliency_weights is not None and Path(saliency_weights).is_file():
        saliency_weights = str(Path(saliency_weights).resolve())  # the actors may run in another folder
    if saliency_name:
        get_saliency_model(saliency_name, saliency_weights)  # unknown name, missing weights: fail before starting
    if saliency_actors < 1:
        raise PreprocessError("saliency actors must be >= 1")

    # -- what to do: one item per image with its pending prompts --------------------------------
    coco = CocoMasks(coco_annotations) if coco_annotations is not None else None
    if coco is not None:
        if roi_source == "coco":
            for word in wanted:
                coco.resolve_category(word)
        listing = [(name, (images_dir / name).resolve(), wanted or coco.categories_in(cid) or [None])
                   for cid, name in coco.images()]
    else:
        listing = [(rel, path, wanted or [None]) for rel, path in _list_folder(images_dir)]
    listing = listing[:limit] if limit is not None else listing
    done = existing_keys(output)
    items, skipped = [], 0
    for image_id, path, image_prompts in listing:
        keys = [combined_prompt(image_prompts)] if combine_prompts else image_prompts
        pending_keys = [k for k in keys if (image_id, k) not in done]
        skipped += len(keys) - len(pending_keys)
        pending = image_prompts if combine_prompts else pending_keys
        if pending_keys:
            items.append({"image_id": image_id, "uri": str(path), "prompts": json.dumps(pending)})
    run_id = run_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    summary: dict[str, Any] = {"run_id": run_id, "output": str(output), "roi_source": roi_source,
                               "images": 0, "rows_written": 0, "error_rows": 0, "skipped_keys": skipped,
                               "shards_written": 0, "setup_seconds": round(time.perf_counter() - t_start, 3),
                               "seconds": 0.0, "images_per_s": 0.0, "rows_per_s": 0.0}
    if not items:
        log.info("nothing to do: all %d keys are already in %s", skipped, output)
        return summary

    clip: dict[str, Any] = {}
    if roi_source == "clip":
        config = load_clip_config(clip_config) if clip_config is not None else None
        plan_clip_load(clip_model, clip_pretrained, config=config, allow_download=clip_download)  # fail fast
        clip = {"model_name": clip_model, "pretrained": clip_pretrained, "config": config,
                "allow_download": clip_download, "input_size": clip_input_size}

    import ray

    started = ensure_ray()
    try:
        t_ray = time.perf_counter()
        resources = ray.cluster_resources()  # checked up front: an actor pool that cannot fit would hang
        gpus = use_gpu if use_gpu is not None else resources.get("GPU", 0) >= 1
        cpus = text_actor_cpus or (1.0 if gpus else float(max(1, (os.cpu_count() or 1) // num_text_actors)))
        if roi_source == "clip" and gpus and resources.get("GPU", 0) < num_text_actors:
            raise PreprocessError(f"{num_text_actors} text actors need one GPU each; the Ray cluster has "
                                  f"{resources.get('GPU', 0):g}")
        if roi_source == "clip" and num_text_actors * cpus >= resources.get("CPU", 0):
            raise PreprocessError(f"{num_text_actors} text actors x {cpus:g} CPUs leave no CPU of the Ray "
                                  f"cluster's {resources.get('CPU', 0):g} for reading images; use fewer or "
                                  "smaller actors")
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
        ds = ds.map_batches(decode_batch, fn_kwargs={"max_side": max_side,
                                                     "saliency_model": None if learned_saliency else saliency_name},
                            batch_size=batch_size, batch_format="pyarrow", num_cpus=1)
        if learned_saliency:
            ds = ds.map_batches(SaliencyStage,
                                fn_constructor_kwargs={"model": saliency_name, "weights": saliency_weights},
                                compute=ray.data.ActorPoolStrategy(size=saliency_actors), batch_size=batch_size,
                                batch_format="pyarrow", num_cpus=1, num_gpus=1 if gpus else 0)
        if roi_source == "clip":
            ds = ds.map_batches(TextMaskStage, fn_constructor_kwargs={"clip": clip, "threads": max(1, int(cpus)),
                                                                      "combine_prompts": combine_prompts},
                                compute=ray.data.ActorPoolStrategy(size=num_text_actors), batch_size=batch_size,
                                batch_format="pyarrow", num_cpus=cpus, num_gpus=1 if gpus else 0)
        elif roi_source == "coco":
            ds = ds.map_batches(CocoMaskStage, fn_constructor_kwargs={"annotations": str(coco.path),
                                                                      "combine_prompts": combine_prompts},
                                compute=ray.data.ActorPoolStrategy(size=1), batch_size=batch_size,
                                batch_format="pyarrow", num_cpus=1)
        else:
            ds = ds.map_batches(saliency_rows, batch_size=batch_size, batch_format="pyarrow", num_cpus=1)

        metadata = {"run_id": run_id, "roi_source": roi_source, "saliency_model": saliency_name or "",
                    "saliency_weights": saliency_weights or "",
                    "max_side": max_side, "clip_model": clip_model if clip else "",
                    "clip_pretrained": (clip_pretrained or "none") if clip else ""}
        image_ids: set[str] = set()
        for index, table in enumerate(ds.iter_batches(batch_size=rows_per_shard, batch_format="pyarrow")):
            path = write_shard(table, Path(output) / shard_name(run_id, index), metadata)
            summary["rows_written"] += table.num_rows
            summary["error_rows"] += table.num_rows - table.column("error").null_count
            summary["shards_written"] += 1
            image_ids.update(table.column("image_id").to_pylist())
            elapsed = time.perf_counter() - t_ray
            log.info("shard %s: %d rows | %d/%d images, %.2f images/s", path.name, table.num_rows,
                     len(image_ids), len(items), len(image_ids) / max(elapsed, 1e-9))
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - t_ray
    summary.update(images=len(image_ids), seconds=round(seconds, 3),
                   setup_seconds=round(t_ray - t_start, 3),
                   images_per_s=round(len(image_ids) / max(seconds, 1e-9), 3),
                   rows_per_s=round(summary["rows_written"] / max(seconds, 1e-9), 3))
    log.info("done: %(rows_written)d rows (%(error_rows)d errors, %(skipped_keys)d keys already there) in "
             "%(shards_written)d shards, %(images)d images at %(images_per_s).2f images/s", summary)
    return summary
