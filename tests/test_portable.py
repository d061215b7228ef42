"""Portable .roic files: the same symbols under every numeric environment, tables that
travel in the checkpoint, old formats refused clearly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.codec.bitstream import BitstreamError, serialize, unpack
from pipeline.codec.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, convert_checkpoint, fingerprint,
                                       load_checkpoint, pack_state_dict, save_checkpoint, unpack_state_dict)
from pipeline.codec.coding import decode, encode, tensor_to_image
from pipeline.codec.integer import WEIGHT_MAX, hyper_latent_samples
from pipeline.codec.models import ROICodec, build_model
from pipeline.codec.numerics import PERTURBATIONS, coded_state
from pipeline.train.local import train_local

from conftest import TINY, VARIANTS, image_and_mask, tiny_model

_BRIEF: dict[str, ROICodec] = {}


def briefly_trained(variant: str, entropy: str = "hyperprior") -> ROICodec:
    """A tiny model trained 150 steps: latents with real statistics (not all-zero symbols)."""
    if (variant, entropy) not in _BRIEF:
        pairs = [image_and_mask(128, 128, seed) for seed in range(8)]
        torch.manual_seed(0)
        model = tiny_model(variant, entropy=entropy)
        train_local(model, torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]),
                    steps=150, batch=8, crop=64, lr=2e-3)
        _BRIEF[variant, entropy] = model
    return _BRIEF[variant, entropy]


def perturbed(model: ROICodec, name: str):
    context, to_float64 = PERTURBATIONS[name]
    return context(), (copy.deepcopy(model).double() if to_float64 else model)


# The context model's integer path is the same code for every variant but its parameter count:
# tma (Gaussian) and ggm (generalized Gaussian) cover both, for the suite's time budget
@pytest.mark.parametrize("variant,entropy", [(v, "hyperprior") for v in VARIANTS] + [("tma", "context"),
                                                                                    ("ggm", "context")])
def test_files_decode_to_the_same_symbols_under_every_perturbation(variant, entropy):
    """Encode under default numerics; decode with 1/2 threads, oneDNN off, a float64 model and
    unfold+matmul convolutions: identical table indexes and symbols, the same 8-bit image up to
    the float32 synthesis' rounding noise (a pixel level at a rounding tie, rarely), and with
    the synthesis in float64 (``decode(float64=True)``) the identical 8-bit image. The context
    model's index path (channel context, checkerboard context, parameter networks) runs on
    integers as the hyper-decoder does."""
    model = briefly_trained(variant, entropy)
    images = ((900, (150, 200)), (901, (128, 128)))
    for seed, (h, w) in images if entropy == "hyperprior" else images[:1]:  # (the suite's time budget)
        x, m = image_and_mask(h, w, seed)
        data = encode(model, x, m, 0.3, 0.8)
        assert unpack(data)[1][2][0], "no ROI cell map: the background's quantisation steps go untested"
        indexes, symbols = coded_state(model, data)
        assert (symbols != 0).float().mean() > 0.05, "latents too close to all-zero to test anything"
        assert len(indexes.unique()) >= 5
        reference = np.asarray(tensor_to_image(decode(model, data)), dtype=int)
        reference64 = np.asarray(tensor_to_image(decode(model, data, float64=True)), dtype=int)
        for name in PERTURBATIONS:
            context, other = perturbed(model, name)
            with context:
                other_indexes, other_symbols = coded_state(other, data)
                image = np.asarray(tensor_to_image(decode(other, data)), dtype=int)
                image64 = np.asarray(tensor_to_image(decode(other, data, float64=True)), dtype=int)
            assert torch.equal(other_indexes, indexes), (variant, name)
            assert torch.equal(other_symbols, symbols), (variant, name)
            assert np.abs(image - reference).max() <= 1, (variant, name)
            assert (image != reference).mean() < 1e-3, (variant, name)
            assert np.array_equal(image64, reference64), (variant, name)


@pytest.mark.parametrize("variant,entropy", [("tlic", "hyperprior"), ("ggm", "context")])
def test_graded_files_decode_to_the_same_symbols_under_every_perturbation(variant, entropy):
    """A graded map's file (its level map with several steps) decodes to the same table indexes
    and symbols under every numeric perturbation, as a binary one does."""
    model = briefly_trained(variant, entropy)
    x, m = image_and_mask(150, 200, 902)
    soft = torch.nn.functional.avg_pool2d(m, 33, stride=1, padding=16, count_include_pad=False)
    data = encode(model, x, soft, 0.1, 0.8, graded=True)
    assert len(unpack(data)[1][2][0]) > 4, "no level map of several steps"
    indexes, symbols = coded_state(model, data)
    for name in PERTURBATIONS:
        context, other = perturbed(model, name)
        with context:
            other_indexes, other_symbols = coded_state(other, data)
        assert torch.equal(other_indexes, indexes) and torch.equal(other_symbols, symbols), (variant, name)


@pytest.mark.parametrize("variant", ["tma", "ggm"])
def test_float_index_path_flips_under_the_same_perturbations(variant):
    """The harness can fail: the old float hyper-decoder picks other tables for some elements
    under the same perturbations (the integer path, on the same inputs, never does)."""
    model = briefly_trained(variant)
    eb = model.latent_codec.entropy_bottleneck
    symbols, _ = hyper_latent_samples(eb, batch=16, size=8, seed=1)
    z_hat = (symbols + eb._get_medians().detach().reshape(1, -1, 1, 1)).float()

    def int_indexes(latent, zh):
        return latent.entropy_parameters(latent.side_int(zh), None, zh.dtype)[0]

    with torch.no_grad():
        float_ref, _ = model.latent_codec.float_entropy_parameters(z_hat)
        int_ref = int_indexes(model.latent_codec, z_hat)
    float_flips = {}
    for name in PERTURBATIONS:
        context, other = perturbed(model, name)
        with context, torch.no_grad():
            zh = z_hat.to(next(other.parameters()).dtype)
            float_flips[name] = int((other.latent_codec.float_entropy_parameters(zh)[0] != float_ref).sum())
            assert torch.equal(int_indexes(other.latent_codec, zh), int_ref), name
    assert sum(float_flips.values()) > 0, float_flips  # seen: 7-9675 flips per perturbation but threads


def test_integer_layers_compute_exactly_what_the_float_conv_computes_on_integers():
    from compressai.models.utils import conv, deconv

    from pipeline.codec.integer import IntegerConv

    torch.manual_seed(0)
    for layer in (conv(8, 6, stride=1, kernel_size=3), deconv(8, 6), conv(8, 6)):
        ic = IntegerConv(layer)
        ic.weight.copy_(torch.randint(-2 ** 15 + 1, 2 ** 15, ic.weight.shape))
        x = torch.randint(-2 ** 20 + 1, 2 ** 20, (2, 8, 5, 7)).double()
        w = ic.weight.double()
        if ic.transposed:
            expected = torch.nn.functional.conv_transpose2d(x, w.permute(1, 0, 2, 3), None, ic.stride,
                                                            ic.padding, ic.output_padding)
        else:
            expected = torch.nn.functional.conv2d(x, w, None, ic.stride, ic.padding)
        assert torch.equal(ic.accumulate(x), expected)


def test_loading_never_rebuilds_the_tables_and_the_fingerprint_covers_them(tmp_path, monkeypatch):
    model = briefly_trained("tlic")
    path = save_checkpoint(model, tmp_path / "m.pt")
    x, m = image_and_mask(128, 128, 903)
    data = encode(model, x, m, 0.5, 0.5)
    monkeypatch.setattr(ROICodec, "update", lambda *a, **k: pytest.fail("load_checkpoint rebuilt tables"))
    loaded = load_checkpoint(path)
    assert torch.equal(decode(loaded, data), decode(model, data))
    for name in ("latent_codec.family.conditional._quantized_cdf", "latent_codec.hyper_int.layers.0.weight",
                 "latent_codec.table_index.thresholds"):
        changed = copy.deepcopy(loaded)
        changed.state_dict()[name].view(-1)[0] += 1
        assert fingerprint(changed) != fingerprint(loaded), name
    assert fingerprint(copy.deepcopy(loaded).double()) == fingerprint(loaded)


def test_old_formats_are_refused_clearly_and_old_checkpoints_convert(tmp_path):
    model = briefly_trained("tma")
    x, m = image_and_mask(128, 128, 904)
    header, groups = unpack(encode(model, x, m, 0.5, 0.5))
    v1 = serialize(header.variant.encode(), header.fingerprint, header.width, header.height, header.rate,
                   header.roi_quality, groups, version=1)
    with pytest.raises(BitstreamError, match="version 1.*reads versions 2, 3"):
        decode(model, v1)

    old = {k: v for k, v in model.state_dict().items()
           if not k.startswith(("latent_codec.hyper_int.", "latent_codec.table_index."))}
    torch.save({"format": "roicodec-checkpoint/1", "variant": "tma", "config": model.config,
                "state_dict": old, "extra": {"step": 7}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="roicodec convert"):
        load_checkpoint(tmp_path / "old.pt")
    converted = convert_checkpoint(tmp_path / "old.pt", tmp_path / "new.pt")
    loaded = load_checkpoint(tmp_path / "new.pt")
    assert torch.load(tmp_path / "new.pt", weights_only=True)["format"] == CHECKPOINT_FORMAT
    assert fingerprint(loaded) == fingerprint(converted)
    out = decode(loaded, encode(loaded, x, m, 0.5, 0.5))
    assert out.shape == x.shape


def test_a_training_run_from_before_format_2_resumes(tmp_path, untrained):
    """Ray Train's resume loads model.pt itself: a format-1 one (no coding state) loads too."""
    from pipeline.train.loop import MODEL_FILE, STATE_FILE, load_training_checkpoint

    model = untrained["sft"]
    old = {k: v for k, v in model.state_dict().items()
           if not k.startswith(("latent_codec.hyper_int.", "latent_codec.table_index."))}
    torch.save({"format": "roicodec-checkpoint/1", "variant": "sft", "config": model.config,
                "state_dict": old, "extra": {}}, tmp_path / MODEL_FILE)
    torch.save({"step": 5}, tmp_path / STATE_FILE)
    fresh = build_model("sft", **TINY)
    assert load_training_checkpoint(tmp_path, fresh)["step"] == 5
    assert torch.equal(fresh.g_a.convs[0].weight, model.g_a.convs[0].weight)


