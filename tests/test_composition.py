"""The codec composed from parts: every transforms x entropy family x latent structure builds and
codes; checkpoints and files written before the parts (tests/fixtures/legacy, made at 2590c8b by
tests/fixtures/make_legacy.py) load with their fingerprints and decode to the same images.

``extended``: every combination briefly trained, its file size honest and its files portable
(``make test-extended``: minutes)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.codec.bitstream import unpack
from pipeline.codec.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from pipeline.codec.coding import decode, encode, hyper_latent_shape, tensor_to_image
from pipeline.codec.models import MODELS, build_model
from pipeline.codec.numerics import PERTURBATIONS, coded_state
from pipeline.train.local import train_local
from pipeline.train.loss import bits_per_pixel as estimated_bpp
from pipeline.train.steps import make_optimizers

from conftest import TINY, coding_sized, encoder_side, image_and_mask, tiny_model

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
TRANSFORMS = ["tlic", "sft", "tma", "swin"]
FAMILIES = ["gaussian", "generalized_gaussian"]
STRUCTURES = ["hyperprior", "context"]
# the combinations no preset had before the parts (the presets' own tests cover the others); the
# context model's calibration takes ~10 s a model: those under `make test-extended`
NEW = [(t, "generalized_gaussian", s) if s == "hyperprior" else
       pytest.param(t, "generalized_gaussian", s, marks=pytest.mark.extended)
       for t in ("tlic", "tma", "swin") for s in STRUCTURES]


def combination(transforms: str, family: str, structure: str, seed: int = 0):
    torch.manual_seed(seed)
    return tiny_model(transforms, family=family, entropy=structure)


def image_hash(x: torch.Tensor) -> str:
    return hashlib.sha256(np.asarray(tensor_to_image(x)).tobytes()).hexdigest()


def legacy_model(name: str, tmp_path: Path):
    entry = json.loads((LEGACY / "index.json").read_text())[name]
    path = tmp_path / f"{name}.pt"
    path.write_bytes(lzma.decompress((LEGACY / entry["checkpoint"]).read_bytes()))
    return load_checkpoint(path), entry, path


def test_presets_are_parts():
    assert MODELS["ggm"].transforms == "sft" and MODELS["ggm"].family == "generalized_gaussian"
    model = build_model("tlic", **TINY, family="generalized_gaussian", beta_mode="channel", entropy="context")
    assert (model.transforms.name, model.family.name, model.entropy) == ("tlic", "generalized_gaussian", "context")
    assert model.config["family"] == "generalized_gaussian" and model.config["beta_mode"] == "channel"
    assert "family" not in build_model("ggm", **TINY).config  # a preset's own family is not repeated
    rebuilt = build_model("tlic", **model.config)
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("options,message", [
    ({"beta_mode": "channel"}, "takes no option.*beta_mode"),  # a Gaussian has no shape
    ({"family": "laplace"}, "unknown entropy family"),
    ({"entropy": "autoregressive"}, "unknown entropy model"),
    ({"groups": [8, 24]}, "takes no option.*groups"),  # the hyperprior has no groups
    ({"cond_channels": 8}, "takes no option.*cond_channels"),  # tlic's transforms have no SFT
])
def test_options_of_another_part_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_model("tlic", **TINY, **options)


@pytest.mark.parametrize("transforms,family,structure", NEW)
def test_new_combinations_round_trip_and_save(transforms, family, structure, tmp_path):
    """Combinations no preset had: the decoder rebuilds the encoder's own image, and a checkpoint
    keeps the fingerprint and the decoded image."""
    model = coding_sized(combination(transforms, family, structure))
    x, m = image_and_mask(70, 90, seed=3)
    data = encode(model, x, m, 0.3, 0.6)
    state = encoder_side(model, x, m, 0.3, 0.6)
    assert (state["symbols"] != 0).float().mean() > 0.05
    assert torch.equal(decode(model, data), state["x_hat"][..., :70, :90])
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt"))
    assert fingerprint(loaded) == fingerprint(model) and loaded.config == model.config
    assert torch.equal(decode(loaded, data), decode(model, data))


@pytest.mark.parametrize("name", sorted(json.loads((LEGACY / "index.json").read_text())))
def test_legacy_checkpoints_keep_fingerprint_files_and_encoder(name, tmp_path):
    """A checkpoint of the old layout loads (keys renamed) with the fingerprint it had, its files
    (version 3) decode to the same 8-bit images and the same image encodes to the same header,
    strings and steps (a version 4 file: its level map codes the old cell map's steps); written again
    (today's compact format) it keeps all that in a smaller file; the harness sees one changed
    weight (another fingerprint, another image; shown on tlic's)."""
    from fixtures.make_legacy import POINTS, image_and_mask as fixture_image

    model, entry, path = legacy_model(name, tmp_path)
    again = load_checkpoint(save_checkpoint(model, tmp_path / "again.pt"))
    assert (tmp_path / "again.pt").stat().st_size < path.stat().st_size
    x, m = fixture_image()
    for loaded in (model, again):
        assert fingerprint(loaded).hex() == entry["fingerprint"] and loaded.config == entry["config"]
        for point, (q, rate, masked) in POINTS.items():
            data = (LEGACY / entry["files"][point]["file"]).read_bytes()
            assert image_hash(decode(loaded, data, float64=True)) == entry["files"][point]["decoded_sha256"]
            (new_header, new), (old_header, old) = unpack(encode(loaded, x, m if masked else None, q, rate)), \
                unpack(data)
            assert (new_header.version, old_header.version) == (4, 3)
            assert {**new_header.__dict__, "version": 3} == old_header.__dict__ and new[:2] == old[:2], point
            shape = hyper_latent_shape(loaded, old_header)
            new_steps, old_steps = loaded.coded_steps(new, shape), loaded.coded_steps(old, shape, q, cell_maps=True)
            assert (new_steps is None and old_steps is None) or torch.equal(new_steps.quarters, old_steps.quarters)
            assert masked == (old_steps is not None), point
    if name != "tlic":
        return
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.g_s.state_dict()[next(iter(changed.g_s.state_dict()))].view(-1)[0] += 0.5
    assert fingerprint(changed) != fingerprint(model)
    header, groups = unpack((LEGACY / entry["files"]["uniform"]["file"]).read_bytes())
    x_hat = changed.double().decompress(groups, hyper_latent_shape(changed, header), header.rate)["x_hat"]
    assert image_hash(x_hat[..., :header.height, :header.width].float()) != entry["files"]["uniform"]["decoded_sha256"]


def test_a_seed_initialises_every_preset_as_before_the_parts():
    """The parts are built in the order the codec was: a seed gives the same initial weights
    (fingerprints of seeded, untrained models written at 2590c8b), so training is unchanged too."""
    expected = json.loads((LEGACY / "init_fingerprints.json").read_text())
    for name, want in expected.items():
        variant, _, structure = name.partition("_")
        torch.manual_seed(0)
        model = build_model(variant, N=16, M=32, n_rates=2, **MODELS[variant].SMALL,
                            **({"entropy": structure} if structure else {}))
        assert fingerprint(model).hex() == want, name
    torch.manual_seed(1)  # the harness: another draw is another model
    assert fingerprint(build_model("tlic", N=16, M=32, n_rates=2)).hex() != expected["tlic"]


def test_legacy_training_run_resumes_with_its_optimizer_state(tmp_path):
    """A training checkpoint of the old layout (other parameter names and order) resumes: weights
    renamed, and each parameter's Adam moments reach that parameter."""
    from pipeline.train.loop import MODEL_FILE, STATE_FILE, load_training_checkpoint

    model, entry, path = legacy_model("tma", tmp_path)
    blob = torch.load(path, weights_only=True)
    renamed = model.upgrade_state_dict(blob["state_dict"])
    params = dict(model.named_parameters())
    old_order = [n for n in renamed if n in params]
    assert old_order != list(params)  # the old layout really had another order
    # the old run's optimizers: the same parameters in the old order, after one step
    main = torch.optim.Adam([params[n] for n in old_order if not n.endswith(".quantiles")], lr=1e-3)
    aux = torch.optim.Adam([params[n] for n in old_order if n.endswith(".quantiles")], lr=1e-3)
    x, m = image_and_mask(64, 64, seed=1)
    out = model.train()(x, m, 0.5, 0.5)
    (out["x_hat"].square().mean() - sum(v.log().sum() for v in out["likelihoods"].values()) * 1e-6).backward()
    model.aux_loss().backward()
    main.step()
    aux.step()
    run = tmp_path / "run"
    run.mkdir()
    (run / MODEL_FILE).write_bytes(path.read_bytes())
    torch.save({"step": 3, "optimizer": main.state_dict(), "aux_optimizer": aux.state_dict()}, run / STATE_FILE)
    moments = {n: main.state[params[n]]["exp_avg"].clone() for n in old_order if not n.endswith(".quantiles")}

    fresh = build_model("tma", **entry["config"])
    state = load_training_checkpoint(run, fresh)
    optimizer, aux_optimizer = make_optimizers(fresh, 1e-3, 1e-3)
    optimizer.load_state_dict(state["optimizer"])
    aux_optimizer.load_state_dict(state["aux_optimizer"])
    own = dict(fresh.named_parameters())
    for name, expected in moments.items():
        assert torch.equal(optimizer.state[own[name]]["exp_avg"], expected), name
    optimizer.load_state_dict(main.state_dict())  # the harness: without the reordering, moments mismatch
    assert any(optimizer.state[own[n]]["exp_avg"].shape != e.shape
               or not torch.equal(optimizer.state[own[n]]["exp_avg"], e) for n, e in moments.items())


@pytest.mark.extended
@pytest.mark.parametrize("transforms,family,structure", list(itertools.product(TRANSFORMS, FAMILIES, STRUCTURES)))
def test_every_combination_is_honest_and_portable(transforms, family, structure):
    """Briefly trained: real file bits / the likelihoods' estimate <= 1.02 at 512x512, and its
    files decode to the same symbols and float64 image under every numeric perturbation."""
    pairs = [image_and_mask(128, 128, seed) for seed in range(16)]
    model = combination(transforms, family, structure)
    train_local(model, torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]), steps=300, batch=8,
                crop=64, lr=1e-3)
    model.eval().update(force=True)
    x, m = image_and_mask(512, 512, seed=7)
    with torch.no_grad():
        out = model(x, None, 1.0, 1.0)
    estimate = float(estimated_bpp(out["likelihoods"], 512 * 512)) * 512 * 512
    real = 8 * len(encode(model, x, None, 1.0, 1.0))
    assert real / estimate <= 1.02, (real, estimate)
    data = encode(model, x[..., :150, :200], m[..., :150, :200], 0.3, 0.8)
    indexes, symbols = coded_state(model, data)
    reference64 = image_hash(decode(model, data, float64=True))
    for name, (context, to_float64) in PERTURBATIONS.items():
        other = copy.deepcopy(model).double() if to_float64 else model
        with context():
            other_indexes, other_symbols = coded_state(other, data)
            assert torch.equal(other_indexes, indexes) and torch.equal(other_symbols, symbols), name
            assert image_hash(decode(other, data, float64=True)) == reference64, name


def test_training_jobs_and_warm_start_take_the_family(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.train.trainer import build_parser, cli_main, config_from_args

    parse = build_parser().parse_args
    model = config_from_args(parse(["--shards", "x", "--variant", "tlic", "--family", "generalized_gaussian",
                                    "--beta-mode", "channel"])).model
    assert model["family"] == "generalized_gaussian" and model["beta_mode"] == "channel"
    assert "family" not in config_from_args(parse(["--shards", "x", "--variant", "ggm",
                                                   "--family", "generalized_gaussian"])).model
    # a Gaussian has no shape: one line before anything starts
    assert cli_main(["--smoke", "--variant", "tma", "--beta-mode", "channel",
                     "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "beta_mode" in err
    from compressai.models import MeanScaleHyperprior

    torch.manual_seed(0)
    torch.save(MeanScaleHyperprior(32, 48).state_dict(), tmp_path / "msh.pth")
    assert main(["warm-start", str(tmp_path / "msh.pth"), str(tmp_path / "gg.pt"), "--variant", "tma",
                 "--family", "generalized_gaussian", "--n-rates", "2"]) == 0
    loaded = load_checkpoint(tmp_path / "gg.pt")
    assert loaded.family.name == "generalized_gaussian" and loaded.variant == "tma"
