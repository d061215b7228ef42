"""Spatial quantisation steps: the background's latents coded with the step Q sets, the ROI's
with step 1, or each cell's step from a graded quality map; the level map travels in the file
and decodes everywhere the same; version 3's cell maps still decode."""

from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn.functional as F

from pipeline.codec.bitstream import RoicHeader, pack, unpack
from pipeline.codec.coding import decode, encode
from pipeline.codec.level_map import pack_levels, unpack_levels
from pipeline.codec.steps import (LEVEL_QUARTERS, STEP_ONE, QuantSteps, background_quarters, graded_steps,
                                  pack_cells, quantisation_steps, roi_cells, step_map, unpack_cells)
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
    quarters = unpack_levels(groups[2][0], (8, 12))
    cells = quarters == STEP_ONE
    assert set(quarters.unique().tolist()) == {STEP_ONE, 40}
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
        patch.setattr("pipeline.codec.models.quantisation_steps", lambda *args: None)
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


def soft_map(height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A photo-like image and a graded importance map: its objects' mask blurred (ramps at the
    edges) over a left-to-right ramp from 0 to 0.6."""
    x, m = image_and_mask(height, width, seed)
    blurred = torch.nn.functional.avg_pool2d(m, 33, stride=1, padding=16, count_include_pad=False)
    ramp = torch.linspace(0, 0.6, width).expand(1, 1, height, width)
    return x, torch.maximum(blurred, ramp)


def test_graded_levels_follow_each_cells_mean_quality():
    quality = torch.full((1, 1, 32, 160), 0.02)
    for col, q in enumerate([1.0, 0.8, 0.5, 0.3, 0.1, 0.06, 0.02, 0.7, 0.5, 0.25]):
        quality[0, 0, :16, col * 16:(col + 1) * 16] = q
    quality[0, 0, 16:, :8] = 1.0  # half a cell at 1: its mean ~0.5
    quality[0, 0, 20, 21] = 1.0  # one pixel does not raise its cell
    quarters = graded_steps(quality, (2, 10)).quarters
    assert quarters[0, 0, 0].tolist() == [4, 4, 8, 16, 32, 64, 64, 8, 8, 16]
    assert quarters[0, 0, 1].tolist() == [8] + [64] * 9
    assert set(quarters.unique().tolist()) <= set(LEVEL_QUARTERS)
    assert graded_steps(torch.ones(1, 1, 32, 32), (2, 2)) is None


@pytest.mark.parametrize("q", [1 / 16, 0.25, 0.5])
def test_a_binary_mask_graded_keeps_its_inside_and_outside_steps(q):
    """A hard mask graded at Q = 1/16, 1/4, 1/2 (on the level grid): cells wholly inside the ROI get
    step 1 and wholly outside the binary background's step, as binary; cells on its edge in between."""
    m = torch.zeros(1, 1, 128, 192)
    m[..., 16:80, 24:120] = 1.0  # whole cells in rows 1-4, columns 2-6; half cells in columns 1 and 7
    graded = quantisation_steps(m, q, (8, 12), graded=True).quarters
    binary = quantisation_steps(m, q, (8, 12)).quarters
    inside, outside = -F.max_pool2d(-m, 16) == 1, F.max_pool2d(m, 16) == 0
    assert inside.any() and outside.any() and (~inside & ~outside).any()
    assert torch.equal(graded[inside | outside], binary[inside | outside])
    edge = ~inside & ~outside
    assert (graded[edge] >= STEP_ONE).all() and (graded[edge] <= binary.max()).all()


def escaped(levels: int, n: int, value: int) -> bytes:
    """A crafted level map's coded part: ``n`` cells of index 0, then ``value`` (>= ``levels``: CompressAI's
    escape symbol carries it) under the level map's own model."""
    from compressai.ans import BufferedRansEncoder

    from pipeline.codec.level_map import _AdaptiveModel, _context

    model, index, cdfs = _AdaptiveModel(levels), [0] * n + [value], []
    for k in range(n + 1):
        a, b = _context(index, 0, k, n + 1, levels - 1)
        cdfs.append(model.cdf(a, b))
        model.update(a, b, min(index[k], levels - 1))
    index, cdfs = index + [0] * 8, cdfs + cdfs[-1:] * 8  # never read; CompressAI's encoder needs the room
    encoder = BufferedRansEncoder()
    encoder.encode_with_indexes(index, list(range(n + 9)), cdfs, [levels + 2] * (n + 9), [0] * (n + 9))
    return encoder.flush()


