"""Shared fixtures: tiny codec models (random-init and briefly trained) and sample images."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.codec.models import MODELS, ROICodec, build_model, pad_to_multiple
from pipeline.codec.steps import quantisation_steps
from pipeline.data.samples import objects_mask, photo_like_image
from pipeline.train.local import train_local

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = {"N": 32, "M": 48, "n_rates": 2}
# A tiny open_clip ViT config: random-init weights, the whole text-mask path runs offline.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
VARIANTS = ["tlic", "sft", "tma", "ggm", "swin"]


def tiny_model(variant: str, **config) -> ROICodec:
    """``variant`` at :data:`TINY` (and the variant's small configuration for CPU runs)."""
    return build_model(variant, **TINY, **MODELS[variant].SMALL, **config)


def coding_sized(model: ROICodec) -> ROICodec:
    """A random-init ``model`` in eval mode, tables built, its latent scaled to a trained model's
    size (gains x30: a random-init latent is close to all-zero symbols)."""
    with torch.no_grad():
        model.gain.gain.mul_(30.0)
    model.eval().update(force=True)
    return model


def run_job_script(script: Path, args: list[str]) -> int:
    """Run a job script as ``python script args`` in this process; return its exit code."""
    saved = sys.argv, list(sys.path)  # the scripts put the checkout first on sys.path
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv, sys.path[:] = saved
    return 0


def image_and_mask(height: int, width: int, seed: int, n_objects: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A photo-like (1,3,H,W) image in [0,1] and its objects' (1,1,H,W) ROI mask."""
    arr, objects = photo_like_image(height, width, seed, n_objects)
    x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255.0
    m = torch.from_numpy(objects_mask(objects, height, width))[None, None]
    return x, m


def command_line_round_trip(checkpoint: Path, folder: Path) -> Path:
    """``roicodec compress`` (saliency ROI, roi-quality 0.3) and ``decompress`` of a 70x90 photo-like
    image with ``checkpoint``; checks the exit codes and the decoded size; returns the ``.roic`` file."""
    from pipeline.cli import main

    x, _ = image_and_mask(70, 90, seed=3)
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / "in.png")
    assert main(["compress", str(folder / "in.png"), "--checkpoint", str(checkpoint), "--saliency",
                 "--roi-quality", "0.3", "-o", str(folder / "f.roic")]) == 0
    assert main(["decompress", str(folder / "f.roic"), "--checkpoint", str(checkpoint),
                 "-o", str(folder / "out.png")]) == 0
    assert Image.open(folder / "out.png").size == (90, 70)
    return folder / "f.roic"


def encoder_side(model: ROICodec, x: torch.Tensor, m: torch.Tensor | None, q: float, rate: float,
                 steps: bool = True, graded: bool = False) -> dict:
    """What the encoder quantised: its ``y_hat``, coded state (``indexes``, ``symbols``), ``z_hat``
    and the (padded) image ``x_hat`` they synthesise (``steps=False``: step 1 everywhere;
    ``graded``: the steps of the quality map ``m + (1 - m) q``)."""
    with torch.no_grad():
        m = None if m is None else pad_to_multiple(m, 64)
        y = model.encode_latent(pad_to_multiple(x, 64), m, q, rate)
        latent = model.latent_codec
        z = latent.h_a(y)
        z_hat = latent.entropy_bottleneck.decompress(latent.entropy_bottleneck.compress(z), z.shape[-2:])
        quant = quantisation_steps(m, q, y.shape[-2:], graded) if steps else None
        state = latent.code_y(latent.side_int(z_hat), z_hat.dtype, quant, y=y)
        state["x_hat"] = model.decode_latent(state["y_hat"], z_hat, rate).clamp(0, 1)
        state["z_hat"] = z_hat
    return state


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from torch's seed 0, whatever ran before it: a model a test initialises
    (``tiny_model``, ``build_model``) is the same model in any test order or selection."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread_empty_hub(tmp_path_factory):
    """One thread (tiny images on a busy machine) and an empty torch hub, so no cached VGG weights;
    yields the hub folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        hub = tmp_path_factory.mktemp("hub")
        mp.setattr(torch.hub, "get_dir", lambda: str(hub))
        yield hub
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def clip_config(tmp_path_factory) -> Path:
    """:data:`TINY_CLIP` written as an open_clip model config file."""
    path = tmp_path_factory.mktemp("clip") / "tiny.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, checkpoint) of the tiny CLIP of :mod:`tiny_clip`, trained once per session (~30 s)."""
    from tiny_clip import train_tiny_clip

    return train_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def untrained() -> dict[str, ROICodec]:
    """Random-init tiny models of every variant, ready to code (tables built)."""
    torch.manual_seed(0)
    models = {}
    for variant in VARIANTS:
        model = tiny_model(variant).eval()
        model.update(force=True)
        models[variant] = model
    return models


_TRAINED: dict[str, ROICodec] = {}


@pytest.fixture(scope="session")
def trained():
    """``trained(variant)``: a tiny model trained 1000 steps on sample crops (cached)."""
    def get(variant: str) -> ROICodec:
        if variant not in _TRAINED:
            pairs = [image_and_mask(128, 128, seed) for seed in range(16)]
            images = torch.cat([p[0] for p in pairs])
            masks = torch.cat([p[1] for p in pairs])
            torch.manual_seed(0)
            model = tiny_model(variant)
            train_local(model, images, masks, steps=1000, batch=8, crop=64, lr=1e-3)
            _TRAINED[variant] = model
        return _TRAINED[variant]
    return get