def test_a_default_size_checkpoint_is_compact_and_loads_bit_for_bit(tmp_path):
    """tma at N=128, M=192 (random init + update): stored with int16 integer weights, int64 only for
    the small tensors whose range needs it, CDF tables without their padding; the file within
    float32 parameters + int16 integer weights + each CDF row's own entries in int32 (+2% for names
    and pickling), no larger than 1.25x the float32 parameters; loaded, every tensor has its dtype
    and every bit back."""
    torch.manual_seed(0)
    model = build_model("tma", N=128, M=192).eval()
    model.update(force=True)
    buffers = dict(model.named_buffers())
    int_weights = {n: b for n, b in buffers.items() if n.startswith("latent_codec.hyper_int.layers.")
                   and n.endswith(".weight")}
    assert int_weights and max(int(b.abs().max()) for b in int_weights.values()) <= WEIGHT_MAX
    stored = pack_state_dict(model.state_dict())[0]
    assert all(stored[n].dtype == torch.int16 for n in int_weights)
    wide = {n: t.numel() for n, t in stored.items() if t.dtype == torch.int64}
    assert sum(wide.values()) < 4096, wide  # biases, shifts, thresholds: need up to 2^52
    cdfs = {n: b for n, b in buffers.items() if n.endswith("_quantized_cdf")}
    assert cdfs and all(b.dtype == torch.int32 for b in cdfs.values())
    param_bytes = 4 * sum(p.numel() for p in model.parameters())
    cdf_bytes = 4 * sum(int(buffers[n.replace("_quantized_cdf", "_cdf_length")].sum()) for n in cdfs)
    budget = (param_bytes + 2 * sum(b.numel() for b in int_weights.values()) + cdf_bytes) * 1.02
    path = save_checkpoint(model, tmp_path / "default.pt")
    size = path.stat().st_size
    assert size <= budget and size <= 1.25 * param_bytes, (size, budget, param_bytes)
    loaded = load_checkpoint(path)
    assert fingerprint(loaded) == fingerprint(model)
    for name, t in model.state_dict().items():
        other = loaded.state_dict()[name]
        assert other.dtype == t.dtype and torch.equal(other, t), name


