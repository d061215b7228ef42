"""Codec variants: registry, CompressAI API, exact file round trips at any image size."""

from __future__ import annotations

import pytest
import torch

from pipeline.codec.checkpoint import CheckpointError, fingerprint, load_checkpoint, save_checkpoint
from pipeline.codec.coding import decode, encode
from pipeline.codec.layers import GainUnits
from pipeline.codec.models import MODELS, build_model, pad_to_multiple

from conftest import VARIANTS, encoder_side, image_and_mask


def test_every_test_starts_from_seed_0():
    """conftest's ``seeded`` fixture: model initialisations do not depend on which tests ran before
    (torch's own start-up seed, or what an earlier test drew, would give other numbers here)."""
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(0)))


def test_registry_has_every_variant():
    assert set(VARIANTS) <= set(MODELS)
    with pytest.raises(ValueError, match="unknown codec variant"):
        build_model("nope")


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_likelihoods(untrained, variant):
    model = untrained[variant]
    x, m = image_and_mask(64, 64, seed=1)
    out = model(x, m, roi_quality=0.3, rate=0.5)
    assert out["x_hat"].shape == x.shape
    for lk in out["likelihoods"].values():
        assert torch.all(lk > 0) and torch.all(lk <= 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [(64, 64), (45, 67), (500, 741)])
def test_file_round_trip_equals_quantized_reconstruction(untrained, variant, size):
    """Decoding the file gives exactly the encoder's reconstruction from its quantized latents,
    and the training forward (eval mode: rounding around the float hyper-decoder's means) agrees
    with it but for a symbol at a rounding tie now and then."""
    model = untrained[variant]
    h, w = size
    x, m = image_and_mask(h, w, seed=h + w)
    data = encode(model, x, m, roi_quality=0.2, rate=0.7)
    decoded = decode(model, data)  # no mask: the decoder never needs it
    assert decoded.shape == x.shape
    assert torch.equal(decoded, encoder_side(model, x, m, 0.2, 0.7)["x_hat"][..., :h, :w])
    with torch.no_grad():
        ref = model(pad_to_multiple(x, 64), pad_to_multiple(m, 64), 0.2, 0.7)["x_hat"]
    assert (decoded - ref.clamp(0, 1)[..., :h, :w]).abs().mean().item() < 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_mask_changes_the_bitstream_but_uniform_quality_ignores_it(untrained, variant):
    model = untrained[variant]
    x, m = image_and_mask(64, 64, seed=2, n_objects=2)
    if variant not in ("sft", "swin"):  # their SFT blocks start as the identity: the mask path is idle untrained
        assert encode(model, x, m, 0.0, 1.0) != encode(model, x, None, 1.0, 1.0)
    assert encode(model, x, m, 1.0, 1.0) == encode(model, x, None, 1.0, 1.0)


def test_gain_units_interpolate_between_rate_points():
    gain = GainUnits(3, 4)
    y = torch.ones(1, 4, 2, 2)
    g0, g_half, g1 = (gain(y, r)[0, :, 0, 0] for r in (0.0, 0.25, 0.5))
    assert torch.allclose(g_half, (g0 * g1).sqrt())  # geometric midpoint of points 0 and 1
    assert torch.allclose(gain.inverse(gain(y, 0.8), 0.8), y, atol=1e-5)  # inverse init = 1/gain
    per_image = gain(torch.ones(2, 4, 1, 1), torch.tensor([0.0, 1.0]))
    assert not torch.allclose(per_image[0], per_image[1])
    with pytest.raises(ValueError):
        gain(y, 1.5)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_out_of_range_knobs_are_rejected(untrained, bad):
    x, m = image_and_mask(64, 64, seed=5)
    with pytest.raises(ValueError):
        encode(untrained["tlic"], x, m, roi_quality=bad)
    with pytest.raises(ValueError):
        encode(untrained["tlic"], x, m, rate=bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_round_trip_keeps_fingerprint_and_decodes(untrained, variant, tmp_path):
    model = untrained[variant]
    x, m = image_and_mask(64, 96, seed=6)
    data = encode(model, x, m, 0.3, 0.4)
    path = save_checkpoint(model, tmp_path / "ck.pt", extra={"step": 7})
    loaded = load_checkpoint(path)
    assert loaded.variant == variant and loaded.config == model.config
    assert fingerprint(loaded) == fingerprint(model)
    assert torch.equal(decode(loaded, data), decode(model, data))


def test_checkpoint_of_another_layout_is_a_clear_error(untrained, tmp_path):
    path = save_checkpoint(untrained["sft"], tmp_path / "old.pt")
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["g_a.sfts.2.gamma.weight"] = torch.zeros(8, 8, 1, 1)  # e.g. another SFT layout
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="does not fit this version's sft model.*g_a.sfts.2.gamma.weight"):
        load_checkpoint(path)
