"""Checkpoint files: save/load a codec variant with its config, and its fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from pipeline.codec.bitstream import FINGERPRINT_BYTES
from pipeline.codec.models import ROICodec, build_model

CHECKPOINT_FORMAT = "roicodec-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as a roicodec model."""


def fingerprint(model: ROICodec) -> bytes:
    """8 bytes identifying the model: a hash of its variant, config and parameters.

    Only learned parameters count (not the derived CDF tables), so a model and a
    copy that rebuilt its tables with ``update()`` share a fingerprint.
    """
    h = hashlib.sha256(f"{model.variant}:{sorted(model.config.items())}".encode())
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.digest()[:FINGERPRINT_BYTES]


def save_checkpoint(model: ROICodec, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (variant, config, weights, CDF tables) and ``extra`` metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "variant": model.variant, "config": model.config,
                "state_dict": model.state_dict(), "extra": extra or {}}, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a half checkpoint
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> ROICodec:
    """Load a checkpoint into an eval-mode model with its entropy-coding tables built."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for non-checkpoint files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from exc
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a roicodec checkpoint")
    model = build_model(blob["variant"], **blob["config"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:  # missing/unexpected keys or shapes: another layout of the variant
        lines = str(exc).splitlines()  # "Error(s) in loading state_dict ...:" then the problems
        problem = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path} does not fit this version's {blob['variant']} model "
                              f"(saved by an older layout?): {problem}") from None
    model.update(force=True)
    return model.eval()


def checkpoint_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` metadata saved with a checkpoint (training step, metrics...)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True).get("extra", {})
