"""A tiny CLIP trained in about half a minute on generated scenes of coloured shapes, for text-mask tests.

Scenes are 64x64: a noisy grey background and 1-3 non-overlapping shapes of distinct colours
(red, green, blue, yellow) and kinds (square, circle, triangle), each captioned through
:data:`pipeline.masks.text.DEFAULT_TEMPLATES` ("a photo of a red square.").

Training is contrastive at the patch level, with open_clip's :class:`ClipLoss` as the only
objective: in each scene, one patch inside each shape and one background patch (captioned with
one of :data:`DEFAULT_BACKGROUND`, the words :class:`TextMasker` scores prompts against) are
matched to their captions against each other. The patch embeddings are the MaskCLIP ones that
:meth:`TextMasker.patch_embeddings` reads (the last block's value path), so what is trained is
what the service uses. Plain image-level training (the pooled image embedding against one caption
per single-shape image) did not localise reliably at this size: object patches matched their
captions, but background patches, which the pooled embedding barely depends on, were left
unconstrained and lit up for some captions (from 9 to 52 of 60 held-out shape masks within the
bounds, depending on seed, pooling and logit scale).

The logit scale is fixed at 4 (``init_logit_scale`` in :data:`DENSE_CLIP`, not trained).
TextMasker scores a prompt against 11 background words with CLIP's scale ``s`` as inverse
temperature, so a prompt wins a patch when its cosine beats the background's by about
``log(11) / s``: 0.6 at ``s = 4``, between what the trained model gives another shape's caption
(about 0.15) and the patch's own caption (about 1.3). A scale left to train stays near its
initial 14.3, where that margin (0.17) is within the cosines' spread and other shapes light up.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pipeline.masks.text import DEFAULT_BACKGROUND, DEFAULT_TEMPLATES, TextMasker

SIZE = 64
NOISE = 8.0  # background grain (standard deviation, 8-bit levels)
RADIUS = (8.0, 15.0)  # half-size of training shapes, pixels
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220), "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle", "triangle")
# TINY_CLIP with 8-pixel patches (an 8x8 grid: a shape spans a few patches), 16-token captions
# and a fixed logit scale of 4 (see the module docstring).
DENSE_CLIP = {
    "embed_dim": 32,
    "init_logit_scale": math.log(4.0),
    "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass
class Shape:
    """One drawn shape: colour and kind, centre and half-size in pixels."""

    colour: str
    kind: str
    x: float
    y: float
    r: float

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.kind}"


def _draw(draw: ImageDraw.ImageDraw, s: Shape, fill: int | tuple[int, int, int]) -> None:
    box = (s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r)
    if s.kind == "square":
        draw.rectangle(box, fill=fill)
    elif s.kind == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(s.x, s.y - s.r), (s.x + s.r, s.y + s.r), (s.x - s.r, s.y + s.r)], fill=fill)


def render(shapes: list[Shape], rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """A uint8 SIZExSIZEx3 scene of ``shapes`` on noisy grey, and each shape's boolean pixel mask."""
    back = rng.uniform(90, 170) + rng.normal(0, NOISE, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(back, 0, 255).astype(np.uint8))
    masks = []
    for s in shapes:
        _draw(ImageDraw.Draw(image), s, COLOURS[s.colour])
        region = Image.new("L", (SIZE, SIZE))
        _draw(ImageDraw.Draw(region), s, 255)
        masks.append(np.asarray(region) > 0)
    return np.array(image), masks


def random_shapes(rng: np.random.Generator, n: int, radius: tuple[float, float] = RADIUS) -> list[Shape]:
    """``n <= 3`` shapes of distinct colours and kinds at random places, 3 pixels apart at least."""
    colours, kinds = rng.permutation(list(COLOURS))[:n], rng.permutation(SHAPES)[:n]
    while True:
        rad = rng.uniform(*radius, n)
        xy = [rng.uniform(r + 1, SIZE - r - 1, 2) for r in rad]
        if all(np.hypot(*(xy[i] - xy[j])) > rad[i] + rad[j] + 3 for i in range(n) for j in range(i)):
            return [Shape(str(c), str(k), float(p[0]), float(p[1]), float(r))
                    for c, k, p, r in zip(colours, kinds, xy, rad)]


