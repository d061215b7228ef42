"""Evaluation: metrics on known cases, baselines at matched bpp, BD-rate, ``roicodec evaluate``."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from conftest import TINY
from pipeline.codec.checkpoint import fingerprint, save_checkpoint
from pipeline.codec.coding import tensor_to_image
from pipeline.codec.models import build_model
from pipeline.data.samples import objects_mask, photo_like_image
from pipeline.eval import baselines as bl
from pipeline.eval.cli import add_evaluate_arguments, run_evaluate_command
from pipeline.eval import rd
from pipeline.eval.evaluate import METRICS, EvaluationError, evaluate_checkpoint, quality
from pipeline.eval.metrics import PSNR_CAP, psnr, quality_weighted_psnr, roi_psnr
from pipeline.eval.rd import bd_psnr, bd_rate, rd_sweep, select_champion

CODEC_KEYS = ("learned_uniform", "jpeg", "webp", "jpeg2000")


# -- fixtures ---------------------------------------------------------------------------------

def write_set(root: Path, n: int, size: tuple[int, int], seed: int = 0, corrupt: bool = False
              ) -> tuple[Path, Path]:
    """n photo-like PNGs in root/images and their object masks in root/masks (white = ROI)."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n):
        arr, objects = photo_like_image(h, w, seed + i)
        Image.fromarray(arr).save(images / f"img{i}.png")
        Image.fromarray((objects_mask(objects, h, w) * 255).astype(np.uint8)).save(masks / f"img{i}.png")
    if corrupt:
        (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        (images / "notes.txt").write_text("not an image extension: ignored")
    return images, masks


@pytest.fixture(scope="module")
def untrained_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tiny_model(0), tmp_path_factory.mktemp("ckpt") / "untrained.pt")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded torch here: the metrics and codecs run on tiny images, where a second
    thread on a busy machine only adds synchronisation waits (MS-SSIM of 64 px: 1 s vs 10 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int):
    torch.manual_seed(seed)
    model = build_model("tlic", **TINY).eval()
    model.update(force=True)
    return model


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="roicodec evaluate")
    add_evaluate_arguments(p)
    return p.parse_args(argv)


# -- metrics on hand-made cases ---------------------------------------------------------------

def test_identical_images_give_the_capped_psnr():
    x = torch.rand(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    assert psnr(x, x) == PSNR_CAP
    assert roi_psnr(x, x, mask) == (PSNR_CAP, PSNR_CAP)


@pytest.mark.parametrize("e", [0.1, 0.05, 0.01])
def test_constant_error_gives_the_known_psnr(e):
    x = torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64)
    y = x + e
    assert psnr(x, y) == pytest.approx(-10 * math.log10(e * e), abs=1e-9)
    y[..., ::2, :] = x[..., ::2, :] - e  # the sign of the error does not matter
    assert psnr(x, y) == pytest.approx(-10 * math.log10(e * e), abs=1e-9)


def test_roi_psnr_only_looks_inside_the_mask():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 0.8  # binarised at 0.5: ROI
    y = x.clone()
    y[..., 8:24, 8:24] += 0.02  # a small error inside
    roi0, non0 = roi_psnr(x, y, mask)
    assert roi0 == pytest.approx(-10 * math.log10(0.02 ** 2), abs=1e-6)
    assert non0 == PSNR_CAP
    damaged = y.clone()
    damaged[..., :8, :] = 1 - damaged[..., :8, :]  # wreck the outside
    roi1, non1 = roi_psnr(x, damaged, mask)
    assert roi1 == roi0
    assert non1 < 15
    assert math.isnan(roi_psnr(x, y, torch.zeros_like(mask))[0])  # empty ROI: nan


def test_quality_weighted_psnr_weighs_each_pixel_by_its_quality():
    """Weights ``m + (1 - m) Q``: errors only where the quality is 0 cost nothing; Q = 1 (or no
    mask) is plain PSNR; an error under weight w among weight-1 pixels counts w times."""
    torch.manual_seed(2)
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    m = torch.zeros(1, 1, 16, 16)
    m[..., :8] = 1.0
    m[..., 8:12] = 0.5
    y = x.clone()
    y[..., 12:] += 0.1  # where m = 0
    assert quality_weighted_psnr(x, y, m, 0.0) == PSNR_CAP
    assert quality_weighted_psnr(x, y, m, 1.0) == pytest.approx(psnr(x, y)) == quality_weighted_psnr(x, y, None)
    z = x.clone()
    z[..., 8:12] += 0.1  # where m = 0.5: a quarter of the pixels, weight 0.5 + 0.5 Q
    for q in (0.0, 0.2):
        w = 0.5 + 0.5 * q
        expected = -10 * math.log10(w * 0.25 * 0.01 / (0.5 + 0.25 * w + 0.25 * q))
        assert quality_weighted_psnr(x, z, m, q) == pytest.approx(expected, abs=1e-9)


