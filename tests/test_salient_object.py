"""The learned salient-object detector (U²-Net) behind a weights path: the model, its loading, every front end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.masks import MaskError, build_mask, get_saliency_model
from pipeline.masks.salient_object import ARCHS, SalientObjectModel, U2Net


@pytest.fixture(scope="module")
def u2netp_weights(tmp_path_factory) -> Path:
    """A u2netp state dict as the authors' training script saves it (from DataParallel: ``module.`` keys)."""
    torch.manual_seed(0)
    net = U2Net(ARCHS["u2netp"])
    for m in net.modules():  # non-trivial batch-norm statistics, as trained weights have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("u2net") / "u2netp.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    return path


def test_the_architectures_have_the_authors_sizes_and_names():
    # Checked against the authors' model/u2net.py: the same keys and shapes, the same output (max diff 0).
    counts = {name: sum(p.numel() for p in U2Net(cfg).parameters()) for name, cfg in ARCHS.items()}
    assert counts == {"u2net": 44_009_869, "u2netp": 1_131_181}
    keys = set(U2Net(ARCHS["u2netp"]).state_dict())
    assert {"stage1.rebnconvin.conv_s1.weight", "stage1.rebnconv7.bn_s1.running_var", "stage1d.rebnconv6d.conv_s1.bias",
            "stage6.rebnconv4.conv_s1.weight", "side6.weight", "outconv.weight"} <= keys
    assert U2Net(ARCHS["u2netp"]).stage5.rebnconv4.conv_s1.dilation == (8, 8)  # RSU-4F: dilations, no pooling


def test_weights_load_once_and_the_map_has_the_image_size(u2netp_weights):
    model = get_saliency_model("u2netp", str(u2netp_weights))
    assert model is get_saliency_model("u2netp", str(u2netp_weights))  # one load per process
    state = torch.load(u2netp_weights, weights_only=True)
    assert all(torch.equal(model.net.state_dict()[k.removeprefix("module.")], v) for k, v in state.items())
    rgb = np.random.default_rng(0).integers(0, 256, (45, 67, 3), dtype=np.uint8)
    out = model(rgb)
    assert out.shape == (45, 67) and out.dtype == np.float32 and out.min() >= 0 and out.max() == pytest.approx(1)
    mask = build_mask(Image.fromarray(rgb), saliency=True, saliency_model="u2netp",
                      saliency_weights=str(u2netp_weights))
    np.testing.assert_array_equal(mask, out)


def test_missing_or_unfitting_weights_are_one_line_errors(tmp_path, u2netp_weights):
    with pytest.raises(MaskError, match=r"'u2net' needs its weights: --saliency-weights FILE") as e:
        get_saliency_model("u2net")
    assert "\n" not in str(e.value)
    with pytest.raises(MaskError, match="saliency weights not found"):
        get_saliency_model("u2netp", str(tmp_path / "nope.pth"))
    with pytest.raises(MaskError, match="do not fit u2net"):
        get_saliency_model("u2net", str(u2netp_weights))  # the small model's file for the full one
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(MaskError, match="cannot read saliency weights"):
        get_saliency_model("u2netp", str(bad))
    with pytest.raises(MaskError, match="takes no weights"):
        get_saliency_model("spectral_residual", str(u2netp_weights))
    assert SalientObjectModel("u2netp", "random").net.training is False  # random weights run the path


def test_roicodec_mask_with_a_learned_saliency_model(tmp_path, u2netp_weights, capsys):
    from pipeline.cli import main

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "mask.png"
    assert main(["mask", str(image), "--saliency", "--saliency-model", "u2netp", "--saliency-weights",
                 str(u2netp_weights), "-o", str(out)]) == 0
    with Image.open(out) as m:
        assert m.size == (52, 40)
    assert main(["mask", str(image), "--saliency", "--saliency-model", "u2netp", "-o", str(out)]) == 1
    assert "needs its weights" in capsys.readouterr().err


@pytest.mark.slow
def test_the_preprocessing_job_runs_it_in_an_actor_pool(tmp_path, u2netp_weights):
    from pipeline.data.preprocess import preprocess

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48 + i, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    summary = preprocess(folder, tmp_path / "shards", saliency_model="u2netp", saliency_weights=str(u2netp_weights),
                         batch_size=2)
    assert summary["rows_written"] == 4 and summary["error_rows"] == 1
    table = pq.read_table(tmp_path / "shards")
    ok = [r for r in table.to_pylist() if r["error"] is None]
    model = get_saliency_model("u2netp", str(u2netp_weights))
    for row in ok:
        with Image.open(folder / Path(row["uri"]).name) as im:
            want = model(np.asarray(im.convert("RGB")))
        with Image.open(io.BytesIO(row["saliency"])) as got:
            assert got.size == (64, want.shape[0])
            assert np.abs(np.asarray(got, np.float32) / 255 - want).max() <= 1 / 255 + 1e-6
    metadata = pq.read_schema(next((tmp_path / "shards").glob("*.parquet"))).metadata
    assert metadata[b"roicodec.saliency_weights"].decode() == str(u2netp_weights)


def test_the_service_loads_it_once_per_replica(u2netp_weights):
    from pipeline.serve.deployments import MaskModel

    settings = {"text_masks": False, "saliency_model": "u2netp", "saliency_weights": str(u2netp_weights),
                "use_gpu": False}
    replica = MaskModel.func_or_class(settings)
    rgb = np.random.default_rng(3).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    out = replica.mask(rgb, [], True)
    assert out["ok"] and out["mask"].shape == (30, 41)
    np.testing.assert_array_equal(out["mask"], get_saliency_model("u2netp", str(u2netp_weights))(rgb))
    broken = MaskModel.func_or_class({**settings, "saliency_weights": "/nowhere/u2netp.pth"})
    assert "saliency weights not found" in broken.info()["saliency_error"]
    assert broken.mask(rgb, [], True)["status"] == 503
