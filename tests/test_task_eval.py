"""Task metrics: COCOeval on decoded images, the detector interface, torchvision detectors, Ray Data."""

from __future__ import annotations

import csv
import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
from PIL import Image

import task_fixtures
from pipeline.codec.checkpoint import save_checkpoint
from pipeline.data.samples import write_sample_set
from pipeline.eval.cocoeval import coco_scores, load_task_set
from pipeline.eval.detectors import (DetectorError, TorchvisionDetectorSpec, _freeze_batchnorm, _weights_enum,
                                     torch_cache_file)
from pipeline.eval.evaluate import EvaluationError
from pipeline.eval.rd import evaluation_metrics, select_champion
from pipeline.eval.task import task_sweep, write_task_outputs
from task_fixtures import SurvivingObjectsDetector, SurvivingObjectsFactory

ray.cloudpickle.register_pickle_by_value(task_fixtures)  # Ray's workers cannot import the tests folder
TOLERANCE = 16.0  # mean |error| (levels) over an object under which the test detector still finds it


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """Five generated photo-like images with person / car / dog polygons, as a COCO-format set."""
    return write_sample_set(tmp_path_factory.mktemp("coco"), n_images=5, size=(96, 128), seed=1)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (the evaluations reuse it instead of starting their own)."""
    from pipeline.ray_session import ensure_ray

    started = ensure_ray()
    yield
    if started:
        ray.shutdown()


def gt_results(coco, drop: int = 0) -> list[dict]:
    """The ground truth as detection results (score 1), the last ``drop`` objects left out."""
    anns = sorted(coco.anns.values(), key=lambda a: a["id"])
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in anns[:len(anns) - drop]]


def pycocotools_directly(annotations: Path, results_file: str, iou_type: str, image_ids=None) -> list[float] | None:
    """pycocotools' own example, on files: COCO, loadRes, COCOeval, summarize -> stats[:6] (-1: none)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(annotations))
    if not json.loads(Path(results_file).read_text()):
        return None  # loadRes cannot read an empty file
    ev = COCOeval(gt, gt.loadRes(results_file), iou_type)
    if image_ids is not None:
        ev.params.imgIds = image_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(v) for v in ev.stats[:6]]


# -- scoring --------------------------------------------------------------------------------------

def test_coco_scores_known_answers(coco_set, tmp_path):
    ts = load_task_set(coco_set.annotations, coco_set.images_dir)
    assert coco_scores(ts.coco, gt_results(ts.coco), "bbox")["AP"] == 1.0
    missed = coco_scores(ts.coco, gt_results(ts.coco, drop=2), "bbox")
    assert 0.0 < missed["AP"] < 1.0  # the harness sees a missed object
    assert coco_scores(ts.coco, [], "bbox")["AP"] == 0.0  # pycocotools' loadRes cannot take []
    f = tmp_path / "r.json"
    f.write_text(json.dumps(gt_results(ts.coco, drop=2)))
    direct = pycocotools_directly(coco_set.annotations, str(f), "bbox")
    ours = coco_scores(ts.coco, f, "bbox")
    assert [ours[k] if not math.isnan(ours[k]) else -1.0 for k in ours] == direct


def test_the_test_detector_loses_objects_as_images_degrade(coco_set):
    ts = load_task_set(coco_set.annotations, coco_set.images_dir)
    det = SurvivingObjectsDetector(coco_set.annotations, coco_set.images_dir, TOLERANCE)
    rng = np.random.default_rng(0)
    originals = [np.asarray(Image.open(p).convert("RGB")) for _, _, p in ts.images]
    aps = []
    for sigma in (0, 10, 20, 40, 80):
        noisy = [np.clip(im + rng.normal(0, sigma, im.shape), 0, 255).astype(np.uint8) for im in originals]
        found = det(noisy, ts.image_ids)
        aps.append(coco_scores(ts.coco, [d for f in found for d in f], "segm")["AP"])
    assert aps[0] == 1.0 and aps[-1] < 0.5
    assert all(a >= b for a, b in zip(aps, aps[1:])), aps