# -- baselines at matched bpp -----------------------------------------------------------------

@pytest.mark.parametrize("name,targets", [("jpeg", (0.5, 1.0)), ("webp", (0.25, 0.5)),
                                          ("jpeg2000", (0.25, 1.0))])
def test_baselines_land_within_10_percent_of_the_target_bpp(name, targets):
    if bl.unavailable_reason(name):
        pytest.skip(bl.unavailable_reason(name))
    for seed in (0, 1):
        image = Image.fromarray(photo_like_image(128, 128, seed)[0])
        for target in targets:
            data, x_hat, bpp, setting = bl.encode_at_bpp(name, image, target)
            assert bpp == pytest.approx(8 * len(data) / (128 * 128))
            assert abs(bpp - target) <= 0.1 * target, (name, seed, target, bpp, setting)
            assert x_hat.shape == (1, 3, 128, 128) and 0 <= float(x_hat.min()) <= float(x_hat.max()) <= 1
            # a higher target never gives a worse image
        low = bl.encode_at_bpp(name, image, targets[0])
        high = bl.encode_at_bpp(name, image, targets[1])
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        assert psnr(x, high.x_hat) > psnr(x, low.x_hat)


def test_baseline_search_is_nearest_and_clamps_out_of_reach_targets():
    image = Image.fromarray(photo_like_image(128, 128, 3)[0])
    res = bl.encode_at_bpp("jpeg", image, 0.01)  # below JPEG's floor on a tiny image
    assert res.setting == 1
    everything = {q: 8 * len(bl.encode_jpeg(image, q)) / 128 ** 2 for q in range(1, 101)}
    target = 0.8
    res = bl.encode_at_bpp("jpeg", image, target)
    best = min(abs(b - target) for b in everything.values())
    assert abs(res.bpp - target) <= best + 0.02 * target  # nearest (up to JPEG's non-monotone wiggles)
    with pytest.raises(bl.BaselineError):
        bl.encode_at_bpp("gif", image, 1.0)


def test_missing_jpeg2000_is_skipped_with_a_reason(monkeypatch, untrained, tmp_path):
    real = features.check
    monkeypatch.setattr(bl.features, "check", lambda f: False if f == "jpg_2000" else real(f))
    ok, skipped = bl.available_baselines()
    assert ok == ["jpeg", "webp"] and "OpenJPEG" in skipped["jpeg2000"]
    images, masks = write_set(tmp_path, 1, (64, 64))
    res = evaluate_checkpoint(untrained["tlic"], images, masks, baselines=("jpeg2000",), uniform=False,
                              progress=False)
    assert "jpeg2000" in res["baselines_skipped"] and "jpeg2000" not in res["images"][0]
    assert res["codecs"] == ["roicodec"]


# -- Bjøntegaard ------------------------------------------------------------------------------

RATES_A = [0.1, 0.2, 0.4, 0.8, 1.6]
PSNR_A = [25.0, 28.5, 31.6, 34.2, 36.3]  # concave, like a real codec


def test_bd_rate_of_a_rate_scaled_curve():
    scaled = [0.9 * r for r in RATES_A]
    assert bd_rate(RATES_A, PSNR_A, scaled, PSNR_A) == pytest.approx(-10.0, abs=0.1)
    assert bd_rate(scaled, PSNR_A, RATES_A, PSNR_A) == pytest.approx(100 * (1 / 0.9 - 1), abs=0.1)
    assert bd_rate(RATES_A, PSNR_A, RATES_A, PSNR_A) == pytest.approx(0.0, abs=1e-9)
    assert bd_psnr(RATES_A, PSNR_A, scaled, PSNR_A) > 0  # same quality for fewer bits


