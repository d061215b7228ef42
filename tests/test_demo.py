"""The main job end to end on tiny settings: Ray Data masks -> Ray Train -> sweep -> champion -> summary."""

from __future__ import annotations

import json

import pytest

from pipeline.demo import run_demo

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_is_safe_to_run_twice(tmp_path):
    tiny = dict(steps=4, n_train=6, n_eval=2, size=96, model={"N": 16, "M": 24, "n_rates": 2})
    first = run_demo(tmp_path, **tiny)
    rows = first["preprocess"]["rows_written"]  # one row per image, all its objects as the ROI
    assert rows == 6 and first["preprocess"]["error_rows"] == 0
    # both stages: 2 steps on 64 px crops, then the same run resumed for 2 on larger crops
    assert first["train"]["metrics"]["step"] == 4 and first["train"]["metrics"]["start_step"] == 2
    assert (tmp_path / "summary.json").is_file()
    assert [r["rate"] for r in first["vs_jpeg"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for row in first["vs_jpeg"]:
        # real files on both sides, JPEG at the nearest bpp it can reach
        assert row["bpp"] > 0 and row["jpeg_bpp"] > 0 and row["roi_psnr"] > 5
    bpps = [r["bpp"] for r in first["vs_jpeg"]]
    assert bpps == sorted(bpps)

    second = run_demo(tmp_path, **tiny)
    assert second["preprocess"]["rows_written"] == 0 and second["preprocess"]["skipped_keys"] == rows
    assert second["train"]["resumed"] and second["train"]["metrics"]["step"] == 4
    assert second["checkpoint"] == first["checkpoint"]
    assert json.loads((tmp_path / "summary.json").read_text())["checkpoint"] == first["checkpoint"]