def test_an_annotation_file_that_does_not_match_the_images_is_one_line(coco_set, tmp_path):
    doc = json.loads(coco_set.annotations.read_text())
    doc["images"][1]["file_name"] = "elsewhere.png"
    bad = tmp_path / "missing.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match=r"1 of 5 images are not there \(first: elsewhere.png\)"):
        load_task_set(bad, coco_set.images_dir)
    doc = json.loads(coco_set.annotations.read_text())
    doc["images"][0]["width"] = 640
    bad.write_text(json.dumps(doc))
    with pytest.raises(EvaluationError, match=r"sample_0000.png is 128x96, the annotation says 640x96") as e:
        load_task_set(bad, coco_set.images_dir)
    assert "\n" not in str(e.value)
    bad.write_text("{not json")
    with pytest.raises(EvaluationError, match="not a COCO annotation file"):
        load_task_set(bad, coco_set.images_dir)


# -- torchvision detectors ------------------------------------------------------------------------

def test_weights_from_a_file_and_from_the_torch_cache_never_downloaded(tmp_path, monkeypatch):
    from torchvision.models import get_model

    arch = "fasterrcnn_mobilenet_v3_large_fpn"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = TorchvisionDetectorSpec(arch, "DEFAULT", min_size=64, max_size=96)
    with pytest.raises(DetectorError) as e:
        spec.check()
    cached = torch_cache_file(_weights_enum(arch).DEFAULT.url)
    assert str(cached) in str(e.value) and "--detector-weights" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DetectorError, match="detector weights file not found"):
        TorchvisionDetectorSpec(arch, str(tmp_path / "missing.pth")).check()
    with pytest.raises(DetectorError, match="has no torchvision weights 'COCO_V9'"):
        TorchvisionDetectorSpec(arch, "COCO_V9").check()
    # a state dict like torchvision's files (frozen batch norm: no num_batches_tracked) in the cache
    torch.manual_seed(3)
    source = get_model(arch, weights=None, weights_backbone=None, num_classes=91)
    _freeze_batchnorm(source)
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    loaded = spec.build_model().state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {"backbone.body.nope": torch.zeros(1)}}, wrong)
    with pytest.raises(DetectorError, match="do not fit"):
        TorchvisionDetectorSpec(arch, str(wrong)).build_model()


# -- the whole path on local Ray ------------------------------------------------------------------