def scene(seed: int, n: int = 3, radius: tuple[float, float] = (11.0, 15.0)
          ) -> tuple[np.ndarray, list[Shape], list[np.ndarray]]:
    """A scene of ``n`` shapes drawn from ``seed`` (training uses its own generator): image, shapes, regions."""
    rng = np.random.default_rng(seed)
    shapes = random_shapes(rng, n, radius)
    image, regions = render(shapes, rng)
    return image, shapes, regions


def _cell(rng: np.random.Generator, region: np.ndarray, patch: int, inside: bool) -> int:
    """A random patch-grid cell (flat index) at least 90% inside ``region`` (the best covered one
    if none is), or, with ``inside=False``, one that ``region`` does not touch."""
    g = SIZE // patch
    cover = region.reshape(g, patch, g, patch).mean(axis=(1, 3)).ravel()
    return int(rng.choice(np.flatnonzero(cover >= min(cover.max(), 0.9) if inside else cover == 0)))


def training_scene(rng: np.random.Generator, patch: int) -> tuple[np.ndarray, list[str], list[int]]:
    """A scene of 1-3 shapes, its captions (the shapes', then a background word's) and, per caption,
    a random patch cell inside that shape (the background's: outside every shape)."""
    shapes = random_shapes(rng, int(rng.integers(1, 4)))
    image, regions = render(shapes, rng)
    texts = [s.caption for s in shapes] + [str(rng.choice(DEFAULT_BACKGROUND))]
    captions = [str(rng.choice(DEFAULT_TEMPLATES)).format(t) for t in texts]
    cells = [_cell(rng, r, patch, True) for r in regions] + [_cell(rng, np.any(regions, axis=0), patch, False)]
    return image, captions, cells


def patch_tokens(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP patch embeddings with gradients (the last block's value path only, as
    :meth:`TextMasker.patch_embeddings` reads them): (B, grid_h * grid_w, embed_dim), normalised."""
    x = visual.conv1(x).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = block(x) if visual.transformer.batch_first else block(x.transpose(0, 1)).transpose(0, 1)
    dim = last.attn.embed_dim
    v = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * dim:], last.attn.in_proj_bias[2 * dim:])
    x = x + last.ls_1(last.attn.out_proj(v))
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    return F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1)


def pixels(images: list[np.ndarray] | tuple[np.ndarray, ...], visual: torch.nn.Module) -> torch.Tensor:
    """uint8 SIZExSIZEx3 images as the image tower's normalised input, as TextMasker feeds it."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (visual.image_mean, visual.image_std))
    return (x - mean) / std


def _train(model: torch.nn.Module, tokenizer: Any, steps: int, scenes: int, seed: int, lr: float) -> None:
    """The training loop of :func:`train_tiny_clip`."""
    from open_clip.loss import ClipLoss

    patch = DENSE_CLIP["vision_cfg"]["patch_size"]
    rng, loss_fn = np.random.default_rng(seed), ClipLoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        images, captions, cells = zip(*(training_scene(rng, patch) for _ in range(scenes)))
        x = pixels(images, model.visual)
        text = F.normalize(model.encode_text(tokenizer([c for cs in captions for c in cs])), dim=-1)
        tokens, scale = patch_tokens(model.visual, x), model.logit_scale.exp()
        loss, start = 0.0, 0
        for i, cs in enumerate(cells):  # each scene's shapes and background against each other
            loss = loss + loss_fn(tokens[i, cs], text[start:start + len(cs)], scale) / scenes
            start += len(cs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def train_tiny_clip(folder: Path, steps: int = 600, scenes: int = 8, seed: int = 0,
                    lr: float = 2e-3) -> tuple[Path, Path]:
    """Train :data:`DENSE_CLIP` (``scenes`` scenes a step); write and return (config file, checkpoint)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "dense_clip.json"
    config.write_text(json.dumps(DENSE_CLIP))
    masker = TextMasker("tiny", None, config=config, device="cpu", seed=seed)  # the service's model and tokenizer
    model, tokenizer = masker.model.train().requires_grad_(True), masker.tokenizer
    model.logit_scale.requires_grad_(False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits, and stalls on a busy machine
    try:
        _train(model, tokenizer, steps, scenes, seed, lr)
    finally:
        torch.set_num_threads(threads)
    checkpoint = folder / "dense_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks."""
    return float((a & b).sum() / max((a | b).sum(), 1))
