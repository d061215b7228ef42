"""Training crops from the Parquet mask shards, with Ray Data.

The shards (see :mod:`pipeline.data.shards`) hold one row per (image, prompt). This
module turns them into Ray Datasets of fixed-size crops for Ray Train:

- **rows**: rows with ``error`` set are dropped, and so are rows with no mask at all.
  Every remaining row is one training sample: the same image appears once per prompt,
  each time with that prompt's mask, so the codec sees several ROIs per image.
- **mask**: the row's ``roi_mask`` PNG; where it is null, the ``saliency`` PNG. With
  ``saliency_weight`` w > 0 and both present, the mask is the union
  ``max(roi, w * saliency)`` (:func:`pipeline.masks.ops.combine`, mode ``max``), so
  salient background keeps a share of the bits. A mask whose size differs from the
  decoded image is resized bilinearly to it.
- **size**: an image smaller than the crop on either side is upscaled (bicubic; its
  mask bilinearly) until both sides reach the crop, keeping its aspect ratio. No
  padding, so a crop never contains made-up borders.
- **train crops**: ``crops_per_image`` random windows per row (the same window for
  image and mask; uniform, or for a share ``roi_crop_fraction`` centred on a random ROI
  pixel, so small objects are seen often enough) with a random horizontal flip, drawn afresh every epoch
  (each epoch re-runs the map with the epoch in its seed, :func:`ray_data_epoch`). ``None``
  (auto) draws enough crops per row for one epoch to cover the whole run (``steps x global
  batch`` crops), capped at ``MAX_AUTO_CROPS`` per row: 1 on a real data set, more on a tiny
  one. Why: every epoch starts a new Ray Data streaming execution, which costs seconds
  (tens of seconds on a loaded machine); on a data set of a few images that would
  otherwise happen every few steps and dominate the run. Why the cap: Ray Data's scheduling
  loop does work for every queued input item at every turn, so a long epoch of many passes
  slows the whole run (see ``MAX_AUTO_CROPS``).
- **order**: an epoch is a number of passes over the shard files, each in its own
  order, with at most ``CROPS_PER_PASS`` crops per row in a pass (:func:`crop_passes`).
  A map task reads one file and yields its rows' crops in shuffled rounds (bounded
  memory), and the training loop adds a local shuffle buffer, so a batch mixes images.
  Drawing all of a row's crops at once instead made the stream one task's rows at a
  time: the demo's run saw a third of its images for a third of its steps.
- **validation crops**: one deterministic centre crop of ``val_crop`` per row, for the
  first ``max_val_samples`` held-out rows, read once on the driver (a few images; a
  Ray Data execution would cost more than reading them) and shipped to the rank-0
  worker through the object store.
- **split**: by image id, never by row, so all prompts of an image land on the same
  side: an image is held out when ``sha1(image_id)`` mapped to [0, 1) is below
  ``val_fraction``. If that picks no image while there are at least two, the image
  with the smallest hash is held out, so small sets still get a validation split.
  The rule depends only on the ids, so every run over the same shards agrees.

Batches are dicts of numpy arrays, ready for ``iter_torch_batches``: ``image`` uint8
(B,3,H,W) and ``mask`` uint8 (B,1,H,W) (divide by 255 on the training device; uint8
keeps the object store and the transfer four times smaller than float32).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.data.shards import read_shards, shard_files
from pipeline.masks.ops import combine, from_png, resize, to_rgb_array

log = logging.getLogger(__name__)

COLUMNS = ["image_id", "uri", "width", "height", "roi_mask", "saliency", "error"]


class DatasetError(ValueError):
    """Unusable training data (no shards, no usable rows, bad crop settings); one line."""


# -- splitting ----------------------------------------------------------------------------------

def split_key(image_id: str) -> float:
    """A stable number in [0, 1) for an image id (sha1-based, the same on every machine)."""
    return int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def validation_ids(image_ids: Iterable[str], val_fraction: float) -> frozenset[str]:
    """The held-out image ids among ``image_ids`` (see the module docstring for the rule)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    ids = sorted(set(image_ids))
    if val_fraction == 0.0:
        return frozenset()
    keys = {i: split_key(i) for i in ids}
    held = {i for i in ids if keys[i] < val_fraction}
    if not held and len(ids) >= 2:
        held = {min(ids, key=lambda i: (keys[i], i))}
    return frozenset(held)


