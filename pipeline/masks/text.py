"""Dense text -> ROI mask with open_clip, training-free, the MaskCLIP way.

MaskCLIP (Zhou, Loy & Dai, "Extract Free Dense Labels from CLIP", ECCV 2022) reads
per-patch embeddings out of CLIP's image tower: the ViT runs as usual up to its last
block; in the last block the query-key attention is skipped and only the value path
is kept (``out_proj(v_proj(ln_1(x)))`` added to the residual, followed by the block's
MLP residual), then ``ln_post`` and the visual projection ``proj`` map every patch
token into the joint text-image space.

Each prompt is embedded as the mean of its embeddings over a few templates ("a photo
of {}.", ...). Normalisation (what a mask value means): for prompt ``p`` and patch
``x`` the value is the softmax probability of ``p`` against a fixed set of background
prompts ("sky", "wall", "grass", ...; a word equal to the prompt is left out),
with CLIP's logit scale as inverse temperature::

    P(p | x) = sigmoid(s * cos(x, t_p) - logsumexp_b(s * cos(x, t_b)))

So a value is high where the prompt explains the patch better than background does,
and an image without the object gets a low mask (no per-image min-max stretching).
Prompts are scored independently (they do not compete), several prompts are combined
by a pixelwise weighted max (:func:`pipeline.masks.ops.combine`), and the patch grid
is upsampled bilinearly to the image size. Images are resized (not cropped) to the
model's input size; the positional embedding is interpolated when ``input_size``
differs from the size the model was built for.

Weights: an open_clip pretrained tag, a local checkpoint file, ``hf-hub:ORG/REPO`` or
``local-dir:PATH`` as the model name, or none (random init, for tests and benchmarks;
seeded, so every process builds the same model). Downloads are off by default: a tag
whose weights are not in the local cache fails at once with :class:`ClipWeightsError`
instead of waiting on the network.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.masks.ops import MaskError, combine, resize

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_PRETRAINED = "openai"
RANDOM_INIT = ("none", "random")  # --clip-pretrained values meaning "no weights, random init"

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a close-up photo of {}.",
    "a photo of the {}.",
    "a bright photo of {}.",
    "a cropped photo of {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is {} in the scene.",
)
DEFAULT_BACKGROUND: tuple[str, ...] = (
    "background", "sky", "wall", "floor", "ground", "grass", "tree", "building", "road",
    "water", "texture",
)


class ClipWeightsError(MaskError):
    """The CLIP model or its weights cannot be loaded; names the option to fix."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


def load_clip_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """An open_clip model config from a JSON file or a mapping (bare, or under ``model_cfg``)."""
    if isinstance(config, Mapping):
        cfg = dict(config)
    else:
        try:
            cfg = json.loads(Path(config).read_text())
        except (OSError, ValueError) as exc:
            raise ClipWeightsError("--clip-config", f"cannot read {config}: {exc}") from exc
    cfg = dict(cfg.get("model_cfg", cfg))
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ClipWeightsError("--clip-config", f"not an open_clip model config (missing {', '.join(missing)})")
    return cfg


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _cached_tag_weights(cfg: Mapping[str, Any]) -> str | None:
    """Local path of a pretrained tag's weights if already downloaded (HF or URL cache)."""
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" means the default file
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, "open_clip_model.safetensors")
        for name in candidates:
            path = try_to_load_from_cache(repo, name)
            if isinstance(path, str):
                return path
    if cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if path.is_file():
            return str(path)
    return None


@dataclass
class ClipLoadPlan:
    """How to build the model: open_clip arguments, plus a checkpoint to load afterwards."""

    model_name: str
    option: str  # the option to blame when loading fails
    kwargs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    checkpoint: str | None = None


