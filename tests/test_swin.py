"""The ``swin`` variant: timm's Swin blocks in the paper's layout and size; its warm start rules.

The checks every variant passes (round trips at odd sizes, no mask at the decoder, checkpoints,
portable files under numeric perturbations, the context model) run on ``swin`` through
``conftest.VARIANTS``; what needs a trained swin is in ``test_trained_codec.py`` (marked
``extended``: ``make test-extended``, its training takes minutes).
"""

from __future__ import annotations

import pytest
import torch
from compressai.models import MeanScaleHyperprior
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from pipeline.codec.checkpoint import save_checkpoint
from pipeline.codec.models import build_model
from pipeline.codec.transforms.swin_blocks import SwinStage
from pipeline.codec.warm_start import InitError, load_init_source, warm_start

from conftest import command_line_round_trip, tiny_model

PAPER_PARAMETERS = 15.8e6  # Li, Liang, Fu, Han (ICASSP 2023)


def _windows(stages) -> set[tuple[int, int]]:
    return {(b.window_size[0], b.shift_size[0]) for s in stages for b in s.blocks}


def test_paper_size_and_layout():
    model = build_model("swin")
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / PAPER_PARAMETERS - 1) < 0.03, params
    stages = [m for m in model.modules() if isinstance(m, SwinStage)]
    assert all(isinstance(b, SwinTransformerBlock) for s in stages for b in s.blocks)
    assert [len(s.blocks) for s in model.g_a.stages] == [2, 2, 6, 2]
    assert [len(s.blocks) for s in model.g_s.stages] == [2, 6, 2, 2]
    # 8x8 windows in the main transforms, 4x4 in the hyper-encoder, every other block shifted by half
    assert _windows([*model.g_a.stages, *model.g_s.stages]) == {(8, 0), (8, 4)}
    assert _windows(model.latent_codec.h_a.stages[::2]) == {(4, 0)} and model.config["hyper_depths"] == [1, 1]
    first, last = model.g_a.embed[0], model.g_s.out[-1]
    assert (first.kernel_size, first.stride, last.kernel_size, last.stride) == ((5, 5), (2, 2), (5, 5), (2, 2))
    assert len(model.g_a.sfts) == len(model.g_s.sfts) == 4  # the mask enters every stage
    # the hyper-decoder selects coding tables: convolutions only, so it has an integer twin
    assert {type(m) for m in model.latent_codec.h_s} <= {nn.Conv2d, nn.ConvTranspose2d, nn.LeakyReLU}


def test_config_rebuilds_the_model_and_bad_shapes_are_refused():
    small = tiny_model("swin")
    assert small.config["depths"] == [1, 1, 2, 1]
    assert build_model("swin", **small.config).config == small.config
    for bad in ({"depths": [2, 2]}, {"dims": [16, 16]}, {"window": 0}, {"hyper_depths": [1, 0]}):
        with pytest.raises(ValueError, match="swin"):
            build_model("swin", N=16, M=24, **bad)


def test_compressai_weights_are_refused_but_our_swin_checkpoints_warm_start(tmp_path):
    torch.save(MeanScaleHyperprior(16, 24).state_dict(), tmp_path / "msh.pth")
    with pytest.raises(InitError, match="no weights for swin's transforms"):
        warm_start(tiny_model("swin"), load_init_source(str(tmp_path / "msh.pth")))
    torch.manual_seed(1)
    trained = tiny_model("swin")
    path = save_checkpoint(trained, tmp_path / "swin.pt")
    fresh = tiny_model("swin")
    report = warm_start(fresh, load_init_source(str(path)))
    assert not report.fresh
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), fresh.parameters()))


def test_command_line_and_training_job_take_swin(tmp_path):
    from pipeline.train.trainer import build_parser, config_from_args

    model = tiny_model("swin", entropy="context").eval()
    model.update(force=True)
    command_line_round_trip(save_checkpoint(model, tmp_path / "swin.pt"), tmp_path)
    args = build_parser().parse_args(["--smoke", "--variant", "swin", "--shards", str(tmp_path)])
    cfg = config_from_args(args)  # a smoke run builds the small configuration
    assert cfg.variant == "swin" and cfg.model["depths"] == [1, 1, 2, 1]
    assert build_model("swin", **cfg.model).config["depths"] == [1, 1, 2, 1]
