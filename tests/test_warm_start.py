"""Warm start from CompressAI's pretrained mean-scale hyperprior (issue 20).

The "pretrained" model is a CompressAI ``MeanScaleHyperprior`` (N=32, M=48) trained here
for 200 steps on generated photo-like crops, enough for realistic latent statistics
(about 0.4 bpp on a 512 px image), saved the way CompressAI users save one.
"""

from __future__ import annotations

import math

import pytest
import torch
from compressai.losses import RateDistortionLoss
from compressai.models import MeanScaleHyperprior, ScaleHyperprior

from pipeline.cli import main as cli_main
from pipeline.codec.checkpoint import load_checkpoint, save_checkpoint
from pipeline.codec.coding import decode, encode
from pipeline.codec.models import build_model
from pipeline.codec.warm_start import (ZOO_LAMBDAS, InitError, load_init_source, nearest_rate_point, rate_of_point,
                                       warm_start, zoo_weights_path)
from pipeline.eval.metrics import psnr
from pipeline.train.loss import rate_lambdas
from tests.conftest import image_and_mask

N, M = 32, 48
TRAINED_LAMBDA = 0.013
LAMBDAS = rate_lambdas(3, 0.0035, 0.0483)  # the middle point is 0.0130


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(model in eval mode with its tables, path of its saved state dict)."""
    torch.manual_seed(0)
    net = MeanScaleHyperprior(N, M)
    images = torch.cat([image_and_mask(128, 128, s)[0] for s in range(8)])
    main = [p for n, p in net.named_parameters() if not n.endswith("quantiles")]
    aux = [p for n, p in net.named_parameters() if n.endswith("quantiles")]
    opt, aux_opt = torch.optim.Adam(main, lr=1e-3), torch.optim.Adam(aux, lr=1e-2)
    criterion = RateDistortionLoss(lmbda=TRAINED_LAMBDA)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, 8, (8,), generator=g)
        top, left = torch.randint(0, 65, (2,), generator=g).tolist()
        x = images[idx][:, :, top:top + 64, left:left + 64]
        opt.zero_grad()
        aux_opt.zero_grad()
        criterion(net(x), x)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(main, 1.0)
        opt.step()
        net.aux_loss().backward()
        aux_opt.step()
    path = tmp_path_factory.mktemp("pretrained") / "msh.pth.tar"
    torch.save(net.state_dict(), path)
    net.eval().update()
    return net, path


@pytest.fixture(scope="module")
def photo():
    return image_and_mask(512, 512, 99)


def _warm(variant: str, path, **config):
    model = build_model(variant, N=N, M=M, n_rates=3, **config)
    report = warm_start(model, load_init_source(str(path)), LAMBDAS, TRAINED_LAMBDA)
    return model.eval(), report


@pytest.mark.parametrize("variant", ["tlic", "sft", "tma"])
def test_warm_start_reproduces_the_pretrained_model(pretrained, photo, variant):
    net, path = pretrained
    x, m = photo
    model, report = _warm(variant, path)
    assert report.rate_point == 1
    rate = rate_of_point(model, report.rate_point)
    with torch.no_grad():
        reference = net(x)
        ours = model(x, m, 1.0, rate)  # a mask, at uniform quality
        other_rate = model(x, m, 1.0, 0.0)
    assert (ours["x_hat"] - reference["x_hat"]).abs().max() < 1e-5
    assert (other_rate["x_hat"] - reference["x_hat"]).abs().max() > 1e-3  # the check can fail
    with torch.no_grad():
        own = net.compress(x)
        own_decoded = net.decompress(own["strings"], own["shape"])["x_hat"].clamp(0, 1)
    own_bytes = sum(len(s[0]) for s in own["strings"])
    model.update(force=True)
    data = encode(model, x, m, 1.0, rate)
    assert own_bytes * 8 / x[0, 0].numel() > 0.2  # realistic statistics: not a file of zeros
    assert len(data) <= 1.02 * own_bytes
    assert psnr(decode(model, data), own_decoded) > 45


@pytest.mark.parametrize("beta_mode", ["element", "channel"])
def test_ggm_starts_as_the_gaussian_it_was_trained_with(pretrained, photo, beta_mode):
    net, path = pretrained
    x, _ = photo
    model, report = _warm("ggm", path, beta_mode=beta_mode)
    assert report.adapted  # the hyper-decoder's outputs (and the channel shapes) were adapted
    rate = rate_of_point(model, report.rate_point)
    with torch.no_grad():
        reference, ours = net(x), model(x, None, 1.0, rate)
        assert (ours["x_hat"] - reference["x_hat"]).abs().max() < 1e-5
        bits = [-out["likelihoods"]["y"].log2().sum() for out in (ours, reference)]
        assert math.isclose(bits[0], bits[1], rel_tol=1e-3)
        latent = model.latent_codec
        z_hat, _ = latent.entropy_bottleneck(latent.h_a(model.encode_latent(x, None, 1.0, rate)))
        scales, _, extra = latent.family.split(latent.h_s(z_hat))
        betas = latent.family._betas(extra, 0, None, scales)
    assert torch.allclose(betas, torch.full_like(betas, 2.0), atol=1e-5)


def test_gain_units_are_the_identity_at_the_trained_lambda(pretrained):
    _, path = pretrained
    lambdas = rate_lambdas(4, 0.0035, 0.0483)
    model = build_model("tma", N=N, M=M, n_rates=4)
    report = warm_start(model, load_init_source(str(path)), lambdas, ZOO_LAMBDAS[3])
    assert report.rate_point == nearest_rate_point(lambdas, 0.0067) == 1
    gains = model.gain.gain.detach()
    expected = torch.tensor([math.sqrt(v / lambdas[1]) for v in lambdas])
    assert torch.allclose(gains[:, 0], expected) and bool((gains == gains[:, :1]).all())
    assert torch.allclose(model.gain.inverse_gain.detach() * gains, torch.ones_like(gains))
    assert report.fresh == ["g_a.attention"] and report.adapted == {"g_a.net.0.weight": "mask input channel at zero"}
    default = warm_start(build_model("tlic", N=N, M=M, n_rates=4), load_init_source(str(path)), lambdas)
    assert default.rate_point == 2  # a file of unknown lambda: the middle rate point


def test_weights_that_do_not_fit_name_the_first_mismatched_tensor(pretrained, tmp_path):
    _, path = pretrained
    small = build_model("tlic", N=16, M=24, n_rates=2)
    with pytest.raises(InitError, match=r"does not fit tlic \(N=16, M=24\): entropy_bottleneck\.quantiles has "
                                        r"shape \(32, 1, 3\) .*needs \(16, 1, 3\) \(the weights are N=32, M=48\)"):
        warm_start(small, load_init_source(str(path)), [0.01, 0.02])
    other = tmp_path / "scale_hyperprior.pth"
    torch.save(ScaleHyperprior(N, M).state_dict(), other)
    with pytest.raises(InitError, match=r"h_s\.0\.weight has shape \(32, 32, 5, 5\), expected \(32, 48, 5, 5\)"):
        load_init_source(str(other))
    ours = tmp_path / "tma.pt"
    save_checkpoint(build_model("tma", N=N, M=M, n_rates=3), ours)
    with pytest.raises(InitError, match="is a tma checkpoint; .* same variant"):
        warm_start(build_model("tlic", N=N, M=M, n_rates=3), load_init_source(str(ours)), LAMBDAS)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(InitError, match="not a readable state dict"):
        load_init_source(str(garbage))
    with pytest.raises(InitError, match="init weights not found"):
        load_init_source(str(tmp_path / "missing.pth"))


def test_zoo_weights_come_from_the_torch_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected, url = zoo_weights_path(3)
    assert expected.parent == tmp_path / "hub" / "checkpoints" and url.endswith(expected.name)
    with pytest.raises(InitError, match=f"not in the torch hub cache, expected {expected} .*fetch {url}"):
        load_init_source("compressai:mbt2018-mean:3")
    expected.parent.mkdir(parents=True)
    torch.save(MeanScaleHyperprior(N, M).state_dict(), expected)  # not the published file
    with pytest.raises(InitError, match="damaged: its SHA-256 does not start with"):
        load_init_source("compressai:mbt2018-mean:3")
    for bad, why in (("compressai:mbt2018-mean:9", "qualities are 1-8"),
                     ("compressai:bmshj2018-hyperprior:3", "only CompressAI's mbt2018-mean"),
                     ("compressai:mbt2018-mean", "named compressai:mbt2018-mean:QUALITY")):
        with pytest.raises(InitError, match=why):
            load_init_source(bad)


def test_our_checkpoint_warm_starts_the_same_variant(tmp_path):
    torch.manual_seed(1)
    trained = build_model("sft", N=16, M=24, n_rates=2)
    path = save_checkpoint(trained, tmp_path / "sft.pt")
    fresh = build_model("sft", N=16, M=24, n_rates=2)
    report = warm_start(fresh, load_init_source(str(path)))
    assert not report.fresh and report.rate_point is None
    for (name, a), b in zip(trained.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_warm_start_command_writes_a_checkpoint_like_any_other(pretrained, tmp_path, capsys, monkeypatch):
    _, path = pretrained
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "warm.pt"
    assert cli_main(["warm-start", str(path), str(out), "--variant", "tlic", "--n-rates", "3",
                     "--init-lambda", str(TRAINED_LAMBDA)]) == 0
    printed = capsys.readouterr().out
    assert "gain units: identity at rate point 1" in printed and "--rate 0.5 codes as the weights did" in printed
    model = load_checkpoint(out)
    assert model.variant == "tlic" and (model.N, model.M) == (N, M)

    from PIL import Image

    x, _ = image_and_mask(128, 128, 5)
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(tmp_path / "in.png")
    assert cli_main(["compress", str(tmp_path / "in.png"), "--checkpoint", str(out), "-o",
                     str(tmp_path / "a.roic"), "--rate", "0.5", "--roi-quality", "1"]) == 0
    assert cli_main(["decompress", str(tmp_path / "a.roic"), "--checkpoint", str(out), "-o",
                     str(tmp_path / "a.png")]) == 0
    assert Image.open(tmp_path / "a.png").size == (128, 128)

    capsys.readouterr()
    assert cli_main(["warm-start", "compressai:mbt2018-mean:4", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("roicodec: error: compressai:mbt2018-mean:4: pretrained weights not in the torch hub")
    assert len(err.splitlines()) == 1
