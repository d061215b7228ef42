"""The default model: what runs where no checkpoint is given (``roicodec compress/decompress/
evaluate``, ``--init default``, the service's settings), and the one-line error when none is
installed. The installed file is replaced here by ``$ROICODEC_DEFAULT_CHECKPOINT``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.codec import default_model
from pipeline.codec.checkpoint import CheckpointError, fingerprint, save_checkpoint
from pipeline.codec.default_model import ENV, TRAIN_COMMAND, checkpoint_path, default_checkpoint
from pipeline.codec.warm_start import InitError, load_init_source
from pipeline.serve.settings import ServeSettings

from conftest import image_and_mask, tiny_model
from test_cli import assert_one_line_error, roicodec_in_process


@pytest.fixture(scope="module")
def folder(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("default")
    save_checkpoint(trained("sft"), root / "default.pt")
    torch.manual_seed(7)
    other = tiny_model("sft").eval()
    other.update(force=True)
    save_checkpoint(other, root / "other.pt")
    x, _ = image_and_mask(64, 80, seed=21)
    (root / "images").mkdir()
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / "images" / "a.png")
    return root


@pytest.fixture
def installed(folder, monkeypatch):
    monkeypatch.setenv(ENV, str(folder / "default.pt"))
    return folder


@pytest.fixture
def none_installed(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(default_model, "DEFAULT_FILE", "no-such-model.pt")


def test_commands_without_a_checkpoint_use_the_default(installed, capsys, trained):
    image, roic, out = installed / "images" / "a.png", installed / "a.roic", installed / "out.png"
    res = roicodec_in_process(capsys, "compress", image, "-o", roic, "--roi-quality", "1")
    assert res.returncode == 0, res.stderr
    assert roicodec_in_process(capsys, "decompress", roic, "-o", out).returncode == 0
    assert Image.open(out).size == (80, 64)
    explicit = installed / "explicit.roic"
    assert roicodec_in_process(capsys, "compress", image, "-o", explicit, "--roi-quality", "1",
                               "--checkpoint", "default").returncode == 0
    assert explicit.read_bytes() == roic.read_bytes()
    assert roic.read_bytes()[:64].find(fingerprint(trained("sft"))) > 0  # the file names the default model

    # a file made with another model says which checkpoint it needs, in one line
    other = installed / "other.roic"
    assert roicodec_in_process(capsys, "compress", image, "-o", other, "--checkpoint",
                               installed / "other.pt").returncode == 0
    assert_one_line_error(roicodec_in_process(capsys, "decompress", other, "-o", out), "fingerprint")

    res = roicodec_in_process(capsys, "evaluate", "--images", installed / "images", "--json",
                              installed / "eval.json", "--no-mlflow", "--no-progress", "--baselines", "jpeg")
    assert res.returncode == 0, res.stderr
    assert json.loads((installed / "eval.json").read_text())["checkpoint"] == str(installed / "default.pt")


def test_init_default_and_the_service_take_the_default(installed, trained):
    source = load_init_source("default")
    assert source.path == installed / "default.pt" and source.kind == "roicodec" and source.variant == "sft"
    assert checkpoint_path(None) == checkpoint_path("default") == installed / "default.pt"
    assert checkpoint_path("x.pt").name == "x.pt"
    settings = ServeSettings.from_args({})  # no checkpoint, no model URI: loaded and checked here
    assert settings.checkpoint is None and settings.model_uri is None
    with pytest.raises(ValueError, match="give one of"):
        ServeSettings.from_args({"checkpoint": "a.pt", "model_uri": "models:/x@champion"})


def test_no_default_installed_is_one_line_saying_what_to_do(none_installed, folder, capsys, monkeypatch):
    with pytest.raises(CheckpointError, match="no default model is installed") as info:
        default_checkpoint()
    assert TRAIN_COMMAND in str(info.value) and "--checkpoint" in str(info.value)
    assert_one_line_error(roicodec_in_process(capsys, "compress", folder / "images" / "a.png", "-o",
                                              folder / "x.roic"), "no default model is installed")
    assert not (folder / "x.roic").exists()
    with pytest.raises(InitError, match="no default model is installed"):
        load_init_source("default")
    with pytest.raises(CheckpointError, match="no default model is installed"):
        ServeSettings.from_args({})
    monkeypatch.setenv(ENV, str(folder / "missing.pt"))
    with pytest.raises(CheckpointError, match=f"\\${ENV} names .*missing.pt, which is not a file"):
        default_checkpoint()


def test_the_benchmark_reports_every_target_of_the_installed_model(installed, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "default_model.py"
    spec = importlib.util.spec_from_file_location("default_model_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = installed / "bench"
    assert bench.main(["--images", str(installed / "images"), "--rates", "0", "1", "--repeats", "1",
                       "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == str(installed / "default.pt") and result["n_images"] == 1
    assert result["curves"]["roicodec"] and result["curves"]["learned_uniform"] and result["curves"]["webp"]
    numbers = [result[f"{kind}_vs_{anchor}"] for kind in ("uniform_bd_rate_psnr", "roi_bd_rate_roi_psnr")
               for anchor in ("jpeg", "webp", "jpeg2000")]
    assert all(n is None or isinstance(n, float) for n in numbers)  # None: the curves do not overlap
    u, r = result["uniform_bd_rate_psnr_vs_jpeg"], result["roi_bd_rate_roi_psnr_vs_webp"]
    assert isinstance(u, float) and isinstance(r, float)
    assert result["met"]["uniform_vs_jpeg"] == (u <= -10)
    assert result["met"]["roi_vs_webp"] == (r <= 0)
    decode = result["decode"]
    assert decode["roicodec_s"] > 0 and decode["mean_scale_hyperprior_s"] > 0
    assert decode["ratio"] == pytest.approx(decode["roicodec_s"] / decode["mean_scale_hyperprior_s"])
    assert result["met"]["decode_time"] == (decode["ratio"] <= result["decode_ratio_limit"])
    assert json.loads((out / "default_model.json").read_text())["met"] == result["met"]
    assert all(Path(p).is_file() for p in result["plots"])
