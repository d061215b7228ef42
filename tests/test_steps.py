"""Spatial quantisation steps: the background's latents coded with the step Q sets, the ROI's
with step 1; the ROI cell map travels in the file and decodes everywhere the same."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch

from pipeline.codec.bitstream import RoicHeader, pack, unpack
from pipeline.codec.coding import decode, encode
from pipeline.codec.steps import (STEP_ONE, QuantSteps, background_quarters, pack_cells, roi_cells, step_map,
                                  unpack_cells)
from pipeline.eval.metrics import roi_psnr

from conftest import VARIANTS, coding_sized, encoder_side, image_and_mask, tiny_model


def test_background_step_is_one_over_q_in_quarters():
    assert background_quarters(torch.tensor([1.0, 0.9, 0.5, 0.3, 0.1, 0.0])).tolist() == [4, 4, 8, 13, 40, 64]
    assert background_quarters(0.1).tolist() == [40]


def test_a_cell_is_roi_when_any_of_its_pixels_is():
    mask = torch.zeros(1, 1, 64, 48)
    mask[0, 0, 20, 33] = 0.6  # one pixel, in cell (1, 2)
    mask[0, 0, 50, 5] = 0.4   # below the threshold
    cells = roi_cells(mask, (4, 3))
    assert cells.sum() == 1 and bool(cells[0, 0, 1, 2])
    quarters = step_map(cells, 0.1).quarters
    assert quarters[0, 0, 1, 2] == STEP_ONE and (quarters == 40).sum() == 11
    assert step_map(cells, 1.0) is None and step_map(torch.ones_like(cells), 0.1) is None


def test_scale_division_is_integer_exact():
    scales = torch.tensor([-7.0, 0.0, 5.0, 4095.0, 2.0 ** 40 + 3], dtype=torch.float64)
    quarters = torch.tensor([8.0, 40.0, 13.0, 13.0, 40.0], dtype=torch.float64)
    expected = [int(s * 4 / q) if s >= 0 else -int(-s * 4 // q) for s, q in zip([-7, 0, 5, 4095, 2 ** 40 + 3],
                                                                                    [8, 40, 13, 13, 40])]
    assert QuantSteps(quarters).divide_scales(scales).tolist() == expected


@pytest.mark.parametrize("grid", [(1, 1), (4, 12), (13, 7)])
def test_cell_maps_round_trip_and_bad_maps_are_value_errors(grid):
    cells = torch.rand(1, 1, *grid, generator=torch.Generator().manual_seed(0)) > 0.5
    data = pack_cells(cells)
    assert torch.equal(unpack_cells(data, grid), cells)
    bad = [b"", b"not zlib", zlib.compress(zlib.decompress(data) + b"\0"), data + b"x", data[:-1],
           zlib.compress(bytes(1 << 24))]
    for payload in bad:
        with pytest.raises(ValueError, match="ROI cell map"):
            unpack_cells(payload, grid)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("entropy", ["hyperprior", "context"])
def test_background_symbols_use_the_step_and_roi_symbols_do_not(untrained, variant, entropy):
    """At Q = 0.1 the decoder rebuilds the encoder's own image; against the same latent coded
    with step 1, the background's symbols are ~10x smaller and (without a context model, whose
    context the background changes) the ROI's are the same."""
    if entropy != "hyperprior":
        torch.manual_seed(0)
    model = coding_sized(copy.deepcopy(untrained[variant]) if entropy == "hyperprior"
                         else tiny_model(variant, entropy=entropy))
    x, m = image_and_mask(128, 192, seed=5)
    state = encoder_side(model, x, m, 0.1, 0.6)
    data = encode(model, x, m, 0.1, 0.6)
    header, groups = unpack(data)
    cells = unpack_cells(groups[2][0], (8, 12))
    assert torch.equal(cells, roi_cells(m, (8, 12))) and 0 < cells.float().mean() < 1
    assert torch.equal(decode(model, data), state["x_hat"][..., :128, :192])
    # the same latent coded with step 1 everywhere: ROI symbols equal, background ones ~10x larger
    plain = encoder_side(model, x, m, 0.1, 0.6, steps=False)
    roi = cells.expand_as(state["symbols"])
    if entropy == "hyperprior":
        assert torch.equal(state["symbols"][roi], plain["symbols"][roi])
    background = ~roi
    assert state["symbols"][background].abs().sum() < plain["symbols"][background].abs().sum() / 5


def test_focused_files_are_smaller_with_steps_and_keep_the_roi(trained, monkeypatch):
    """A trained model at Q = 0.1: the file with background steps is much smaller than the same
    latent coded with step 1 everywhere (the harness: steps switched off), for about the same ROI
    PSNR (within 1 dB: these ROIs are a few cells, most of their pixels next to a coarse cell)."""
    model = trained("sft")
    x, m = image_and_mask(256, 256, seed=21)
    focused = encode(model, x, m, 0.1, 0.7)
    with monkeypatch.context() as patch:
        patch.setattr("pipeline.codec.models.step_map", lambda cells, q: None)
        plain = encode(model, x, m, 0.1, 0.7)
        plain_decoded = decode(model, plain)
    assert not unpack(plain)[1][2][0] and unpack(focused)[1][2][0]
    assert len(focused) < 0.5 * len(plain), (len(focused), len(plain))
    assert roi_psnr(x, decode(model, focused), m)[0] > roi_psnr(x, plain_decoded, m)[0] - 1.0


def test_version_2_files_still_decode(untrained):
    """A version 2 file (y and z only: step 1 everywhere) decodes as it did."""
    model = untrained["tma"]
    x, m = image_and_mask(64, 64, seed=2)
    data = encode(model, x, m, 1.0, 0.5)  # Q = 1: no cell map
    header, groups = unpack(data)
    assert groups[2] == [b""]
    old = pack(RoicHeader(**{**header.__dict__, "version": 2}), groups[:2])
    assert unpack(old)[0].version == 2
    assert torch.equal(decode(model, old), decode(model, data))
