"""The service's settings: :class:`ServeSettings` (``build_app``'s ``args``), whether
replicas get GPUs (:func:`resolve_use_gpu`) and the deployments' resources and
autoscaling (:func:`deployment_options`)."""

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.masks.saliency import DEFAULT_SALIENCY_MODEL
from pipeline.masks.text import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED


@dataclass
class ServeSettings:
    """Everything ``build_app`` accepts as ``args`` (``serve_config.yaml``) or ``jobs/deploy.py`` flags."""

    checkpoint: str | None = None          # a checkpoint file every replica can read (None: the default model)
    model_uri: str | None = None           # or models:/NAME@champion, models:/NAME/3, runs:/..., a path
    mlflow_tracking_uri: str | None = None  # for model_uri (default: mlflow_store.resolve_tracking_uri)
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED
    clip_config: Any = None                # open_clip config: a JSON path (read at build time) or a dict
    clip_download: bool = False
    text_masks: bool = True                # False: no CLIP model at all (prompts answer 503)
    saliency_model: str = DEFAULT_SALIENCY_MODEL
    saliency_weights: str | None = None    # a learned saliency model's weights file (u2net, u2netp)
    max_upload_mb: float = 20.0            # request bodies above this get 413 (header and bytes read)
    max_pixels: int = 2048 * 2048          # images (and bitstreams) above this get 413
    max_prompts: int = 8
    use_gpu: Any = "auto"                  # "auto": GPU replicas when torch sees a GPU at build time
    codec_num_gpus: float = 0.5            # codec and CLIP replicas share a GPU two by two
    mask_num_gpus: float = 0.5
    codec_num_cpus: float = 1.0
    mask_num_cpus: float = 0.5
    ingress_num_cpus: float = 0.25
    codec_replicas: Any = "auto"           # "auto": autoscaling; an int: that many, fixed
    codec_max_replicas: int = 4
    mask_replicas: Any = "auto"
    mask_max_replicas: int = 2
    ingress_max_replicas: int = 2
    torch_threads: int | None = None       # per model replica; default: its num_cpus (at least 1)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeSettings":
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown app argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        s = cls(**args)
        if s.checkpoint and s.model_uri:
            raise ValueError("give one of 'checkpoint' (a file) or 'model_uri' (models:/NAME@champion), "
                             "or neither for the installed default model")
        if not s.model_uri:
            # loaded (and checked: damaged, crafted, another format, no default installed) here,
            # once: a bad checkpoint is one CheckpointError line at start, not replicas that fail
            from pipeline.codec.checkpoint import load_checkpoint
            from pipeline.codec.default_model import checkpoint_path

            load_checkpoint(checkpoint_path(s.checkpoint or None))
        if isinstance(s.clip_config, (str, Path)):
            # read on the driver so replicas on other nodes need not see the file
            from pipeline.masks.text import load_clip_config

            s.clip_config = load_clip_config(s.clip_config)
        if not s.max_upload_mb > 0 or not s.max_pixels > 0 or not s.max_prompts > 0:
            raise ValueError("max_upload_mb, max_pixels and max_prompts must be positive")
        for name in ("codec_replicas", "mask_replicas"):
            value = getattr(s, name)
            if value in (None, "auto"):
                setattr(s, name, "auto")
            elif not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be 'auto' or a positive integer, got {value!r}")
        s.use_gpu = resolve_use_gpu(s.use_gpu)
        return s

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def resolve_use_gpu(value: Any) -> bool:
    """``"auto"`` -> whether torch sees a GPU here (the build happens where the driver runs)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            import torch

            return torch.cuda.is_available()
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"use_gpu must be auto, true or false, got {value!r}")
    return bool(value)


def deployment_options(s: ServeSettings) -> dict[str, dict[str, Any]]:
    """Replica resources and autoscaling of the three deployments (``.options()`` kwargs).

    The choices (see docs/serving.md):

    - ``CodecModel``: one request at a time per replica does the work (a lock around the
      model: the entropy coder is not assumed thread-safe and torch already uses every thread it
      is given), so ``max_ongoing_requests=4`` lets a short queue form on a replica while
      the router still sees which replica is busy; ``target_ongoing_requests=2`` adds a
      replica once, on average, every replica has one request running and one waiting.
      min 1 (a warm model is always there), max ``codec_max_replicas``; scale up after
      5 s of load, down after 60 s quiet (a replica costs a checkpoint load).
    - ``MaskModel``: same reasoning for the CLIP forward pass; fewer replicas (max 2 by
      default): only text and saliency requests reach it.
    - ``Gateway``: async and I/O-bound (it awaits the models; image decoding runs in a
      thread), so one replica holds many requests: ``max_ongoing_requests=64``, target 32,
      1 to ``ingress_max_replicas`` replicas; ``max_queued_requests=256`` makes the
      proxy answer 503 under overload instead of queueing without bound.
    - GPUs: when ``use_gpu``, codec and CLIP replicas ask for a fraction of a GPU
      (``codec_num_gpus``/``mask_num_gpus``, 0.5 each: both models are small).
    """
    def scaling(replicas: Any, max_replicas: int, target: float, max_ongoing: int) -> dict[str, Any]:
        if replicas != "auto":
            return {"num_replicas": int(replicas), "max_ongoing_requests": max_ongoing}
        return {"max_ongoing_requests": max_ongoing,
                "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1,
                                       "max_replicas": max(1, int(max_replicas)),
                                       "target_ongoing_requests": target,
                                       "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}}

    codec_actor: dict[str, Any] = {"num_cpus": s.codec_num_cpus}
    mask_actor: dict[str, Any] = {"num_cpus": s.mask_num_cpus}
    if s.use_gpu:
        codec_actor["num_gpus"] = s.codec_num_gpus
        if s.text_masks:
            mask_actor["num_gpus"] = s.mask_num_gpus
    return {
        "CodecModel": {"ray_actor_options": codec_actor, "max_queued_requests": 64,
                       **scaling(s.codec_replicas, s.codec_max_replicas, 2.0, 4)},
        "MaskModel": {"ray_actor_options": mask_actor, "max_queued_requests": 64,
                      **scaling(s.mask_replicas, s.mask_max_replicas, 2.0, 4)},
        "Gateway": {"ray_actor_options": {"num_cpus": s.ingress_num_cpus}, "max_queued_requests": 256,
                    **scaling("auto", s.ingress_max_replicas, 32.0, 64)},
    }