def test_bd_psnr_of_a_shifted_curve():
    up = [p + 1.0 for p in PSNR_A]
    assert bd_psnr(RATES_A, PSNR_A, RATES_A, up) == pytest.approx(1.0, abs=1e-9)
    assert bd_psnr(RATES_A, up, RATES_A, PSNR_A) == pytest.approx(-1.0, abs=1e-9)
    assert bd_rate(RATES_A, PSNR_A, RATES_A, up) < 0


def test_bd_without_overlap_is_nan():
    assert math.isnan(bd_rate(RATES_A, PSNR_A, RATES_A, [p + 30 for p in PSNR_A]))
    assert math.isnan(bd_psnr(RATES_A, PSNR_A, [r * 100 for r in RATES_A], PSNR_A))
    assert math.isnan(bd_rate(RATES_A[:1], PSNR_A[:1], RATES_A, PSNR_A))


# -- roicodec evaluate ------------------------------------------------------------------------

def test_evaluate_command_writes_per_image_and_mean_entries(untrained_ckpt, tmp_path, capsys):
    images, masks = write_set(tmp_path / "data", 2, (64, 96), corrupt=True)
    out = tmp_path / "out" / "eval.json"
    args = parse(["--checkpoint", str(untrained_ckpt), "--images", str(images), "--masks", str(masks),
                  "--json", str(out), "--roi-quality", "0.2", "--rate", "0.6", "--no-progress", "--no-mlflow"])
    assert run_evaluate_command(args) == 0
    res = json.loads(out.read_text())  # strict JSON: nan written as null
    assert res["n_images"] == 2 and [e["image"] for e in res["images"]] == ["img0.png", "img1.png"]
    assert [e["image"] for e in res["errors"]] == ["broken.png"]
    assert res["codecs"] == ["roicodec", *CODEC_KEYS] and res["baselines_skipped"] == {}
    for entry in [*res["images"], res["mean"]]:
        for key in METRICS:
            assert isinstance(entry[key], float), key
        for codec in CODEC_KEYS:
            for key in METRICS:
                assert isinstance(entry[codec][key], float), (codec, key)
    first = res["images"][0]
    assert first["bpp"] == pytest.approx(8 * first["bytes"] / (64 * 96))
    assert first["setting"] == 0.6 and first["mask"].endswith("img0.png") and 0 < first["roi_fraction"] < 1
    assert res["mean"]["bpp"] == pytest.approx(np.mean([e["bpp"] for e in res["images"]]))
    assert "roicodec" in capsys.readouterr().out


def test_evaluate_soft_codes_graded_maps_and_weighs_psnr_by_quality(untrained, untrained_ckpt, tmp_path):
    """``graded`` (``--soft``) codes other files from the same masks, and every codec's weighted PSNR
    lies between its ROI and non-ROI PSNR (weights 1 inside, Q outside); --soft with --pictures is
    a one-line error."""
    images, masks = write_set(tmp_path / "data", 2, (64, 96))
    runs = {g: evaluate_checkpoint(untrained["tlic"], images, masks, roi_quality=0.2, rate=0.6, baselines=("jpeg",),
                                   uniform=False, progress=False, graded=g) for g in (False, True)}
    assert runs[True]["graded"] and not runs[False]["graded"]
    assert [e["bytes"] for e in runs[True]["images"]] != [e["bytes"] for e in runs[False]["images"]]
    for entry in runs[True]["images"]:
        for point in (entry, entry["jpeg"]):
            low, high = sorted((point["roi_psnr"], point["nonroi_psnr"]))
            assert low - 1e-9 <= point["weighted_psnr"] <= high + 1e-9
    with pytest.raises(EvaluationError, match="--soft"):
        run_evaluate_command(parse(["--checkpoint", str(untrained_ckpt), "--images", str(images), "--masks",
                                    str(masks), "--json", str(tmp_path / "o.json"), "--soft", "--pictures",
                                    str(tmp_path / "p")]))


def test_evaluate_without_masks_makes_the_whole_image_roi(untrained, tmp_path):
    images, _ = write_set(tmp_path, 1, (64, 64))
    res = evaluate_checkpoint(untrained["tlic"], images, None, baselines=("jpeg",), progress=False)
    entry = res["images"][0]
    assert entry["roi_psnr"] == entry["psnr"] and math.isnan(entry["nonroi_psnr"])
    assert entry["learned_uniform"]["bpp"] == entry["bpp"] and entry["roi_fraction"] == 1.0
    assert math.isnan(res["mean"]["nonroi_psnr"])