def plan_clip_load(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
                   *, config: str | Path | Mapping[str, Any] | None = None,
                   allow_download: bool = False) -> ClipLoadPlan:
    """Check that a model and its weights can be loaded, without loading them.

    Cheap (no network, no weights read): raises :class:`ClipWeightsError` naming
    ``--clip-model``, ``--clip-pretrained`` or ``--clip-config`` when they cannot.
    """
    random_init = pretrained is None or pretrained.strip().lower() in ("",) + RANDOM_INIT
    if config is not None:
        plan = ClipLoadPlan(model_name, "--clip-config", config=load_clip_config(config))
        if not random_init:
            if not os.path.isfile(pretrained):
                raise ClipWeightsError("--clip-pretrained", f"with --clip-config the weights must be a local "
                                                            f"checkpoint file; {pretrained!r} does not exist")
            plan.checkpoint, plan.option = pretrained, "--clip-pretrained"
        return plan
    if model_name.startswith("local-dir:"):
        if not Path(model_name[len("local-dir:"):]).is_dir():
            raise ClipWeightsError("--clip-model", f"{model_name!r}: no such directory")
        return ClipLoadPlan(model_name, "--clip-model")
    if model_name.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_name[len("hf-hub:"):], "open_clip_config.json")
        if isinstance(cached, str):
            snapshot = Path(cached).parent
            if any(snapshot.glob(pattern) for pattern in ("*.safetensors", "*.bin", "*.pth")):
                return ClipLoadPlan(f"local-dir:{snapshot}", "--clip-model")
        if not allow_download:
            raise ClipWeightsError("--clip-model", f"{model_name!r} is not in the local Hugging Face cache and "
                                                   "downloads are off (allow them with --clip-download)")
        return ClipLoadPlan(model_name, "--clip-model")

    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    arch = model_name.replace("/", "-")
    if open_clip.get_model_config(arch) is None:
        raise ClipWeightsError("--clip-model", f"unknown open_clip model {model_name!r} (see "
                                               "open_clip.list_models(); or hf-hub:ORG/REPO, local-dir:PATH)")
    if random_init:
        return ClipLoadPlan(arch, "--clip-model")
    if os.path.isfile(pretrained):
        return ClipLoadPlan(arch, "--clip-pretrained", {"pretrained": pretrained})
    tag_cfg = get_pretrained_cfg(arch, pretrained)
    if not tag_cfg:
        if _looks_like_path(pretrained):
            raise ClipWeightsError("--clip-pretrained", f"checkpoint file {pretrained!r} does not exist")
        tags = ", ".join(list_pretrained_tags_by_model(arch)) or "none"
        raise ClipWeightsError("--clip-pretrained", f"{pretrained!r} is neither a checkpoint file nor a "
                                                    f"pretrained tag of {arch} (tags: {tags})")
    kwargs: dict[str, Any] = {"force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
    local = _cached_tag_weights(tag_cfg)
    if local is not None:
        kwargs["pretrained"] = local
        preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        if preprocess:
            kwargs["force_preprocess_cfg"] = preprocess
    elif allow_download:
        kwargs["pretrained"] = pretrained
    else:
        raise ClipWeightsError("--clip-pretrained", f"weights {arch}/{pretrained} are not in the local cache and "
                                                    "downloads are off; pass a checkpoint file, or allow "
                                                    "downloading with --clip-download")
    return ClipLoadPlan(arch, "--clip-pretrained", kwargs)


def _build(plan: ClipLoadPlan, device: torch.device, seed: int) -> tuple[torch.nn.Module, Any]:
    """Create the model (random parts seeded) and its tokenizer following a plan."""
    import open_clip

    with tempfile.TemporaryDirectory(prefix="roicodec-clip-") as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        name = plan.model_name
        if plan.config is not None:  # an architecture from JSON: open_clip's local-dir schema
            (Path(tmp) / "open_clip_config.json").write_text(json.dumps({"model_cfg": plan.config}))
            name = f"local-dir:{tmp}"
        try:
            model = open_clip.create_model(name, device=device, **plan.kwargs)
            if plan.checkpoint is not None:
                open_clip.load_checkpoint(model, plan.checkpoint)
                model.to(device)
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # open_clip raises many kinds; one line naming the option
            raise ClipWeightsError(plan.option, f"cannot load {plan.model_name}: {_first_line(exc)}") from exc
    return model.eval().requires_grad_(False), tokenizer


def _check_dense_capable(model: torch.nn.Module, model_name: str) -> None:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(model, "visual", None)
    ok = (isinstance(visual, VisionTransformer) and visual.attn_pool is None and visual.proj is not None
          and all(isinstance(b, ResidualAttentionBlock) and isinstance(b.attn, torch.nn.MultiheadAttention)
                  for b in visual.transformer.resblocks))
    if not ok:
        raise ClipWeightsError("--clip-model", f"{model_name} has no plain open_clip ViT image tower; "
                                               "dense text masks need one (e.g. ViT-B-16)")


def _plain(prompt: str) -> str:
    words = prompt.lower().split()
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


class TextMasker:
    """A loaded open_clip model turning images and text prompts into dense ROI masks.

    Load once, call many times: text embeddings are cached per prompt.
    """

    def __init__(self, model_name: str = DEFAULT_CLIP_MODEL, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
                 *, config: str | Path | Mapping[str, Any] | None = None, device: str | None = None,
                 input_size: int | None = None, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 background: Sequence[str] = DEFAULT_BACKGROUND, allow_download: bool = False,
                 seed: int = 0) -> None:
        plan = plan_clip_load(model_name, pretrained, config=config, allow_download=allow_download)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer = _build(plan, self.device, seed)
        _check_dense_capable(self.model, model_name)
        visual = self.model.visual
        self.input_size: tuple[int, int] = (input_size, input_size) if input_size else tuple(visual.image_size)
        patch = visual.patch_size
        if self.input_size[0] % patch[0] or self.input_size[1] % patch[1]:
            raise MaskError(f"CLIP input size {self.input_size} is not a multiple of the patch size {patch}")
        self.grid = (self.input_size[0] // patch[0], self.input_size[1] // patch[1])
        self.templates = tuple(templates)
        self.background = tuple(background)
        if not self.templates or not self.background:
            raise MaskError("text masks need at least one prompt template and one background prompt")
        self.logit_scale = float(min(self.model.logit_scale.exp().item(), 100.0))
        self._mean = torch.tensor(visual.image_mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(visual.image_std, device=self.device).view(1, 3, 1, 1)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._pos_embed = self._interpolated_pos_embed()

    def _interpolated_pos_embed(self) -> torch.Tensor:
        visual = self.model.visual
        pos = visual.positional_embedding
        if self.grid == tuple(visual.grid_size):
            return pos
        width = pos.shape[-1]
        grid = pos[1:].reshape(1, *visual.grid_size, width).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=self.grid, mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, width)])

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        size = (self.input_size[1], self.input_size[0])  # PIL: (width, height)
        batch = np.stack([np.asarray(Image.fromarray(np.asarray(im, np.uint8)).resize(size, Image.BICUBIC))
                          for im in images])
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def patch_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """MaskCLIP patch embeddings, L2-normalised: (B, grid_h, grid_w, embed_dim)."""
        visual = self.model.visual
        x = visual.conv1(self._pixels(images))
        b = x.shape[0]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.to(x.dtype).expand(b, 1, -1), x], dim=1)
        x = visual.ln_pre(x + self._pos_embed.to(x.dtype))
        blocks = visual.transformer.resblocks
        batch_first = visual.transformer.batch_first
        x = x if batch_first else x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        x = x if batch_first else x.transpose(0, 1)
        last = blocks[-1]
        attn = last.attn
        dim = attn.embed_dim
        v_weight = attn.in_proj_weight[2 * dim:] if attn._qkv_same_embed_dim else attn.v_proj_weight
        v_bias = attn.in_proj_bias[2 * dim:] if attn.in_proj_bias is not None else None
        x = x + last.ls_1(attn.out_proj(F.linear(last.ln_1(x), v_weight, v_bias)))  # value path only
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
        tokens = visual.ln_post(x[:, 1:]) @ visual.proj
        return F.normalize(tokens, dim=-1).reshape(b, *self.grid, -1)

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Template-averaged, L2-normalised text embeddings (P, embed_dim), cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            texts = [t.format(p) for p in missing for t in self.templates]
            emb = F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)), dim=-1)
            emb = F.normalize(emb.view(len(missing), len(self.templates), -1).mean(dim=1), dim=-1)
            self._text_cache.update(zip(missing, emb))
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.inference_mode()
    def prompt_probabilities(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """Per-patch probability of each prompt against the background set: (B, P, grid_h, grid_w)."""
        prompts = [p.strip() for p in prompts]
        if not prompts or not all(prompts):
            raise MaskError("text masks need at least one non-empty prompt")
        if not images:
            return np.zeros((0, len(prompts), *self.grid), np.float32)
        feats = self.patch_embeddings(images)
        s_prompt = self.logit_scale * feats @ self.text_embeddings(prompts).T  # (B, h, w, P)
        s_back = self.logit_scale * feats @ self.text_embeddings(self.background).T  # (B, h, w, K)
        # each prompt against the background words other than itself: prompts stay independent
        same = torch.tensor([[_plain(b) == _plain(p) for b in self.background] for p in prompts],
                            device=s_back.device)
        s_back = s_back[..., None, :].masked_fill(same, float("-inf"))  # (B, h, w, P, K)
        prob = torch.sigmoid(s_prompt - torch.logsumexp(s_back, dim=-1))
        return prob.permute(0, 3, 1, 2).float().cpu().numpy()

    def masks(self, images: Sequence[np.ndarray], prompts: Sequence[str],
              weights: Sequence[float] | None = None) -> list[np.ndarray]:
        """One mask per image (float32 HxW in [0, 1], each image's size): the prompts' weighted max."""
        if weights is not None and len(weights) != len(prompts):
            raise MaskError(f"got {len(weights)} prompt weights for {len(prompts)} prompts")
        probs = self.prompt_probabilities(images, prompts)
        return [resize(combine(list(p), weights), np.shape(im)[:2]) for p, im in zip(probs, images)]

    def __call__(self, image: np.ndarray, prompts: Sequence[str] | str,
                 weights: Sequence[float] | None = None) -> np.ndarray:
        """The mask of one uint8 HxWx3 image for one or several prompts."""
        return self.masks([image], [prompts] if isinstance(prompts, str) else list(prompts), weights)[0]


@lru_cache(maxsize=2)
def get_text_masker(model_name: str = DEFAULT_CLIP_MODEL, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
                    config: str | None = None, allow_download: bool = False) -> TextMasker:
    """A process-wide :class:`TextMasker` per setting (loaded on first use, then reused)."""
    return TextMasker(model_name, pretrained, config=config, allow_download=allow_download)
