"""The main job end to end on tiny settings, on the real photos: Ray Data masks (COCO boxes and
saliency) -> Ray Train -> sweep -> champion -> side-by-side pictures -> summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.codec.checkpoint import fingerprint, load_checkpoint
from pipeline.codec.default_model import default_checkpoint
from pipeline.codec.warm_start import InitError
from pipeline.demo import run_demo, training_stages
from pipeline.train.trainer import TrainConfig


@pytest.mark.slow
def test_demo_fine_tunes_the_default_model_through_every_stage_and_is_safe_to_run_twice(tmp_path):
    held_out = ["chelsea", "gravel"]  # a photo with a box and one whose ROI is its saliency
    tiny = dict(steps=4, max_side=128, held_out=held_out, perceptual_steps=2)
    first = run_demo(tmp_path, **tiny)
    # 4 photos with boxes (one row each, all objects as the ROI) + 8 textures (saliency)
    assert first["preprocess"] == {"rows_written": 12, "error_rows": 0, "skipped_keys": 0}
    assert first["init"] == "default" and first["train"]["metrics"]["step"] == 4
    assert "demo-photos-tma-from-default" in first["checkpoint"]
    # the fine-tuned model is the default model's architecture (tma, context entropy model) with new weights
    tuned, start = load_checkpoint(first["checkpoint"]), load_checkpoint(default_checkpoint())
    assert tuned.config == start.config and fingerprint(tuned) != fingerprint(start)
    assert (tmp_path / "summary.json").is_file()
    masks = sorted(p.stem for p in (tmp_path / "data" / "eval_photos" / "masks").glob("*.png"))
    assert masks == sorted(held_out)
    for rows in (first["vs_jpeg"], first["init_vs_jpeg"]):  # the trained model, and the one it started from
        assert [r["rate"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
        for row in rows:
            # real files on both sides, JPEG at the nearest bpp it can reach
            assert row["bpp"] > 0 and row["jpeg_bpp"] > 0 and row["roi_psnr"] > 5
        bpps = [r["bpp"] for r in rows]
        assert bpps == sorted(bpps)

    # the perceptual stage: its own run from the MSE run's last checkpoint
    perceptual = Path(first["perceptual_checkpoint"])
    assert perceptual.is_file() and "demo-photos-tma-from-default-perceptual" in str(perceptual)
    assert (perceptual.parent / "discriminator.pt").is_file()
    # one picture per held-out photo: four captioned panels of the photo's size side by side
    # (original, MSE model, perceptual model, JPEG)
    assert sorted(Path(p).stem for p in first["pictures"]) == sorted(held_out)
    for path in first["pictures"]:
        photo = Image.open(tmp_path / "data" / "eval_photos" / "images" / Path(path).name)
        picture = Image.open(path)
        assert picture.width == 4 * photo.width + 18 and picture.height > photo.height
    assert first["serve"] == f"python jobs/deploy.py --checkpoint {first['checkpoint']}"

    second = run_demo(tmp_path, **tiny)
    assert second["preprocess"] == {"rows_written": 0, "error_rows": 0, "skipped_keys": 12}
    assert second["train"]["resumed"] and second["train"]["metrics"]["step"] == 4
    assert second["checkpoint"] == first["checkpoint"] and second["pictures"] == first["pictures"]
    assert second["perceptual_checkpoint"] == first["perceptual_checkpoint"]
    assert json.loads((tmp_path / "summary.json").read_text())["checkpoint"] == first["checkpoint"]


def test_demo_from_scratch_trains_in_two_stages_of_one_run():
    base = TrainConfig(run_name="demo-photos-tma", lr=1.0)
    first, second = training_stages(base, steps=4400, lr=1e-3, from_init=False, finetune=None, max_side=512)
    assert (first.steps, first.crop, first.lr, first.lr_drop) == (3600, 64, 1e-3, 0.2)
    assert (second.steps, second.crop, second.lr, second.lr_drop) == (4400, 128, 1e-4, 0.0)
    assert first.run_name == second.run_name == "demo-photos-tma"
    # the second stage is at most half the steps, its crops no larger than the photos; 0 skips it
    short = training_stages(base, steps=10, lr=1e-3, from_init=False, finetune=None, max_side=100)
    assert [(s.steps, s.crop) for s in short] == [(5, 64), (10, 64)]
    assert len(training_stages(base, 10, 1e-3, False, {"steps": 0}, 512)) == 1
    # from an init: one stage on 128 px crops at the given rate
    (tune,) = training_stages(base, steps=600, lr=1e-4, from_init=True, finetune=None, max_side=512)
    assert (tune.steps, tune.crop, tune.lr, tune.batch_size) == (600, 128, 1e-4, 8)


def test_demo_names_missing_init_weights_in_one_line(tmp_path):
    with pytest.raises(InitError, match="init weights not found"):
        run_demo(tmp_path, init=str(tmp_path / "missing.pt"))
    assert not (tmp_path / "data").exists()  # nothing ran