@pytest.mark.slow
def test_task_sweep_scores_every_codec_like_pycocotools(coco_set, trained, local_ray, tmp_path):
    ckpt = save_checkpoint(trained("sft"), tmp_path / "sft.pt")
    images = tmp_path / "images"
    images.mkdir()
    for p in coco_set.image_files:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "sample_0004.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # an error row, not a failed run
    res = task_sweep(ckpt, images, annotations=coco_set.annotations, rates=[0.0, 0.5, 1.0], baselines=["jpeg"],
                     detector=SurvivingObjectsFactory(coco_set.annotations, images, TOLERANCE),
                     results_dir=tmp_path / "results", progress=False)
    assert res["n_images"] == 4 and [e["image"] for e in res["errors"]] == ["sample_0004.png"]
    assert res["iou_types"] == ["bbox", "segm"]
    assert res["original"]["bbox_AP"] == 1.0 and res["original"]["segm_AP"] == 1.0  # the ceiling
    assert set(res["curves"]) == {"roicodec", "learned_uniform", "jpeg"}
    aps = [p["bbox_AP"] for c in res["curves"].values() for p in c["points"]]
    assert len(aps) == 9 and min(aps) < 1.0  # coding loses objects
    ids = [i for i, f, _ in load_task_set(coco_set.annotations, images).images if f != "sample_0004.png"]
    for point in [res["original"], *(p for c in res["curves"].values() for p in c["points"])]:
        for iou, path in point["results"].items():  # over the four readable images
            ours = [point[f"{iou}_{k}"] for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")]
            direct = pycocotools_directly(coco_set.annotations, path, iou, ids)
            assert [-1.0 if math.isnan(v) else v for v in ours] == direct or (direct is None and ours[0] == 0.0)
    files = write_task_outputs(res, tmp_path / "out")
    for name in ("task_bbox_AP.png", "task_segm_AP.png", "task_roi_psnr.png", "task_psnr.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.format == "PNG"
    rows = list(csv.DictReader(open(files["points_csv"])))
    assert len(rows) == 1 + 9 and rows[0]["curve"] == "original" and rows[0]["bbox_AP"] == "1"
    metrics = evaluation_metrics(json.loads(Path(files["json"]).read_text()))
    assert metrics["eval/task/original/bbox_AP"] == 1.0 and "eval/task/roicodec/segm_AP_at_0.5" in metrics


@pytest.mark.slow
def test_roicodec_evaluate_runs_a_real_mask_rcnn_on_ray_and_logs_to_mlflow(coco_set, local_ray, tmp_path, capsys,
                                                                          monkeypatch):
    from mlflow import MlflowClient

    from conftest import run_job_script, tiny_model
    from pipeline.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("task", str(tmp_path / "artifacts"))).info.run_id
    torch.manual_seed(0)
    ckpt = save_checkpoint(tiny_model("tma"), tmp_path / "ckpt.pt", extra={"mlflow_run_id": run_id})
    out = tmp_path / "task.json"
    argv = ["evaluate", "--checkpoint", str(ckpt), "--images", str(coco_set.images_dir), "--json", str(out),
            "--task-annotations", str(coco_set.annotations), "--detector", "maskrcnn_resnet50_fpn",
            "--detector-min-size", "64", "--detector-max-size", "128", "--detector-score-threshold", "0",
            "--task-limit", "2", "--sweep-rates", "2", "--baselines", "jpeg", "--roi-from", "saliency",
            "--mlflow-uri", uri, "--no-progress"]
    capsys.readouterr()
    assert main([*argv, "--detector-weights", str(tmp_path / "nope.pth")]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "roicodec" in line]
    assert err == [f"roicodec: error: detector weights file not found: {tmp_path / 'nope.pth'} (--detector-weights)"]
    bad = tmp_path / "other.json"
    bad.write_text(coco_set.annotations.read_text().replace("sample_0001.png", "other.png"))
    assert main([*argv, "--detector-weights", "random", "--task-annotations", str(bad)]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "roicodec" in line]
    assert err == [f"roicodec: error: other.json does not match {coco_set.images_dir}: 1 of 2 images are not "
                   "there (first: other.png)"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    job = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py"  # ranking by a task metric, same check
    assert run_job_script(job, [*argv[1:], "--select-champion", "--checkpoints", str(tmp_path),
                                "--detector-weights", "DEFAULT", "--criterion", "bd_rate_map_vs_jpeg"]) == 1
    assert "are not in the local torch cache" in capsys.readouterr().err
    assert main([*argv, "--detector-weights", "random"]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 2 and res["iou_types"] == ["bbox", "segm"] and res["mask_options"] == {"saliency": True}
    assert set(res["curves"]) == {"roicodec", "learned_uniform", "jpeg"}
    assert all(len(c["points"]) == 2 for c in res["curves"].values())
    assert json.loads(Path(res["original"]["results"]["segm"]).read_text())  # random weights still detect
    run = client.get_run(run_id)
    assert "eval/task/original/segm_AP" in run.data.metrics and "eval/task/jpeg/bbox_AP_at_1" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/task.json", "evaluation/task_bbox_AP.png", "evaluation/task_points.csv"} <= logged


@pytest.mark.slow
def test_select_champion_ranks_by_a_task_metric(coco_set, trained, local_ray, tmp_path):
    from conftest import tiny_model

    good = save_checkpoint(trained("sft"), tmp_path / "good.pt")
    torch.manual_seed(0)
    bad = save_checkpoint(tiny_model("sft"), tmp_path / "untrained.pt")
    sweep = partial(task_sweep, annotations=coco_set.annotations,
                    detector=SurvivingObjectsFactory(coco_set.annotations, coco_set.images_dir, TOLERANCE))
    res = select_champion([bad, good], coco_set.images_dir, criterion="bd_ap_map_vs_jpeg", sweep=sweep,
                          write_outputs=write_task_outputs, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}",
                          progress=False, rates=(0.0, 0.5, 1.0), baselines=("jpeg",), out_dir=tmp_path / "out")
    assert res["higher_is_better"] and [r["checkpoint"] for r in res["ranking"]] == [str(good), str(bad)]
    assert math.isfinite(res["best"]["value"])  # the untrained one: no AP anywhere, below or nan
    assert Path(res["best"]["files"]["plots"][0]).name == "task_bbox_AP.png"
    assert all(Path(f).is_file() for f in res["best"]["files"]["plots"])
