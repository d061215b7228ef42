"""The main job end to end on tiny settings, on the real photos: Ray Data masks (COCO boxes and
saliency) -> Ray Train -> sweep -> champion -> side-by-side pictures -> summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.demo import run_demo

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_on_real_photos_and_is_safe_to_run_twice(tmp_path):
    held_out = ["chelsea", "gravel"]  # a photo with a box and one whose ROI is its saliency
    # the context entropy model, so it too runs through training, evaluation, pictures and MLflow
    tiny = dict(steps=4, max_side=128, model={"N": 16, "M": 24, "n_rates": 2}, held_out=held_out, entropy="context",
                perceptual_steps=2)
    first = run_demo(tmp_path, **tiny)
    # 4 photos with boxes (one row each, all objects as the ROI) + 8 textures (saliency)
    assert first["preprocess"] == {"rows_written": 12, "error_rows": 0, "skipped_keys": 0}
    # both stages: 2 steps on 64 px crops, then the same run resumed for 2 on larger crops
    assert first["train"]["metrics"]["step"] == 4 and first["train"]["metrics"]["start_step"] == 2
    assert (tmp_path / "summary.json").is_file()
    masks = sorted(p.stem for p in (tmp_path / "data" / "eval_photos" / "masks").glob("*.png"))
    assert masks == sorted(held_out)
    assert [r["rate"] for r in first["vs_jpeg"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for row in first["vs_jpeg"]:
        # real files on both sides, JPEG at the nearest bpp it can reach
        assert row["bpp"] > 0 and row["jpeg_bpp"] > 0 and row["roi_psnr"] > 5
    bpps = [r["bpp"] for r in first["vs_jpeg"]]
    assert bpps == sorted(bpps)

    # the perceptual stage: its own run from the MSE run's last checkpoint
    perceptual = Path(first["perceptual_checkpoint"])
    assert perceptual.is_file() and "demo-photos-tma-context-perceptual" in str(perceptual)
    assert (perceptual.parent / "discriminator.pt").is_file()
    # one picture per held-out photo: four captioned panels of the photo's size side by side
    # (original, MSE model, perceptual model, JPEG)
    assert sorted(Path(p).stem for p in first["pictures"]) == sorted(held_out)
    for path in first["pictures"]:
        photo = Image.open(tmp_path / "data" / "eval_photos" / "images" / Path(path).name)
        picture = Image.open(path)
        assert picture.width == 4 * photo.width + 18 and picture.height > photo.height
    assert first["serve"] == f"python jobs/deploy.py --checkpoint {first['checkpoint']}"
    assert "demo-photos-tma-context" in first["checkpoint"]

    second = run_demo(tmp_path, **tiny)
    assert second["preprocess"] == {"rows_written": 0, "error_rows": 0, "skipped_keys": 12}
    assert second["train"]["resumed"] and second["train"]["metrics"]["step"] == 4
    assert second["checkpoint"] == first["checkpoint"] and second["pictures"] == first["pictures"]
    assert second["perceptual_checkpoint"] == first["perceptual_checkpoint"]
    assert json.loads((tmp_path / "summary.json").read_text())["checkpoint"] == first["checkpoint"]