@pytest.mark.parametrize("grid", [(1, 1), (4, 12), (13, 7)])
def test_level_maps_round_trip_and_bad_maps_are_value_errors(grid):
    levels = torch.randint(0, len(LEVEL_QUARTERS), (1, 1, *grid), generator=torch.Generator().manual_seed(0))
    quarters = torch.tensor(LEVEL_QUARTERS, dtype=torch.float32)[levels]
    quarters.view(-1)[0] = 6  # at least one cell off step 1
    data = pack_levels(quarters)
    assert torch.equal(unpack_levels(data, grid), quarters)
    assert pack_levels(torch.full((1, *grid), 4.0)) == b"" and unpack_levels(b"", grid) is None
    n = data[0]
    bad = [b"\0", bytes([17]) + bytes(range(4, 21)), b"\x02\x08\x06" + data[1 + n:],  # 0 or 17 steps, unsorted
           b"\x01\x03" + data[1 + n:], b"\x01\x41" + data[1 + n:], b"\x02\x04\x04", data[:n],  # 3, 65, twice
           b"\x02\x04\x08" + escaped(2, grid[0] * grid[1] - 1, 2),  # an index beyond the list (the last cell)
           b"\x02\x04\x08" + escaped(2, 0, 200)]  # ... the first cell
    for payload in bad:
        with pytest.raises(ValueError, match="level map"):
            unpack_levels(payload, grid)
    assert torch.equal(unpack_levels(b"\x02\x04\x08" + escaped(2, grid[0] * grid[1] - 1, 1), grid).view(-1)[-1:],
                       torch.tensor([8.0]))  # the crafting harness makes valid maps too


def test_level_maps_of_a_photos_saliency_are_small_and_decode_the_same_under_any_thread_count():
    """The graded map of a photo's soft saliency (skimage's motorcycle at Q = 0.1) takes well under
    the bytes of its indexes deflated, and its binary map under version 3's packed bits; it decodes
    to the same map with 1 and 2 threads."""
    import zlib

    from pipeline.codec.models import pad_to_multiple
    from pipeline.data.photos import photo
    from pipeline.masks.saliency import get_saliency_model

    image = photo("motorcycle_left", 768)  # a training photo of the default model's split, 500 x 741
    m = pad_to_multiple(torch.from_numpy(get_saliency_model()(image)).float()[None, None], 64)
    grid = (m.shape[-2] // 16, m.shape[-1] // 16)
    quarters = quantisation_steps(m, 0.1, grid, graded=True).quarters[0]
    data_ = pack_levels(quarters)
    _, indexes = torch.unique(quarters, return_inverse=True)
    assert len(quarters.unique()) >= 3 and len(data_) < 0.75 * len(zlib.compress(indexes.numpy().astype("uint8"), 9))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(unpack_levels(data_, grid)[0], quarters)
    finally:
        torch.set_num_threads(threads)
    binary = quantisation_steps(m, 0.1, grid).quarters[0]
    assert len(pack_levels(binary)) < 0.75 * len(pack_cells(binary == STEP_ONE))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("entropy", ["hyperprior", "context"])
def test_graded_maps_round_trip(untrained, variant, entropy):
    """A graded map's file decodes to the encoder's own image, with several levels in its level
    map, and the finer a cell's step the larger its symbols."""
    if entropy != "hyperprior":
        torch.manual_seed(0)
    model = coding_sized(copy.deepcopy(untrained[variant]) if entropy == "hyperprior"
                         else tiny_model(variant, entropy=entropy))
    x, m = soft_map(128, 192, seed=6)
    state = encoder_side(model, x, m, 0.0, 0.6, graded=True)
    data = encode(model, x, m, 0.0, 0.6, graded=True)
    quarters = unpack_levels(unpack(data)[1][2][0], (8, 12))
    assert len(quarters.unique()) >= 4
    assert torch.equal(decode(model, data), state["x_hat"][..., :128, :192])
    size = state["symbols"].abs().mean(dim=1, keepdim=True)
    assert size[quarters <= 8].mean() > 2 * size[quarters >= 32].mean()


def test_version_3_files_still_decode(untrained):
    """A version 3 file (a one-bit ROI cell map, the background's step from the header's Q)
    decodes as the version 4 file of the same binary steps."""
    model = coding_sized(copy.deepcopy(untrained["sft"]))
    x, m = image_and_mask(128, 192, seed=5)
    data = encode(model, x, m, 0.3, 0.6)
    header, (y, z, (levels,)) = unpack(data)
    cells = unpack_levels(levels, (8, 12)) == STEP_ONE
    old = pack(RoicHeader(**{**header.__dict__, "version": 3}), [y, z, [pack_cells(cells)]])
    assert torch.equal(decode(model, old), decode(model, data))