# -- files --------------------------------------------------------------------------------------

def resolve_shards(shards: str | Path | Sequence[str | Path]) -> list[str]:
    """Absolute paths of the committed shard files under a folder, a file, or a list of either."""
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    files: list[str] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_file():
            files.append(str(p.resolve()))
        elif p.is_dir():
            files += [str(f.resolve()) for f in shard_files(p)]
        else:
            raise DatasetError(f"shards not found: {p}")
    if not files:
        raise DatasetError(f"no .parquet shards under {', '.join(str(i) for i in items)}")
    return files


def usable_rows(files: Sequence[str]) -> dict[str, int]:
    """Usable rows (no error, some mask) per image id."""
    counts: dict[str, int] = {}
    for f in files:
        t = read_shards(f, columns=["image_id", "roi_mask", "saliency", "error"])
        for image_id in t.filter(_usable(t)).column("image_id").to_pylist():
            counts[image_id] = counts.get(image_id, 0) + 1
    return counts


def _usable(t: pa.Table) -> pa.Array:
    has_mask = pc.or_(pc.is_valid(t.column("roi_mask")), pc.is_valid(t.column("saliency")))
    return pc.and_(pc.is_null(t.column("error")), has_mask)


def read_image(uri: str) -> np.ndarray:
    """An image as uint8 HxWx3 RGB from a local path or a pyarrow-readable URI (s3://, gs://...)."""
    if "://" in uri and not uri.startswith("file://"):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_file(path) as f:
            data = f.read()
    else:
        data = Path(uri.removeprefix("file://")).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        return to_rgb_array(img)


# -- one row -> crops ---------------------------------------------------------------------------

def row_mask(roi_png: bytes | None, saliency_png: bytes | None, size: tuple[int, int],
             saliency_weight: float = 0.0) -> np.ndarray | None:
    """The training mask of a row (float32 HxW at ``size`` = (h, w)), or None when it has none."""
    roi = None if roi_png is None else from_png(roi_png)
    sal = None if saliency_png is None else from_png(saliency_png)
    if roi is not None and sal is not None and saliency_weight > 0:
        sal = resize(sal, roi.shape)
        mask = combine([roi, sal], [1.0, saliency_weight], mode="max")
    else:
        mask = roi if roi is not None else sal
    if mask is None:
        return None
    return resize(mask, size) if mask.shape != tuple(size) else mask


def fit_to_crop(image: np.ndarray, mask: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Upscale (aspect kept) an image and its mask until both sides are at least ``crop``."""
    h, w = image.shape[:2]
    if h >= crop and w >= crop:
        return image, mask
    scale = crop / min(h, w)
    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    return image, resize(mask, (nh, nw))


def _to_chw(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m8 = np.round(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(image.transpose(2, 0, 1)), m8[None]


def _roi_window(roi_pixels: tuple[np.ndarray, np.ndarray], shape: tuple[int, int], crop: int,
                rng: np.random.Generator) -> tuple[int, int] | None:
    """A window centred on a random one of ``roi_pixels`` (``np.nonzero`` of the ROI), clamped
    to an image of ``shape``; None without ROI pixels."""
    ys, xs = roi_pixels
    if len(ys) == 0:
        return None
    k = int(rng.integers(len(ys)))
    h, w = shape
    return (min(max(int(ys[k]) - crop // 2, 0), h - crop), min(max(int(xs[k]) - crop // 2, 0), w - crop))


def random_crops(image: np.ndarray, mask: np.ndarray, crop: int, n: int, rng: np.random.Generator,
                 flip: bool = True, roi_fraction: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` random (image CHW uint8, mask 1HW uint8) crops; the same window for both.

    A share ``roi_fraction`` of the windows is centred on a random ROI pixel (where the
    mask has one): with small objects, uniform windows would rarely show the ROI.
    """
    image, mask = fit_to_crop(image, mask, crop)
    h, w = image.shape[:2]
    roi_pixels = np.nonzero(mask >= 0.5) if roi_fraction > 0 else None  # once per image, not per window
    out = []
    for _ in range(n):
        window = (_roi_window(roi_pixels, (h, w), crop, rng)
                  if roi_pixels is not None and rng.random() < roi_fraction else None)
        top, left = window or (int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1)))
        x = image[top:top + crop, left:left + crop]
        m = mask[top:top + crop, left:left + crop]
        if flip and rng.random() < 0.5:
            x, m = x[:, ::-1], m[:, ::-1]
        out.append(_to_chw(x, m))
    return out


