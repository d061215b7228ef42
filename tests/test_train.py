"""Distributed training (issue 4): Ray Data crops, Ray Train DDP workers, checkpoints,
fault tolerance, resubmission and MLflow tracking, on tiny shards and a tiny model.

One local Ray (4 logical CPUs) is shared by the whole module; every run uses a
codec of N=16/M=24, 64 px crops and a handful of steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.codec.checkpoint import checkpoint_extra, load_checkpoint
from pipeline.data.dataset import (MAX_AUTO_CROPS, DatasetError, auto_crops_per_image, center_crop, random_crops, row_mask,
                                   rows_to_crops, train_crops_map, training_datasets, validation_ids)
from pipeline.data.shards import SHARD_SCHEMA
from pipeline.masks.ops import to_png
from pipeline.train.trainer import TrainConfig, TrainError, train, write_smoke_shards

TINY = {"N": 16, "M": 24, "n_rates": 2}


def _config(shards: Path, storage: Path, run_name: str, **kw) -> TrainConfig:
    base = dict(shards=str(shards), variant="tlic", model=dict(TINY), steps=6, batch_size=2, crop=64, val_crop=64,
                val_fraction=0.2, max_val_samples=2, val_encode_images=1,
                val_points=[[1.0, 1.0], [0.0, 0.0]], lr=2e-3, checkpoint_every=3, report_every=2, keep=2,
                num_workers=2, cpus_per_worker=1.0, max_failures=1, run_name=run_name,
                storage_path=str(storage), torch_threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


# -- data (no Ray) --------------------------------------------------------------------------------

def test_validation_split_is_deterministic_and_never_empty():
    ids = [f"img_{i}.png" for i in range(50)]
    held = validation_ids(ids, 0.2)
    assert held == validation_ids(list(reversed(ids)), 0.2)
    assert 0 < len(held) < len(ids)
    assert len(validation_ids(["a.png", "b.png"], 1e-9)) == 1  # small sets still get one
    assert validation_ids(ids, 0.0) == frozenset()
    with pytest.raises(DatasetError):
        validation_ids(ids, 1.0)


def test_masks_fall_back_to_saliency_and_blend():
    roi = np.zeros((8, 8), np.float32)
    roi[:4] = 1
    sal = np.full((16, 16), 0.5, np.float32)
    assert np.allclose(row_mask(to_png(roi), None, (8, 8)), roi)
    assert np.allclose(row_mask(None, to_png(sal), (8, 8)), 0.5, atol=1 / 255)  # fallback, resized
    blended = row_mask(to_png(roi), to_png(sal), (8, 8), saliency_weight=0.5)
    assert np.allclose(blended[:4], 1) and np.allclose(blended[4:], 0.25, atol=1 / 255)
    assert row_mask(None, None, (8, 8)) is None


def test_crops_share_the_window_and_small_images_are_upscaled():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    mask = img[..., 0].astype(np.float32) / 255.0  # the mask is the red channel: same window => equal
    crops = random_crops(img, mask, 64, 8, rng)
    assert len(crops) == 8
    for x, m in crops:
        assert x.shape == (3, 64, 64) and m.shape == (1, 64, 64)
        assert np.array_equal(x[0], m[0])
    # smaller than the crop: upscaled (aspect kept), image and mask together
    small = np.repeat(np.repeat(img[:20, :25], 2, axis=0), 2, axis=1)  # 40x50, smooth enough
    x, m = center_crop(small, small[..., 0].astype(np.float32) / 255.0, 64)
    assert x.shape == (3, 64, 64) and m.dtype == np.uint8
    assert np.corrcoef(x[0].ravel(), m[0].ravel())[0, 1] > 0.95


def test_rows_to_crops_drops_errors_and_splits(tmp_path):
    shards = write_smoke_shards(tmp_path / "s", n_images=4, size=64, error_rows=1)
    import pyarrow.parquet as pq

    table = pq.read_table(next(shards.glob("*.parquet"))).cast(SHARD_SCHEMA)
    assert table.num_rows == 5
    held = validation_ids(table.column("image_id").to_pylist()[:4], 0.25)
    train = rows_to_crops(table, split="train", val_ids=held, crop=64, crops_per_image=2, seed=0)
    val = rows_to_crops(table, split="val", val_ids=held, crop=64)
    assert train["image"].shape == (2 * (4 - len(held)), 3, 64, 64) and train["image"].dtype == np.uint8
    assert val["image"].shape[0] == len(held) and val["mask"].shape[1:] == (1, 64, 64)
    # a row pointing at a vanished file is skipped, not fatal
    gone = pa.Table.from_pylist([{**table.slice(0, 1).to_pylist()[0], "uri": str(tmp_path / "nope.png")}],
                                schema=SHARD_SCHEMA)
    assert rows_to_crops(gone, split="train", val_ids=frozenset(), crop=64)["image"].shape[0] == 0


def test_training_map_streams_shuffled_chunks(tmp_path):
    shards = write_smoke_shards(tmp_path / "s", n_images=4, size=64, error_rows=1)
    import pyarrow.parquet as pq

    table = pq.read_table(next(shards.glob("*.parquet"))).cast(SHARD_SCHEMA)
    chunks = list(train_crops_map(table, val_ids=frozenset(), crop=64, crops_per_image=40, chunk=32))
    assert len(chunks) == 5 and all(c["image"].shape[0] == 32 for c in chunks)  # 4 rows x 8 crops per round
    assert sum(c["mask"].shape[0] for c in chunks) == 4 * 40
    # tiny sets: one epoch covers the run; real sets: one crop per row
    assert auto_crops_per_image(train_rows=10, global_batch=8, steps=100) == 80
    assert auto_crops_per_image(train_rows=100_000, global_batch=8, steps=10_000) == 1
    # a long run on a few photos: capped (Ray Data's scheduling slows with many passes an epoch)
    assert auto_crops_per_image(train_rows=19, global_batch=8, steps=50_000) == MAX_AUTO_CROPS == 256



def test_every_stretch_of_a_tiny_run_sees_every_shard(tmp_path, ray_local):
    """Many crops per row come in passes over all shard files, not as one file's rows at a
    time (which showed a run one shard's images for a third of its steps), and the epoch
    has every crop it promises."""
    import pyarrow.parquet as pq
    from PIL import Image

    smoke = write_smoke_shards(tmp_path / "smoke", n_images=6, size=64, error_rows=0)
    table = pq.read_table(next(smoke.glob("*.parquet")))
    split = tmp_path / "split"
    split.mkdir()
    for k in range(3):  # three shard files of two images each
        pq.write_table(table.slice(2 * k, 2), split / f"part-{k}.parquet")
    images = [np.asarray(Image.open(u)).transpose(2, 0, 1) for u in table.column("uri").to_pylist()]
    data = training_datasets(split, crop=64, val_crop=64, val_fraction=0.0, crops_per_image=None,
                             global_batch=8, steps=30, rows_per_task=2)
    assert data.crops_per_image == 40  # 30 steps x 8 crops / 6 rows
    seen = [next(i for i, im in enumerate(images) if np.array_equal(x, im) or np.array_equal(x, im[:, :, ::-1]))
            for b in data.train.iter_batches(batch_size=48, batch_format="numpy") for x in b["image"]]
    assert len(seen) == 6 * 40
    assert set(seen[:96]) == set(range(6)), seen[:96]  # the first two passes' worth shows every image


def test_the_seed_fixes_every_crop_and_its_order(tmp_path, ray_local):
    """Same seed, same epoch of crops in the same order however Ray schedules the tasks (the
    smoke run's ROI check once failed on an unlucky draw); another seed, other crops."""
    from ray.data import DataContext

    from pipeline.train.trainer import ordered_ingest

    smoke = write_smoke_shards(tmp_path / "smoke", n_images=6, size=96, error_rows=0)

    def epochs(seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The first two epochs of one dataset."""
        data = training_datasets(smoke, crop=64, val_crop=64, val_fraction=0.0, crops_per_image=12,
                                 rows_per_task=2, seed=seed)
        data.train.context.execution_options = ordered_ingest()
        out = []
        for _ in range(2):
            crops = np.concatenate([b["image"] for b in data.train.iter_batches(batch_size=16, batch_format="numpy")])
            assert crops.shape == (6 * data.crops_per_image, 3, 64, 64)
            out.append(crops)
        return out[0], out[1]

    ctx = DataContext.get_current()
    assert not ctx.execution_options.preserve_order  # what ordered_ingest overrides
    (a, a_next), (b, b_next), (c, _) = epochs(0), epochs(0), epochs(1)
    assert np.array_equal(a, b) and np.array_equal(a_next, b_next)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, a_next)  # every epoch draws new crops (the epoch is in the seed)


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(TrainError, match="multiple of 64"):
        TrainConfig(shards=str(tmp_path), crop=100).resolved()
    with pytest.raises(TrainError, match="no shards"):
        TrainConfig().resolved()
    with pytest.raises(DatasetError, match="not found"):
        training_datasets(tmp_path / "missing")
    with pytest.raises(TrainError, match="roi-quality range low <= high"):
        TrainConfig(shards=str(tmp_path), roi_quality_range=(0.5, 0.2)).resolved()
    with pytest.raises(TrainError, match=r"rate points must be among 0..3, got \[4\]"):
        TrainConfig(shards=str(tmp_path), model={"n_rates": 4}, rate_points=[4]).resolved()


def test_steps_draw_their_knobs_from_the_given_ranges():
    import random

    from pipeline.train.steps import StepSettings, sample_knobs

    rng = random.Random(0)
    narrow = StepSettings(n_rates=4, max_roi_quality=0.3, uniform_fraction=0.0, rate_points=(0, 1))
    draws = [sample_knobs(narrow, 8, rng) for _ in range(200)]
    assert {r for r, _ in draws} == {0, 1}
    qs = torch.cat([q for _, q in draws])
    assert float(qs.min()) >= 0.0 and float(qs.max()) <= 0.3 and float(qs.max()) > 0.25
    default = [sample_knobs(StepSettings(n_rates=4), 8, rng) for _ in range(200)]
    assert {r for r, _ in default} == {0, 1, 2, 3} and float(torch.cat([q for _, q in default]).max()) == 1.0
    with pytest.raises(ValueError, match="rate points must be among 0..1"):
        StepSettings(n_rates=2, rate_points=(2,))


# -- Ray Train runs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_smoke_shards(tmp_path_factory.mktemp("shards"), n_images=10, size=80, error_rows=1)


INIT_OUTPUT_BIAS = 0.5  # a value no random init of g_s's last bias comes near (|b| < 0.12)


@pytest.fixture(scope="module")
def first_run(ray_local, shards, tmp_path_factory):
    """A 2-worker run of 6 steps, warm-started from a CompressAI MeanScaleHyperprior state dict,
    whose rank 0 dies once before step 5 (checkpoint at 3)."""
    from compressai.models import MeanScaleHyperprior

    storage = tmp_path_factory.mktemp("runs")
    weights = MeanScaleHyperprior(TINY["N"], TINY["M"]).state_dict()
    weights["g_s.6.bias"].fill_(INIT_OUTPUT_BIAS)
    torch.save(weights, storage / "msh.pth")
    marker = storage / "failed-once"
    outcome = train(_config(shards, storage, "two-workers", fail_at_step=4, fail_marker=str(marker),
                            init=str(storage / "msh.pth")))
    return storage, outcome


@pytest.mark.slow
def test_two_worker_run_writes_checkpoints_and_mlflow(first_run):
    storage, out = first_run
    assert out.metrics["step"] == 6 and out.metrics["world_size"] == 2
    run_dir = storage / "two-workers"
    ckpts = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_00000003", "checkpoint_00000006"]
    model = load_checkpoint(Path(out.checkpoint) / "model.pt")
    assert model.variant == "tlic" and checkpoint_extra(Path(out.checkpoint) / "model.pt")["step"] == 6
    state = torch.load(Path(out.checkpoint) / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["optimizer"]["state"]

    assert out.mlflow_uri == f"sqlite:///{storage / 'mlflow.db'}"
    c = _client(out.mlflow_uri)
    run = c.get_run(out.mlflow_run_id)
    assert run.info.run_name == "two-workers" and run.info.status == "FINISHED"
    assert run.data.tags["ray_train_run_name"] == "two-workers"
    assert run.data.params["num_workers"] == "2" and run.data.params["variant"] == "tlic"
    # warm-started: MLflow records the source, the workers started from it (6 Adam steps of lr 2e-3 since)
    assert run.data.params["init"] == str(storage / "msh.pth")
    assert "MeanScaleHyperprior weights N=16 M=24" in run.data.tags["init_source"]
    assert run.data.tags["init_fresh_layers"] == "none" and run.data.tags["init_rate_point"] == "1"
    assert (model.g_s.net[6].bias - INIT_OUTPUT_BIAS).abs().max() < 0.05
    steps = {m.step for m in c.get_metric_history(out.mlflow_run_id, "train/loss")}
    assert steps == {1, 2, 3, 4, 5, 6}  # every step reached MLflow
    assert {m.step for m in c.get_metric_history(out.mlflow_run_id, "val_loss")} == {3, 6}
    assert c.get_metric_history(out.mlflow_run_id, "rd/q0_r0/bpp")  # real bitstream bpp at an RD point
    artifacts = {a.path for a in c.list_artifacts(out.mlflow_run_id)}
    assert {"rd_points.json", "checkpoint", "warm_start.json"} <= artifacts
    rd = json.loads(Path(c.download_artifacts(out.mlflow_run_id, "rd_points.json", str(storage / "dl")))
                    .read_text())
    assert {(p["roi_quality"], p["rate"]) for p in rd["points"]} == {(1.0, 1.0), (0.0, 0.0)}
    assert all(p["bpp"] > 0 and p["psnr"] > 0 for p in rd["points"])


@pytest.mark.slow
def test_worker_killed_midway_resumes_from_checkpoint(first_run):
    storage, out = first_run
    assert (storage / "failed-once").exists()  # rank 0 really died (os._exit) once, before step 5
    assert out.metrics["step"] == 6
    assert out.metrics["start_step"] == 3  # the restarted workers began at the step-3 checkpoint, not at 0
    c = _client(out.mlflow_uri)
    assert {m.value for m in c.get_metric_history(out.mlflow_run_id, "start_step")} == {0.0, 3.0}
    assert c.get_metric_history(out.mlflow_run_id, "worker_failures")[-1].value == 1


@pytest.mark.slow
def test_resubmission_with_the_same_name_resumes_and_champion_is_set(ray_local, shards, tmp_path):
    """Its own run: resubmitting ``first_run``'s would change what the tests above read (they
    failed when this one ran first)."""
    storage = tmp_path / "runs"
    first = train(_config(shards, storage, "resubmitted", num_workers=1))
    assert not first.resumed and first.metrics["step"] == 6
    again = train(_config(shards, storage, "resubmitted", steps=9, num_workers=1))
    assert again.resumed and again.mlflow_run_id == first.mlflow_run_id
    assert again.metrics["start_step"] == 6 and again.metrics["step"] == 9
    c = _client(again.mlflow_uri)
    losses = [m.step for m in c.get_metric_history(again.mlflow_run_id, "train/loss")]
    assert max(losses) == 9 and min(s for s in losses if s > 6) == 7
    assert c.get_run(again.mlflow_run_id).data.tags["resubmissions"] == "1"
    assert c.get_run(again.mlflow_run_id).info.status == "FINISHED"
    versions = c.search_model_versions("name = 'roicodec-tlic'")
    assert {str(v.version) for v in versions} == {first.model_version, again.model_version}
    champ = c.get_model_version_by_alias("roicodec-tlic", "champion")
    best = min(versions, key=lambda v: float(v.tags["val_loss"]))
    assert str(champ.version) == str(best.version) == again.champion_version
    assert champ.source.endswith("/checkpoint")

    # once more, finished: no workers start, nothing is trained or registered
    done = train(_config(shards, storage, "resubmitted", steps=9, num_workers=1))
    assert done.metrics["step"] == done.metrics["start_step"] == 9 and done.checkpoint == again.checkpoint
    assert max(m.step for m in c.get_metric_history(done.mlflow_run_id, "train/loss")) == 9
    assert done.model_version is None and len(c.search_model_versions("name = 'roicodec-tlic'")) == 2
    assert c.get_run(done.mlflow_run_id).info.status == "FINISHED"
