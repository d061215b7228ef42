"""The perceptual stage in training (issue 32): ``stage="perceptual"`` warm-started from an MSE
run's checkpoint, through Ray Train with two DDP workers, a worker killed midway, and the
discriminator resumed next to the codec. Tiny tlic (N=16/M=24), 64 px crops, without the VGG
losses (no VGG-16 weights on this machine)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.codec.checkpoint import load_checkpoint
from pipeline.codec.models import build_model
from pipeline.train.perceptual import UNetDiscriminator, discriminator_accuracy, discriminator_loss
from pipeline.train.perceptual.stage import DISC_FILE, discriminator_step, perceptual_weights
from pipeline.train.trainer import TrainConfig, TrainError, train, write_smoke_shards

TINY = {"N": 16, "M": 24, "n_rates": 2}


def _config(shards: Path, storage: Path, run_name: str, **kw) -> TrainConfig:
    base = dict(shards=str(shards), variant="tlic", model=dict(TINY), steps=2, batch_size=2, crop=64, val_crop=64,
                val_fraction=0.2, max_val_samples=2, val_encode_images=1, val_points=[[1.0, 1.0], [0.0, 0.0]],
                lr=2e-3, checkpoint_every=2, report_every=1, keep=2, num_workers=1, cpus_per_worker=1.0,
                max_failures=1, run_name=run_name, storage_path=str(storage), torch_threads=1)
    base.update(kw)
    return TrainConfig(**base)


# -- no Ray -----------------------------------------------------------------------------------------

def test_the_discriminator_step_is_the_discriminator_loss_in_one_forward():
    disc = UNetDiscriminator(latent_ch=8, base=8, depth=2)
    y_hat, x_hat, x = torch.randn(2, 8, 4, 4), torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    disc.eval()  # no spectral-norm power iteration: the same weights for every forward below
    loss, acc = float(discriminator_loss(disc, y_hat, x_hat, x)), discriminator_accuracy(disc, y_hat, x_hat, x)
    before = [p.detach().clone() for p in disc.parameters()]
    got = discriminator_step(disc, torch.optim.SGD(disc.parameters(), lr=0.1), y_hat, x_hat, x)
    assert got["disc_loss"] == pytest.approx(loss, rel=1e-5)
    assert got["disc_accuracy"] == pytest.approx(acc)
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))  # it stepped


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_the_warm_up_trains_the_discriminator_alone_and_resumes_where_it_was(tmp_path):
    """``disc_warmup`` steps from the stage's first step leave the codec as it was and step the
    discriminator; the step after them trains both; a stage rebuilt from the saved
    ``discriminator.pt`` keeps counting from the same first step."""
    import random

    from pipeline.train.perceptual.stage import PerceptualStage
    from pipeline.train.steps import StepSettings

    torch.manual_seed(0)
    codec = build_model("tlic", **TINY).train()
    config = {"vgg_losses": False, "disc_warmup": 2, "disc_width": 8}
    stage = PerceptualStage(config, codec.M, torch.device("cpu"))
    opt = torch.optim.Adam([p for n, p in codec.named_parameters() if not n.endswith("quantiles")], lr=1e-3)
    aux = torch.optim.Adam([p for n, p in codec.named_parameters() if n.endswith("quantiles")], lr=1e-3)
    settings, rng = StepSettings(n_rates=2), random.Random(0)
    x, mask = torch.rand(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()

    def step(s: int) -> tuple[bool, bool, dict[str, float]]:
        codec_before, disc_before = _snapshot(codec), _snapshot(stage.disc)
        metrics = stage.step(codec, x, mask, opt, aux, settings, rng, step=s)
        return _changed(codec_before, codec), _changed(disc_before, stage.disc), metrics

    for s in (10, 11):  # a stage resumed from an MSE checkpoint at step 10: the warm-up is 10 and 11
        codec_moved, disc_moved, metrics = step(s)
        assert not codec_moved and disc_moved and "loss" not in metrics and 0 <= metrics["disc_accuracy"] <= 1
    codec_moved, disc_moved, metrics = step(12)
    assert codec_moved and disc_moved and math.isfinite(metrics["adv"])

    fresh = PerceptualStage(config, codec.M, torch.device("cpu"))
    assert fresh.warming_up(12)  # a new stage starting at 12 warms up first
    stage.save(tmp_path / DISC_FILE, 11)
    resumed = PerceptualStage(config, codec.M, torch.device("cpu"), torch.load(tmp_path / DISC_FILE, weights_only=True))
    assert resumed.warming_up(11) and not resumed.warming_up(12)


def test_loss_weights_are_checked():
    assert perceptual_weights({"adv": 0.0}).adv == 0.0 and perceptual_weights(None).mse == 150.0
    with pytest.raises(ValueError, match="unknown perceptual loss weight 'gan'"):
        perceptual_weights({"gan": 1.0})
    with pytest.raises(ValueError, match="lap must be >= 0"):
        perceptual_weights({"lap": -1.0})


def test_missing_vgg_weights_are_one_line_before_ray_starts(tmp_path):
    shards = write_smoke_shards(tmp_path / "shards", n_images=4, size=64, error_rows=0)
    cfg = _config(shards, tmp_path / "runs", "vgg", stage="perceptual", vgg_weights=str(tmp_path / "vgg16.pth"))
    with pytest.raises(TrainError, match="--vgg-weights FILE .* or train with --no-vgg-losses"):
        train(cfg)
    with pytest.raises(TrainError, match="stage must be one of mse, perceptual"):
        _config(shards, tmp_path, "x", stage="gan").resolved()
    assert not (tmp_path / "runs" / "vgg").exists()


# -- through Ray Train --------------------------------------------------------------------------

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
def runs(ray_local, tmp_path_factory):
    """An MSE run of 2 steps, then a perceptual stage of 4 steps on two workers started from its
    checkpoint folder, whose rank 0 dies once before step 4 (checkpoint at 2)."""
    root = tmp_path_factory.mktemp("perceptual")
    shards = write_smoke_shards(root / "shards", n_images=10, size=80, error_rows=1)
    storage = root / "runs"
    mse = train(_config(shards, storage, "mse"))
    marker = storage / "failed-once"
    perceptual = train(_config(shards, storage, "perceptual", stage="perceptual", vgg_losses=False,
                               init=mse.checkpoint, steps=4, num_workers=2, fail_at_step=3,
                               fail_marker=str(marker)))
    return storage, mse, perceptual


def _adam_steps(optimizer_state: dict) -> set[int]:
    return {int(s["step"]) for s in optimizer_state["state"].values()}


@pytest.mark.slow
def test_perceptual_stage_starts_from_the_mse_checkpoint_and_resumes_both_networks(runs):
    from mlflow import MlflowClient

    storage, mse, out = runs
    assert (storage / "failed-once").exists()  # rank 0 died once
    assert out.metrics["step"] == 4 and out.metrics["start_step"] == 2 and out.metrics["world_size"] == 2
    assert out.metrics["disc_start_step"] == 2  # the restarted workers loaded the step-2 discriminator
    final, first = Path(out.checkpoint), storage / "perceptual" / "checkpoint_00000002"
    saved = torch.load(final / DISC_FILE, weights_only=True)
    assert saved["step"] == 4 and saved["shape"] == {"latent_ch": 24, "base": 32, "depth": 4}
    # Adam's step counters: 2 steps before the failure + 2 after, for both networks; a
    # discriminator restarted fresh would count 2
    assert _adam_steps(saved["optimizer"]) == {4}
    assert _adam_steps(torch.load(final / "train_state.pt", weights_only=True)["optimizer"]) == {4}
    earlier = torch.load(first / DISC_FILE, weights_only=True)
    assert _adam_steps(earlier["optimizer"]) == {2}
    assert any(not torch.equal(earlier["state_dict"][k], v) for k, v in saved["state_dict"].items())
    disc = UNetDiscriminator(latent_ch=24)
    disc.load_state_dict(saved["state_dict"])  # a whole discriminator of the saved shape

    # the codec is an ordinary checkpoint, warm-started from the MSE run's weights
    codec = load_checkpoint(final / "model.pt")
    assert codec.variant == "tlic" and (codec.N, codec.M) == (16, 24)
    assert not (Path(mse.checkpoint) / DISC_FILE).exists()
    c = MlflowClient(tracking_uri=out.mlflow_uri)
    run = c.get_run(out.mlflow_run_id)
    assert run.data.params["stage"] == "perceptual" and run.data.params["vgg_losses"] == "False"
    assert "tlic checkpoint" in run.data.tags["init_source"] and run.data.tags["init_fresh_layers"] == "none"
    for term in ("mse", "l1_roi", "l1_nonroi", "lap", "adv", "bpp", "disc_loss", "disc_accuracy"):
        values = [m.value for m in c.get_metric_history(out.mlflow_run_id, f"train/{term}")]
        assert {m.step for m in c.get_metric_history(out.mlflow_run_id, f"train/{term}")} == {1, 2, 3, 4}, term
        assert all(math.isfinite(v) for v in values), term
    assert not c.get_metric_history(out.mlflow_run_id, "train/lpips")  # --no-vgg-losses
    assert all(0 <= m.value <= 1 for m in c.get_metric_history(out.mlflow_run_id, "train/disc_accuracy"))
    assert c.search_model_versions("name = 'roicodec-tlic-perceptual'")


def test_a_context_checkpoint_warm_starts_with_its_own_parts(tmp_path):
    """``--init`` of one of our checkpoints builds the model it holds (here a context model), not
    the command line's default entropy model."""
    from pipeline.codec.checkpoint import save_checkpoint
    from pipeline.codec.warm_start import warm_started

    torch.manual_seed(0)
    model = build_model("tlic", **TINY, entropy="context")
    model.update(force=True)
    (tmp_path / "ckpt").mkdir()
    save_checkpoint(model, tmp_path / "ckpt" / "model.pt")
    started, report = warm_started("tlic", str(tmp_path / "ckpt"), [0.01, 0.05])
    assert started.entropy == "context" and report.fresh == []
    assert all(torch.equal(a, b) for a, b in zip(started.parameters(), model.parameters()))
