"""The Ray Data mask job: bad files become error rows, re-runs add nothing, masks match direct ones."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from pipeline.data.preprocess import PreprocessError, preprocess
from pipeline.data.samples import photo_like_image, write_sample_set
from pipeline.data.shards import SHARD_SCHEMA, decode_masks, existing_keys, read_shards, write_shard
from pipeline.masks import TextMasker, build_mask, load_coco
from pipeline.masks.ops import MaskError, to_png, to_uint8

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("preprocess_masks_job", ROOT / "jobs" / "preprocess_masks.py")
_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_job)
job_main = _job.main
PROMPT = "a dog"
MAX_SIDE = 96
BIG = "big/huge.png"  # larger than MAX_SIDE: computed downscaled, stored at full size
BAD = {"corrupt_truncated.png", "corrupt_random.jpg", "notes.txt"}


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    """One local Ray for the module; more logical CPUs than the 2 cores so actors do not starve tasks."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """40 images (RGB, grayscale, RGBA, 16-bit PNG, JPEG, one large one in a subfolder) + 3 bad files."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "big").mkdir()
    for i in range(39):
        arr = photo_like_image(64, 64, seed=i)[0]
        kind = i % 5
        if kind == 1:
            Image.fromarray(arr).convert("L").save(folder / f"img_{i:02d}_gray.png")
        elif kind == 2:
            rgba = np.dstack([arr, np.full((64, 64), 128, np.uint8)])
            Image.fromarray(rgba).save(folder / f"img_{i:02d}_rgba.png")
        elif kind == 3:
            wide = (arr.mean(axis=2) * 257).astype(np.uint16)
            Image.fromarray(wide).save(folder / f"img_{i:02d}_16bit.png")
        elif kind == 4:
            Image.fromarray(arr).save(folder / f"img_{i:02d}.jpg", quality=90)
        else:
            Image.fromarray(arr).save(folder / f"img_{i:02d}.png")
    Image.fromarray(photo_like_image(150, 200, seed=99)[0]).save(folder / BIG)
    good = (folder / "img_00.png").read_bytes()
    (folder / "corrupt_truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "corrupt_random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (folder / "notes.txt").write_text("not an image\n")
    (folder / ".hidden.png").write_bytes(good)  # hidden files are not inputs
    return folder


def _run(folder: Path, output: Path, clip_config: Path, **kwargs) -> dict:
    return preprocess(folder, output, prompts=[PROMPT], clip_model="tiny", clip_pretrained="none",
                      clip_config=clip_config, rows_per_shard=8, batch_size=8, max_side=MAX_SIDE, **kwargs)


def test_text_masks_resume_idempotence_and_bad_files(image_folder, clip_config, tmp_path):
    out = tmp_path / "shards"
    first = _run(image_folder, out, clip_config, limit=20)  # "interrupted" after 20 files
    assert first["rows_written"] == 20 and first["skipped_keys"] == 0
    (out / ".part-crashed-00000.parquet.tmp").write_bytes(b"half a shard")  # a crash mid-write
    second = _run(image_folder, out, clip_config)  # resume: only the missing work
    assert second["rows_written"] == 23 and second["skipped_keys"] == 20
    third = _run(image_folder, out, clip_config)  # a re-run adds nothing
    assert third["rows_written"] == 0 and third["skipped_keys"] == 43
    assert first["run_id"] != second["run_id"]

    table = read_shards(out)
    assert table.schema.remove_metadata() == SHARD_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == 43 and len({(r["image_id"], r["prompt"]) for r in rows}) == 43
    assert existing_keys(out) == {(r["image_id"], r["prompt"]) for r in rows}
    errors = {r["image_id"]: r for r in rows if r["error"] is not None}
    assert set(errors) == BAD
    assert all(r["roi_mask"] is None and r["saliency"] is None and r["width"] is None for r in errors.values())
    assert errors["notes.txt"]["error"] == "UnidentifiedImageError: not an image file (unknown format)"
    good = [r for r in rows if r["error"] is None]
    assert len(good) == 40 and {r["prompt"] for r in rows} == {PROMPT}
    assert {r["mask_source"] for r in rows} == {"clip"}
    meta = pq.read_schema(sorted(out.glob("*.parquet"))[0]).metadata
    assert meta[b"roicodec.clip_model"] == b"tiny" and meta[b"roicodec.max_side"] == str(MAX_SIDE).encode()

    masker = TextMasker("tiny", "none", config=clip_config)  # the same seeded random weights as the actors
    for row in good:
        path = image_folder / row["image_id"]
        assert Path(row["uri"]) == path.resolve()
        roi, sal = decode_masks(row)
        with Image.open(path) as img:
            assert (row["width"], row["height"]) == img.size
            assert roi.shape == sal.shape == (img.height, img.width)
            if row["image_id"] == BIG:
                continue
            direct_roi = build_mask(img, prompts=[PROMPT], text_masker=masker)
            direct_sal = build_mask(img, saliency=True)
        # PNG stores 8 bits; batched vs single inference may differ by float rounding: one level at most
        assert np.abs(to_uint8(roi).astype(int) - to_uint8(direct_roi)).max() <= 1, row["image_id"]
        np.testing.assert_array_equal(to_uint8(sal), to_uint8(direct_sal))


def test_coco_root_saliency_only_and_job_script(tmp_path, capsys):
    samples = write_sample_set(tmp_path / "coco", n_images=6, size=(64, 80), seed=1)
    summary = preprocess(samples.root, tmp_path / "gt", rows_per_shard=4)  # COCO root: per-image categories
    coco = load_coco(samples.annotations)
    expected = {(name, c) for cid, name in coco.images() for c in coco.categories_in(cid)}
    table = read_shards(tmp_path / "gt")
    assert summary["rows_written"] == len(expected) == table.num_rows and summary["roi_source"] == "coco"
    for row in table.to_pylist():
        assert (row["image_id"], row["prompt"]) in expected and row["mask_source"] == "coco"
        roi, sal = decode_masks(row)
        np.testing.assert_array_equal(roi, coco.mask(coco.image_id(row["image_id"]), [row["prompt"]]))
        assert sal.shape == roi.shape

    # --combine-prompts: one row per image, the union of its categories' masks
    combined = preprocess(samples.root, tmp_path / "union", rows_per_shard=4, saliency=False,
                          combine_prompts=True)
    rows = read_shards(tmp_path / "union").to_pylist()
    assert combined["rows_written"] == len(rows) == len(coco.images())
    for row in rows:
        image_id = coco.image_id(row["image_id"])
        assert row["prompt"] == " + ".join(coco.categories_in(image_id))
        np.testing.assert_array_equal(decode_masks(row)[0], coco.mask(image_id))
    assert any(" + " in row["prompt"] for row in rows)  # some image has several categories
    again = preprocess(samples.root, tmp_path / "union", rows_per_shard=4, saliency=False, combine_prompts=True)
    assert again["rows_written"] == 0 and again["skipped_keys"] == len(rows)

    # the job script: saliency only (no prompts, no annotations) -> one null-prompt row per image
    argv = ["--input", str(samples.images_dir), "--output", str(tmp_path / "sal"), "--rows-per-shard", "2", "-q"]
    assert job_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_written"] == 6 and summary["roi_source"] == "saliency"
    rows = read_shards(tmp_path / "sal").to_pylist()
    assert {r["prompt"] for r in rows} == {None} and summary["shards_written"] == 3
    assert all(r["roi_mask"] == r["saliency"] and r["mask_source"] == "saliency" for r in rows)
    assert job_main(argv) == 0 and json.loads(capsys.readouterr().out)["rows_written"] == 0


def test_bad_settings_fail_with_one_line(tmp_path, capsys, clip_config):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    cases = [
        (["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "input folder not found"),
        (["--input", str(folder), "--output", str(tmp_path / "o"), "--prompts", "a dog", "--clip-pretrained",
          "openai"], "--clip-pretrained"),
        (["--input", str(folder), "--output", str(tmp_path / "o"), "--no-saliency"], "nothing to compute"),
        (["--input", str(folder), "--output", str(tmp_path / "o"), "--prompts-file", str(tmp_path / "none.txt")],
         "cannot read prompts file"),
        (["--input", str(folder), "--output", str(tmp_path / "o"), "--prompts", "a dog", "--text-actors", "4",
          "--text-actor-cpus", "1", "--clip-model", "t", "--clip-pretrained", "none", "--clip-config",
          str(clip_config)], "leave no CPU"),
        (["--input", str(folder), "--output", str(tmp_path / "o"), "--prompts", "a dog", "--gpu",
          "--clip-model", "t", "--clip-pretrained", "none", "--clip-config", str(clip_config)], "one GPU each"),
    ]
    for argv, message in cases:
        assert job_main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    with pytest.raises(PreprocessError, match="unknown ROI source"):
        preprocess(folder, tmp_path / "o", roi_source="depth")
    with pytest.raises(MaskError, match="zebra"):
        samples = write_sample_set(tmp_path / "coco", n_images=1, size=(32, 32))
        preprocess(samples.root, tmp_path / "o", prompts=["zebras"])


def test_job_help_and_shard_helpers(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "preprocess_masks.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--rows-per-shard" in result.stdout and "--clip-config" in result.stdout
    assert read_shards(tmp_path / "nothing").num_rows == 0 and existing_keys(tmp_path / "nothing") == set()
    mask = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    row = {"image_id": "a.png", "uri": "/x/a.png", "width": 4, "height": 3, "prompt": None,
           "roi_mask": to_png(mask), "saliency": None, "mask_source": "saliency", "error": None}
    path = write_shard([row], tmp_path / "s" / "part-x-00000.parquet", {"run_id": "x"})
    assert not list(path.parent.glob(".*"))  # no temporary left behind
    back = read_shards(path).to_pylist()[0]
    roi, sal = decode_masks(back)
    assert sal is None and np.abs(roi - mask).max() <= 0.5 / 255 + 1e-6
    assert existing_keys(path.parent) == {("a.png", None)}
