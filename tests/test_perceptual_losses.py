"""The perceptual second stage's losses and discriminator (pipeline.train.perceptual), on hand-made
images, a random-init VGG-16 (no weights are ever downloaded) and a toy discriminator task."""

from __future__ import annotations

import math
import socket

import lpips
import pytest
import torch
import torch.nn.functional as F
from conftest import image_and_mask, tiny_model

from pipeline.train.perceptual import (
    LPIPSDistance,
    PerceptualLoss,
    PerceptualWeightsError,
    UNetDiscriminator,
    VGGFeatures,
    discriminator_accuracy,
    discriminator_loss,
    gram_style_loss,
    laplacian_pyramid_loss,
    roi_l1,
)
from pipeline.train.perceptual.losses import VGG16_FILE, _blur


pytestmark = pytest.mark.usefixtures("one_thread_empty_hub")


@pytest.fixture(scope="module")
def vgg() -> VGGFeatures:
    torch.manual_seed(0)
    return VGGFeatures(allow_random=True)


@pytest.fixture
def no_network(monkeypatch):
    """Sockets refuse to connect; returns the list of addresses something tried."""
    tried = []

    def refuse(self, address, *args, **kwargs):
        tried.append(address)
        raise ConnectionRefusedError(f"test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return tried


def smooth_images(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Smooth colour fields in [0,1] (bicubic from a 5x5 grid)."""
    return F.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=(size, size), mode="bicubic",
                         align_corners=True).clamp(0, 1)


def texture(period: float, angle: float, colour: tuple[float, float, float], g: torch.Generator,
            size: int = 64) -> torch.Tensor:
    """A stationary texture: oriented stripes plus white noise, tinted."""
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    u = xx * math.cos(angle) + yy * math.sin(angle)
    base = 0.5 + 0.3 * torch.sin(2 * math.pi * u / period) + 0.1 * torch.randn(size, size, generator=g)
    return (base * torch.tensor(colour).view(3, 1, 1)).clamp(0, 1)[None]


def shuffle_patches(x: torch.Tensor, g: torch.Generator, p: int = 16) -> torch.Tensor:
    """x with its p x p patches in a random order."""
    b, c, h, w = x.shape
    n = h // p
    t = x.reshape(b, c, n, p, n, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, n * n, p, p)
    t = t[:, :, torch.randperm(n * n, generator=g)]
    return t.reshape(b, c, n, n, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


# -- Laplacian pyramid, Gram, ROI L1 -------------------------------------------------------
def test_laplacian_loss_grows_with_noise_and_ignores_brightness():
    g = torch.Generator().manual_seed(1)
    x = smooth_images(2, 64, g)
    noise = torch.randn(x.shape, generator=g)
    assert float(laplacian_pyramid_loss(x, x)) == 0.0
    losses = [float(laplacian_pyramid_loss(x + a * noise, x)) for a in (0.01, 0.02, 0.05, 0.1, 0.2)]
    assert all(a < b for a, b in zip(losses, losses[1:])), losses
    shift = 0.1  # the same MSE (0.01) as unit noise at 0.1
    noisy = x + shift * noise / noise.pow(2).mean().sqrt()
    shifted = x + shift
    assert torch.allclose((shifted - x).pow(2).mean(), (noisy - x).pow(2).mean())
    assert float(laplacian_pyramid_loss(shifted, x)) < 0.1 * float(laplacian_pyramid_loss(noisy, x))


def test_gram_style_loss_ignores_patch_order(vgg):
    g = torch.Generator().manual_seed(2)
    a = texture(6, 0.5, (1.0, 0.7, 0.4), g)
    other = texture(11, 2.0, (0.4, 0.8, 1.0), g)
    shuffled = shuffle_patches(a, g)
    assert float((shuffled - a).abs().mean()) > 0.05  # the shuffle moved content
    with torch.no_grad():
        fa, fs, fo = vgg(a), vgg(shuffled), vgg(other)
    assert float(gram_style_loss(fa, fa)) == 0.0
    assert float(gram_style_loss(fs, fa)) < 0.02 * float(gram_style_loss(fo, fa))
    # the features themselves do change: the invariance is the Gram matrices'
    feature_mse = [sum(float(F.mse_loss(p, q)) for p, q in zip(f, fa)) for f in (fs, fo)]
    assert feature_mse[0] > 0.2 * feature_mse[1]


def test_roi_l1_splits_by_the_mask():
    x = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., :, :8] = 1.0  # a quarter of the image
    in_roi = x + 0.1 * mask
    roi, nonroi = roi_l1(in_roi, x, mask)
    assert float(nonroi) == 0.0
    assert float(roi) == pytest.approx(0.1, rel=1e-5)  # normalised by the ROI's area, not the image's
    roi, nonroi = roi_l1(x + 0.2 * (1 - mask), x, mask)
    assert float(roi) == 0.0 and float(nonroi) == pytest.approx(0.2, rel=1e-5)
    roi, nonroi = roi_l1(x + 0.1, x, torch.zeros_like(mask))  # no ROI: the ROI term is 0
    assert float(roi) == 0.0 and float(nonroi) == pytest.approx(0.1, rel=1e-5)


# -- VGG weights ---------------------------------------------------------------------------
def test_missing_vgg_weights_name_the_options_without_network(no_network, tmp_path):
    for make in (VGGFeatures, lambda: PerceptualLoss(vgg=True), lambda: VGGFeatures(tmp_path / "none.pth")):
        with pytest.raises(PerceptualWeightsError) as info:
            make()
        message = str(info.value)
        assert "--vgg-weights" in message and "--no-vgg-losses" in message and "\n" not in message
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(PerceptualWeightsError, match="cannot read VGG-16 weights"):
        VGGFeatures(tmp_path / "junk.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(PerceptualWeightsError, match="do not fit"):
        VGGFeatures(tmp_path / "wrong.pth")
    PerceptualLoss(vgg=False)  # needs no weights
    assert no_network == []


def test_vgg_weights_load_from_a_file_and_the_cache(vgg, tmp_path, one_thread_empty_hub, no_network):
    state = {f"features.{k}": v for k, v in vgg.layers.state_dict().items()}
    state["classifier.0.bias"] = torch.zeros(4)  # torchvision's file has the classifier too
    torch.save(state, tmp_path / "vgg16.pth")
    x = torch.rand(1, 3, 32, 32)
    expected = vgg(x)
    cache = one_thread_empty_hub / "checkpoints" / VGG16_FILE
    cache.parent.mkdir()
    (tmp_path / "vgg16.pth").rename(cache)
    try:
        for loaded in (VGGFeatures(cache), VGGFeatures()):
            assert all(torch.equal(a, b) for a, b in zip(loaded(x), expected))
            assert not any(p.requires_grad for p in loaded.parameters())
    finally:
        cache.unlink()
    assert no_network == []


# -- LPIPS and the whole loss --------------------------------------------------------------
def test_lpips_matches_the_lpips_package(vgg):
    distance = LPIPSDistance(vgg)
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    reference.net.load_state_dict({k: vgg.layers.state_dict()[k.split(".", 1)[1]]
                                   for k in reference.net.state_dict()})
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = distance(a, b), reference(a, b, normalize=True).flatten()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    assert float(distance(a, a).abs().max()) < 1e-6


def codec_like_output(x: torch.Tensor, noise: float, latent_ch: int = 8) -> dict:
    """A stand-in codec output: x_hat = x + noise, likelihoods, a latent on the 16x grid."""
    g = torch.Generator().manual_seed(3)
    x_hat = (x + noise * torch.randn(x.shape, generator=g)).requires_grad_(True)
    b, _, h, w = x.shape
    return {"x_hat": x_hat, "likelihoods": {"y": torch.full((b, latent_ch, h // 16, w // 16), 0.5)},
            "y_hat": torch.randn(b, latent_ch, h // 16, w // 16, generator=g)}


def test_perceptual_loss_without_vgg_is_finite_and_differentiable():
    x, mask = image_and_mask(32, 32, seed=4)
    out = codec_like_output(x, 0.05)
    disc = UNetDiscriminator(latent_ch=8, base=8)
    terms = PerceptualLoss(vgg=False)(out, x, mask, disc=disc, rate_scale=torch.tensor([2.0]))
    assert set(terms) == {"mse", "l1_roi", "l1_nonroi", "lap", "adv", "bpp", "loss"}
    values = {k: float(v.detach()) for k, v in terms.items()}
    assert all(math.isfinite(v) for v in values.values())
    assert values["bpp"] == pytest.approx(8 * 4 / (32 * 32))  # 1 bit per latent element
    assert all(values[k] > 0 for k in ("mse", "l1_roi", "l1_nonroi", "lap", "adv"))
    terms["loss"].backward()
    grad = out["x_hat"].grad
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def test_perceptual_loss_vgg_terms(vgg):
    loss = PerceptualLoss(vgg=False)
    loss.lpips = LPIPSDistance(vgg)  # the shared random-init trunk (PerceptualLoss(allow_random=True) builds its own)
    x = smooth_images(1, 32, torch.Generator().manual_seed(5))
    same, noisy = (loss(codec_like_output(x, n), x) for n in (0.0, 0.1))
    assert float(same["lpips"]) < 1e-6 and float(same["style"]) == 0.0
    assert float(noisy["lpips"]) > 1e-3 and float(noisy["style"]) > 0
    assert float(noisy["loss"]) > float(same["loss"])


def test_codec_forward_gives_the_discriminator_its_latent():
    model = tiny_model("tlic")
    x, mask = image_and_mask(64, 64, seed=6)
    out = model(x, mask, 0.5, 1.0)
    assert out["y_hat"].shape == (1, model.M, 4, 4)
    disc = UNetDiscriminator(latent_ch=model.M, base=8)
    PerceptualLoss(vgg=False)(out, x, mask, disc=disc)["loss"].backward()
    assert next(model.g_a.parameters()).grad is not None


# -- the discriminator ---------------------------------------------------------------------
class _Fixed(torch.nn.Module):
    """A stand-in discriminator: global logit +1 for images whose mean is above 0.5."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, y_hat, x):
        g = self.sign * (x.mean(dim=(1, 2, 3)) - 0.5)[:, None]
        return g, g[:, :, None, None].expand(-1, 1, *x.shape[-2:])


def test_discriminator_accuracy_counts_both_classes():
    real, fake, y = torch.full((4, 3, 16, 16), 0.9), torch.full((4, 3, 16, 16), 0.1), torch.zeros(4, 1, 1, 1)
    assert discriminator_accuracy(_Fixed(1.0), y, fake, real) == 1.0
    assert discriminator_accuracy(_Fixed(-1.0), y, fake, real) == 0.0
    assert discriminator_accuracy(_Fixed(1.0), y, real, real) == 0.5


def test_discriminator_learns_decoded_from_real():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    proj = torch.randn(8, 3, 1, 1, generator=g)

    def latent(x):  # the condition: a fixed projection of 16x16 block means, as from an encoder
        return F.conv2d(F.avg_pool2d(x, 16), proj)

    def decoded(x):  # an imitation of a decoded image: blurred, noisy
        return (_blur(_blur(x)) + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)

    disc = UNetDiscriminator(latent_ch=8, base=8)
    held_out = smooth_images(64, 32, g)
    held = (latent(held_out), decoded(held_out), held_out)
    monitor = smooth_images(64, 32, g)
    watch = (latent(monitor), decoded(monitor), monitor)
    assert 0.3 <= discriminator_accuracy(disc, *held) <= 0.7
    opt = torch.optim.Adam(disc.parameters(), lr=5e-4, betas=(0.5, 0.999))
    for step in range(150):
        x = smooth_images(16, 32, g)
        loss = discriminator_loss(disc, latent(x), decoded(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 4 and discriminator_accuracy(disc, *watch) >= 0.97:
            break
    assert discriminator_accuracy(disc, *held) >= 0.9, f"after {step + 1} steps"