def test_packing_keeps_every_bit_and_stores_odd_tables_whole():
    cdf = torch.tensor([[0, 5, 65536, 0, 0], [0, 1, 2, 3, 65536], [0, 65536, 0, 0, 0]], dtype=torch.int32)
    lengths = torch.tensor([3, 5, 2], dtype=torch.int32)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    state = {"a._quantized_cdf": cdf, "a._cdf_length": lengths, "c.mask": mask, "c.weight": mask * 0.5,
             "d.mask": torch.tensor([1.0, -0.0]), "e.mask": torch.tensor([0.5, 1.0]),
             "w": torch.tensor([-32767, 32767, 0]), "wide": torch.tensor([2 ** 15, 0]), "f": torch.tensor([0.0, 1.0])}
    packed, layout = pack_state_dict(state)
    assert packed["a._quantized_cdf"].tolist() == [0, 5, 65536, 0, 1, 2, 3, 65536, 0, 65536]
    assert packed["c.mask"].dtype == torch.bool and packed["w"].dtype == torch.int16
    assert set(layout) == {"a._quantized_cdf", "c.mask", "w"}  # 2^15 needs int64; floats stay floats
    restored = unpack_state_dict(packed, layout)
    assert all(restored[k].dtype == v.dtype and torch.equal(restored[k], v) for k, v in state.items())
    assert torch.signbit(restored["d.mask"][1])  # -0.0 was not packed as a 0/1 mask
    padded = cdf.clone()
    padded[0, 4] = 7  # padding that is not zero: the table is stored whole
    assert "a._quantized_cdf" not in pack_state_dict({**state, "a._quantized_cdf": padded})[1]
    with pytest.raises(CheckpointError, match="does not match its lengths"):
        unpack_state_dict({**packed, "a._cdf_length": lengths + 1}, layout)
    with pytest.raises(CheckpointError, match="unknown packing"):
        unpack_state_dict(packed, {"c.mask": ["bool", "load"]})
    with pytest.raises(CheckpointError, match="unknown packing"):  # a narrow tensor that is not int16
        unpack_state_dict({**packed, "w": packed["w"].int()}, layout)