def center_crop(image: np.ndarray, mask: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """The centre ``crop`` window (after :func:`fit_to_crop`) as CHW uint8 arrays."""
    image, mask = fit_to_crop(image, mask, crop)
    h, w = image.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    return _to_chw(image[top:top + crop, left:left + crop], mask[top:top + crop, left:left + crop])


def decoded_rows(batch: pa.Table, *, split: str, val_ids: frozenset[str] | Sequence[str], crop: int,
                 saliency_weight: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The usable rows of ``split`` in a shard batch as (RGB uint8 HxWx3, mask float HxW) pairs,
    already upscaled to at least ``crop``. Rows whose image cannot be read are logged and
    skipped (a file deleted after preprocessing must not kill a training run)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    held = frozenset(val_ids)
    out = []
    for row in batch.filter(_usable(batch)).to_pylist():
        if (row["image_id"] in held) != (split == "val"):
            continue
        try:
            rgb = read_image(row["uri"])
            mask = row_mask(row["roi_mask"], row["saliency"], rgb.shape[:2], saliency_weight)
        except Exception as exc:  # noqa: BLE001 - unreadable files are skipped, never fatal
            log.warning("skipping %s: %s", row["uri"], exc)
            continue
        if mask is not None:
            out.append(fit_to_crop(rgb, mask, crop))
    return out


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]], crop: int) -> dict[str, np.ndarray]:
    if not pairs:
        return {"image": np.zeros((0, 3, crop, crop), np.uint8), "mask": np.zeros((0, 1, crop, crop), np.uint8)}
    return {"image": np.stack([p[0] for p in pairs]), "mask": np.stack([p[1] for p in pairs])}


def rows_to_crops(batch: pa.Table, *, split: str, val_ids: frozenset[str] | Sequence[str], crop: int,
                  crops_per_image: int = 1, saliency_weight: float = 0.0,
                  seed: int | None = None) -> dict[str, np.ndarray]:
    """Shard rows -> ``{"image", "mask"}`` crop arrays for ``split``, in row order.

    ``split="train"`` keeps the rows whose image is not held out and draws
    ``crops_per_image`` random crops each (``seed=None``: fresh randomness every call);
    ``"val"`` keeps the held-out rows and takes one centre crop each.
    """
    rng = np.random.default_rng(seed)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for rgb, mask in decoded_rows(batch, split=split, val_ids=val_ids, crop=crop, saliency_weight=saliency_weight):
        pairs += (random_crops(rgb, mask, crop, crops_per_image, rng) if split == "train"
                  else [center_crop(rgb, mask, crop)])
    return _stack(pairs, crop)