def test_evaluate_rejects_bad_input(untrained_ckpt, tmp_path):
    with pytest.raises(EvaluationError, match="images folder not found"):
        evaluate_checkpoint(untrained_ckpt, tmp_path / "nope", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    with pytest.raises(EvaluationError, match="no image .* could be evaluated"):
        evaluate_checkpoint(untrained_ckpt, tmp_path / "bad", progress=False)
    images, _ = write_set(tmp_path / "s", 1, (64, 64))
    with pytest.raises(EvaluationError, match="checkpoint not found"):
        evaluate_checkpoint(tmp_path / "missing.pt", images, progress=False)
    with pytest.raises(EvaluationError, match="--plots needs --sweep"):
        run_evaluate_command(parse(["--checkpoint", str(untrained_ckpt), "--images", str(images),
                                    "--json", str(tmp_path / "o.json"), "--plots", str(tmp_path)]))
    with pytest.raises(SystemExit):
        parse(["--checkpoint", "c", "--images", "i", "--json", "o", "--rate", "2"])
    with pytest.raises(SystemExit):
        parse(["--checkpoint", "c", "--images", "i", "--json", "o", "--rate", "0.5", "--sweep"])


def test_roicodec_evaluate_via_the_main_cli(untrained_ckpt, tmp_path):
    from pipeline import cli

    images, masks = write_set(tmp_path, 1, (64, 64))
    out = tmp_path / "e.json"
    assert cli.main(["evaluate", "--checkpoint", str(untrained_ckpt), "--images", str(images), "--masks",
                     str(masks), "--json", str(out), "--no-progress", "--no-mlflow"]) == 0
    assert json.loads(out.read_text())["n_images"] == 1
    assert cli.main(["evaluate", "--checkpoint", str(untrained_ckpt), "--images", str(tmp_path / "none"),
                     "--json", str(out)]) == 1


# -- the sweep, MLflow and the champion -------------------------------------------------------
#
# A tiny codec needs many minutes of CPU training before its PSNR reaches the classic
# codecs' range, and Bjøntegaard numbers need overlapping curves. So the sweep's plumbing
# (curves, BD, files, MLflow, champion) is checked with a stand-in learned codec of known
# quality: JPEG at quality 5 + 90 x rate whose files are `factor` times smaller
# (factor per checkpoint, by fingerprint). The real codec runs through the same sweep
# in test_rd_sweep_with_the_real_codec below.

def fake_learned(monkeypatch, factors: dict[bytes, float]) -> None:
    def learned_point(model, x, mask, roi_quality, rate, eval_mask=None, lpips=None, graded=False,
                      weight_quality=None):
        res = bl.encode_at_setting("jpeg", tensor_to_image(x), 5 + 90 * rate)
        scale = factors[fingerprint(model)] * (0.9 if roi_quality < 1 else 1.0)
        return {"bpp": res.bpp * scale, **quality(x, res.x_hat, mask, lpips, weight_quality), "setting": rate}
    monkeypatch.setattr(rd, "learned_point", learned_point)


def test_sweep_writes_plots_tables_and_finite_bd(untrained_ckpt, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("eval-test", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    model = tiny_model(0)
    ckpt = save_checkpoint(model, tmp_path / "ckpt.pt", extra={"mlflow_run_id": run_id})
    fake_learned(monkeypatch, {fingerprint(model): 0.8})
    images, masks = write_set(tmp_path / "data", 2, (64, 64), seed=20)
    out, plots = tmp_path / "rd.json", tmp_path / "plots"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = parse(["--checkpoint", str(ckpt), "--images", str(images), "--masks", str(masks), "--json", str(out),
                  "--sweep", "--sweep-rates", "4", "--plots", str(plots), "--no-progress"])
    assert run_evaluate_command(args) == 0
    res = json.loads(out.read_text())
    assert set(res["curves"]) == {"roicodec", "learned_uniform", "jpeg", "webp", "jpeg2000"}
    assert [p["setting"] for p in res["curves"]["roicodec"]["points"]] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert set(res["bd"]) == {f"bd_{k}_{m}_vs_{a}" for k in ("rate", "psnr") for m in ("roi", "psnr", "weighted")
                              for a in ("jpeg", "webp", "jpeg2000", "uniform")}
    for key, value in res["bd"].items():
        assert isinstance(value, float) and math.isfinite(value), key
    # JPEG with files 0.8 x 0.9 the size: about -28 % against JPEG, -10 % against its own uniform curve
    assert -40 < res["bd"]["bd_rate_psnr_vs_jpeg"] < -15 and res["bd"]["bd_psnr_psnr_vs_jpeg"] > 0
    assert res["bd"]["bd_rate_roi_vs_uniform"] == pytest.approx(-10, abs=0.5)
    for name in ("rd_roi_psnr.png", "rd_psnr.png", "rd_weighted_psnr.png", "rd_nonroi_psnr.png", "rd_ms_ssim.png"):
        with Image.open(plots / name) as im:
            assert im.format == "PNG" and im.width > 100
    rows = list(csv.DictReader((plots / "rd_points.csv").open()))
    assert len(rows) == 4 + 4 + sum(len(bl.get_baseline(n).sweep) for n in bl.BASELINES)
    bd_rows = list(csv.DictReader((plots / "bd.csv").open()))
    assert len(bd_rows) == 3 * (4 + 4 - 1) and all(r["bd_rate_percent"] for r in bd_rows)
    # logged to the checkpoint's MLflow run
    assert res["mlflow"]["logged"] and res["mlflow"]["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.data.metrics["eval/bd_rate_roi_vs_jpeg"] == pytest.approx(res["bd"]["bd_rate_roi_vs_jpeg"])
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/rd.json", "evaluation/rd_roi_psnr.png", "evaluation/bd.csv"} <= logged


def test_select_champion_sets_the_alias_on_the_best_version(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.train import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("champ", artifact_location=str(tmp_path / "artifacts"))
    ckpts, versions, runs, factors = [], [], [], {}
    for seed, (name, factor) in enumerate((("worse", 1.3), ("better", 0.7), ("broken", None))):
        run_id = client.create_run(exp, run_name=name).info.run_id
        path = tmp_path / "ckpts" / name / "model.pt"
        if factor is None:
            path.parent.mkdir(parents=True)
            path.write_bytes(b"not a checkpoint")
        else:
            model = tiny_model(seed)
            factors[fingerprint(model)] = factor
            save_checkpoint(model, path, extra={"mlflow_run_id": run_id})
            versions.append(tracking.register_version(client, "roicodec-tlic", "file:///nowhere", run_id, {},
                                                      "val_loss"))
        ckpts.append(path)
        runs.append(run_id)
    fake_learned(monkeypatch, factors)
    images, masks = write_set(tmp_path / "data", 1, (64, 64), seed=30)
    res = select_champion(tmp_path / "ckpts", images, masks, tracking_uri=uri, progress=False,
                          rates=(0.0, 0.5, 1.0), baselines=("jpeg",), out_dir=tmp_path / "out")
    assert res["best"]["checkpoint"] == str(ckpts[1]) and res["best"]["value"] < 0
    assert res["alias"] == {"registered_model": "roicodec-tlic", "version": versions[1], "alias": "champion"}
    assert str(client.get_model_version_by_alias("roicodec-tlic", "champion").version) == versions[1]
    assert [r["checkpoint"] for r in res["ranking"]] == [str(ckpts[1]), str(ckpts[0]), str(ckpts[2])]
    assert res["ranking"][2]["value"] is None and "not a readable checkpoint" in res["ranking"][2]["error"]
    assert "eval/bd_rate_roi_vs_jpeg" in client.get_run(runs[1]).data.metrics  # each sweep logged to its run


def test_rd_sweep_with_the_real_codec(untrained, tmp_path):
    images, masks = write_set(tmp_path, 1, (64, 64))
    res = rd_sweep(untrained["tlic"], images, masks, rates=(0.0, 1.0), baselines=("webp",),
                   baseline_settings={"webp": (10, 90)}, progress=False)
    assert set(res["curves"]) == {"roicodec", "learned_uniform", "webp"}
    learned = res["curves"]["roicodec"]["points"]
    assert learned[0]["bpp"] <= learned[1]["bpp"]  # real files (an untrained model: mostly header)
    files = rd.write_rd_outputs(res, tmp_path / "out")
    assert json.loads(Path(files["json"]).read_text())["curves"]["webp"]["points"][0]["setting"] == 10
    # without masks the roi-quality does nothing: one learned curve
    res = rd_sweep(untrained["tlic"], images, None, rates=(0.0, 1.0), baselines=("webp",),
                   baseline_settings={"webp": (10, 90)}, progress=False)
    assert set(res["curves"]) == {"roicodec", "webp"} and res["roi_qualities"] == [0.3]
    assert set(res["bd"]) == {f"bd_{k}_{m}_vs_webp" for k in ("rate", "psnr") for m in ("roi", "psnr", "weighted")}


def test_sweep_bd_and_champion_on_a_trained_and_an_untrained_codec(trained, tmp_path):
    """The sweep, BD numbers and champion selection on the real codec, no stand-in: conftest's
    tiny sft trained 1000 steps against the same model untrained, through their checkpoint files
    and real .roic files. Measured: the trained curve spans 0.17-0.42 bpp at 18.6-18.8 dB ROI
    PSNR, BD-rate on ROI PSNR +196% against JPEG (on another CPU: 0.16-0.47 bpp, 17.9-18.5 dB,
    not monotone) (a CPU-minutes model loses to JPEG, as the
    README says); the untrained one codes every rate to the same 8 dB (ROI PSNR) image, a curve that meets
    no JPEG point: no BD number, ranked last."""
    from conftest import tiny_model as tiny_variant

    good = save_checkpoint(trained("sft"), tmp_path / "trained" / "model.pt")
    torch.manual_seed(0)
    bad = save_checkpoint(tiny_variant("sft").eval(), tmp_path / "untrained" / "model.pt")
    images, masks = write_set(tmp_path / "data", 2, (128, 128), seed=40)
    res = select_champion([bad, good], images, masks, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}",
                          progress=False, rates=(0.0, 0.5, 1.0), baselines=("jpeg",), out_dir=tmp_path / "out")
    assert res["criterion"] == "bd_rate_roi_vs_jpeg" and not res["higher_is_better"]
    assert [r["checkpoint"] for r in res["ranking"]] == [str(good), str(bad)]
    assert res["best"]["checkpoint"] == str(good) and math.isfinite(res["best"]["value"])
    sweeps = {r["checkpoint"]: json.loads(Path(r["files"]["json"]).read_text()) for r in res["ranking"]}
    ours, untrained_sweep = sweeps[str(good)], sweeps[str(bad)]

    # the trained codec: real rate steps, and BD numbers that agree with its curves and with each other
    points = ours["curves"]["roicodec"]["points"]
    assert [p["setting"] for p in points] == [0.0, 0.5, 1.0]
    assert points[0]["bpp"] < points[1]["bpp"] < points[2]["bpp"]
    assert res["best"]["value"] == ours["bd"]["bd_rate_roi_vs_jpeg"]
    jpeg = ours["curves"]["jpeg"]["points"]
    recomputed = bd_rate([p["bpp"] for p in jpeg], [p["roi_psnr"] for p in jpeg],
                         [p["bpp"] for p in points], [p["roi_psnr"] for p in points])
    assert recomputed == pytest.approx(ours["bd"]["bd_rate_roi_vs_jpeg"])
    rate, gain = ours["bd"]["bd_rate_roi_vs_jpeg"], ours["bd"]["bd_psnr_roi_vs_jpeg"]
    assert math.isfinite(rate) and math.isfinite(gain)
    psnrs = [p["roi_psnr"] for p in points]
    if psnrs == sorted(psnrs):  # a monotone curve: more bits <=> fewer dB (a bent one, as this CPU-minutes
        assert (rate > 0) == (gain < 0)  # model's can be on some CPUs, has no such guarantee)
    assert all(v is None or math.isfinite(v) for v in ours["bd"].values())
    for name in ("rd_roi_psnr.png", "bd.csv", "rd_points.csv"):
        assert any(Path(f).name == name for f in [*res["best"]["files"]["plots"], res["best"]["files"]["bd_csv"],
                                                   res["best"]["files"]["points_csv"]])

    # the untrained one: every rate the same file size and (to 0.01 dB) image: no curve to compare
    flat = untrained_sweep["curves"]["roicodec"]["points"]
    roi = [p["roi_psnr"] for p in flat]
    assert len({p["bpp"] for p in flat}) == 1 and max(roi) - min(roi) < 0.01
    assert untrained_sweep["bd"]["bd_rate_roi_vs_jpeg"] is None and res["ranking"][1]["value"] is None