def train_crops_map(batch: pa.Table, *, val_ids: frozenset[str] | Sequence[str], crop: int,
                    crops_per_image: int = 1, saliency_weight: float = 0.0, roi_crop_fraction: float = 0.0,
                    chunk: int = 64, seed: int | Sequence[int] | None = None) -> Iterable[dict[str, np.ndarray]]:
    """The Ray Data training map (a generator): each row decoded once, then its
    ``crops_per_image`` random crops drawn in rounds across all rows of the batch and
    yielded shuffled, at most about ``chunk`` crops at a time, so memory stays bounded
    however many crops a row gets and every output block mixes the batch's images.
    ``seed`` (numpy seed material) makes the crops reproducible; ``None`` draws fresh ones."""
    rows = decoded_rows(batch, split="train", val_ids=val_ids, crop=crop, saliency_weight=saliency_weight)
    if not rows:
        yield _stack([], crop)
        return
    rng = np.random.default_rng(seed)
    per_round = max(1, chunk // len(rows))
    remaining = crops_per_image
    while remaining > 0:
        k = min(per_round, remaining)
        pairs = [c for rgb, mask in rows for c in random_crops(rgb, mask, crop, k, rng,
                                                                 roi_fraction=roi_crop_fraction)]
        order = rng.permutation(len(pairs))
        yield _stack([pairs[i] for i in order], crop)
        remaining -= k


def shard_crops_map(batch: pa.Table, *, rows_per_task: int, **crops: Any) -> Iterable[dict[str, np.ndarray]]:
    """The Ray Data training map over shard files (``file`` and ``seed`` columns): each file
    read with pyarrow, its rows cropped ``rows_per_task`` at a time by :func:`train_crops_map`,
    with crops seeded by the item's seed, the rows' offset and the epoch (after the first)."""
    epoch = ray_data_epoch()
    for path, seed in zip(batch.column("file").to_pylist(), batch.column("seed").to_pylist()):
        table = read_shards(path, columns=COLUMNS)
        for start in range(0, table.num_rows, rows_per_task):
            material = [*seed, start] + ([epoch] if epoch else [])
            yield from train_crops_map(table.slice(start, rows_per_task), seed=material, **crops)


def ray_data_epoch() -> int:
    """How many times the dataset this task belongs to has run before (its epoch), from Ray
    Data's context (``_execution_idx``, counted by Ray's own execution callback); 0 where this
    Ray version does not count."""
    try:
        from ray.data import DataContext
    except ImportError:
        return 0
    return int(getattr(DataContext.get_current(), "_execution_idx", 0) or 0)


# -- Ray Datasets -------------------------------------------------------------------------------

@dataclass
class TrainingData:
    """The two Ray Datasets and what went into them."""

    train: Any  # ray.data.Dataset of random crops
    val: dict[str, np.ndarray] | None  # centre crops {"image", "mask"}; None when val_fraction is 0
    files: list[str]
    train_images: int
    val_images: int
    val_ids: frozenset[str]
    train_rows: int
    crops_per_image: int


def check_crop(crop: int, name: str = "crop", multiple: int = 64) -> int:
    """A crop side must be a positive multiple of the codec stride (64)."""
    if crop < multiple or crop % multiple:
        raise DatasetError(f"{name} must be a positive multiple of {multiple} (the codec stride), got {crop}")
    return crop


# 256 crops per row (32 passes of 8 per shard file in an epoch). The default model's run on 19
# photos (2 cores, tma N=64/M=96, 128 px crops, batch 8): 0.95 steps/s with 4096 (512 passes),
# 3.1-3.3 steps/s with 256, 3.4-3.7 with 68 (9 passes), the Ray Data coordinator taking a core
# with 512 queued items.
MAX_AUTO_CROPS = 256


def auto_crops_per_image(train_rows: int, global_batch: int, steps: int, cap: int = MAX_AUTO_CROPS) -> int:
    """Crops per row so that one epoch covers ``steps`` global batches (at most ``cap``)."""
    need = -(-steps * global_batch // max(train_rows, 1))
    return int(min(max(1, need), cap))


CROPS_PER_PASS = 8


def crop_passes(crops_per_image: int, per_pass: int = CROPS_PER_PASS) -> tuple[int, int]:
    """(passes over the shards, crops per row in each pass) giving at least ``crops_per_image``
    crops per row per epoch, at most ``per_pass`` of them from one reading of a row."""
    k = min(crops_per_image, per_pass)
    return -(-crops_per_image // k), k


def pass_order(files: Sequence[str], passes: int, seed: int = 0) -> list[str]:
    """The shard files of ``passes`` passes, each pass in its own (seeded) random order."""
    rng = np.random.default_rng(seed)
    return [files[i] for _ in range(passes) for i in rng.permutation(len(files))]


@dataclass
class ShardPlan:
    """What the driver learns from the shards' light columns before any Ray work."""

    files: list[str]
    rows: dict[str, int]  # usable rows per image id
    val_ids: frozenset[str]
    train_ids: list[str]

    @property
    def train_rows(self) -> int:
        return sum(self.rows[i] for i in self.train_ids)


def plan_shards(shards: str | Path | Sequence[str | Path], val_fraction: float = 0.1) -> ShardPlan:
    """Find the shard files, count the usable rows and fix the split (no Ray; fails fast)."""
    files = resolve_shards(shards)
    rows = usable_rows(files)
    if not rows:
        raise DatasetError(f"the shards hold no usable rows (all have errors or no mask): {files[0]} ...")
    val_ids = validation_ids(rows, val_fraction)
    train_ids = [i for i in rows if i not in val_ids]
    if not train_ids:
        raise DatasetError(f"no training images left after holding out {len(val_ids)} for validation")
    return ShardPlan(files, rows, val_ids, train_ids)


def training_datasets(shards: str | Path | Sequence[str | Path] | ShardPlan, *, crop: int = 256,
                      val_crop: int = 256, val_fraction: float = 0.1, crops_per_image: int | None = 1,
                      saliency_weight: float = 0.0, roi_crop_fraction: float = 0.0,
                      max_val_samples: int | None = 16, rows_per_task: int = 8,
                      global_batch: int = 8, steps: int = 1000, quiet: bool = True, seed: int = 0) -> TrainingData:
    """A lazy Ray Dataset of training crops, and the validation crops, from the shards.

    The driver reads only the id/mask-presence/error columns (to fix the split and
    count rows, :func:`plan_shards`; pass its plan to skip that here); the pixels are
    read and cropped by Ray Data tasks as the training loop consumes them.
    ``roi_crop_fraction`` of the training windows are centred on the ROI (see :func:`random_crops`).
    ``crops_per_image=None`` is the automatic choice (see the module docstring;
    ``global_batch`` is the batch summed over workers, ``steps`` the run's length). ``max_val_samples`` caps the
    validation rows (the first ones in shard order). ``quiet`` turns off Ray Data's
    progress bars for the training dataset. ``seed`` fixes the order of the shard files and
    every crop, so an epoch is the same crops whatever the scheduling (consumed in that order
    when the dataset runs with ``preserve_order``, as :func:`pipeline.train.trainer.train` does).
    """
    import ray

    check_crop(crop, "crop")
    check_crop(val_crop, "val_crop")
    plan = shards if isinstance(shards, ShardPlan) else plan_shards(shards, val_fraction)
    train_rows = plan.train_rows
    if crops_per_image is None:
        crops_per_image = auto_crops_per_image(train_rows, global_batch, steps)
    if crops_per_image < 1:
        raise DatasetError("crops_per_image must be at least 1")
    passes, per_pass = crop_passes(crops_per_image)
    # one item per (pass, shard file); not read_parquet, which reads a file listed twice once
    units = ray.data.from_items([{"file": f, "seed": [seed, i]}
                                 for i, f in enumerate(pass_order(plan.files, passes, seed))])
    train = units.map_batches(shard_crops_map, batch_size=1, batch_format="pyarrow",
                              fn_kwargs={"rows_per_task": rows_per_task, "val_ids": plan.val_ids,
                                         "saliency_weight": saliency_weight, "crop": crop,
                                         "crops_per_image": per_pass, "roi_crop_fraction": roi_crop_fraction})
    if quiet:
        train.context.enable_progress_bars = False
    val = (validation_crops(plan.files, plan.val_ids, val_crop, saliency_weight, max_val_samples)
           if plan.val_ids else None)
    return TrainingData(train, val, plan.files, len(plan.train_ids), len(plan.val_ids), plan.val_ids, train_rows,
                        passes * per_pass)


def validation_crops(files: Sequence[str], val_ids: frozenset[str], val_crop: int, saliency_weight: float = 0.0,
                     max_samples: int | None = 16) -> dict[str, np.ndarray]:
    """The held-out rows' centre crops, read directly (no Ray Data: they are few and fixed,
    and one Ray Data execution costs seconds). The first ``max_samples`` rows in shard order."""
    crops: list[dict[str, np.ndarray]] = []
    count = 0
    for f in files:
        t = read_shards(f, columns=COLUMNS)
        t = t.filter(pc.is_in(t.column("image_id"), value_set=pa.array(sorted(val_ids), pa.string())))
        if max_samples:
            t = t.slice(0, max_samples - count)
        out = rows_to_crops(t, split="val", val_ids=val_ids, crop=val_crop, saliency_weight=saliency_weight)
        crops.append(out)
        count += out["image"].shape[0]
        if max_samples and count >= max_samples:
            break
    return {k: np.concatenate([c[k] for c in crops]) for k in ("image", "mask")}
