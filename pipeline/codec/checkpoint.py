"""Checkpoint files: save/load a codec variant with its config, coding state and fingerprint.

Format 2 (``roicodec-checkpoint/2``) carries the coding state built by ``update()``: the
CDF tables of both entropy models and the integer-exact hyper-decoder that selects y's
tables. Loading never rebuilds them, so every machine codes with the same integers.
A format-1 checkpoint (float weights only) is refused with the command that converts it.
"""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path
from typing import Any

import torch

from pipeline.codec.bitstream import FINGERPRINT_BYTES
from pipeline.codec.models import ROICodec, build_model, rename_prefixes

CHECKPOINT_FORMAT = "roicodec-checkpoint/2"
OLD_FORMATS = ("roicodec-checkpoint/1",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as a roicodec model."""


_FINGERPRINTS: "weakref.WeakKeyDictionary[ROICodec, tuple[tuple, bytes]]" = weakref.WeakKeyDictionary()


def fingerprint(model: ROICodec) -> bytes:
    """8 bytes identifying the model: a hash of its variant, config, parameters and coding state.

    Parameters and float buffers count as float32 (a copy cast to float64 or moved to a GPU
    keeps its fingerprint), integer buffers (CDF tables, the integer hyper-decoder) as int64.
    Cached per model until a tensor of its state changes (PyTorch's version counters).
    """
    state = model.state_dict()
    key = tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in state.items())
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256(f"{model.variant}:{sorted(model.config.items())}".encode())
    # tensors under the names they had before the codec was composed from parts, so a
    # checkpoint keeps its fingerprint and its files keep decoding
    old_names = dict(sorted(((new, old) for old, new in model.legacy_names().items()), key=lambda p: -len(p[0])))
    for name, t in sorted((rename_prefixes(k, old_names), v) for k, v in state.items()):
        t = t.detach().to("cpu")
        t = t.to(torch.float32) if t.is_floating_point() else t.to(torch.int64)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    digest = h.digest()[:FINGERPRINT_BYTES]
    _FINGERPRINTS[model] = (key, digest)
    return digest


def save_checkpoint(model: ROICodec, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (variant, config, weights, coding state) and ``extra`` metadata.

    The coding state (CDF tables, integer hyper-decoder) is built here if ``update()`` has
    not run, so every checkpoint can code as it is loaded.
    """
    if not model.coding_ready():
        model.update(force=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "variant": model.variant, "config": model.config,
                "state_dict": model.state_dict(), "extra": extra or {}}, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a half checkpoint
    return path


def _read(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for non-checkpoint files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from exc
    if not isinstance(blob, dict) or blob.get("format") not in (CHECKPOINT_FORMAT, *OLD_FORMATS):
        raise CheckpointError(f"{path} is not a roicodec checkpoint")
    return blob


def _model_from(blob: dict[str, Any], path: Path) -> ROICodec:
    model = build_model(blob["variant"], **blob["config"])
    try:
        model.load_state_dict(blob["state_dict"], strict=blob["format"] == CHECKPOINT_FORMAT)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: another layout of the variant
        lines = str(exc).splitlines()  # "Error(s) in loading state_dict ...:" then the problems
        problem = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path} does not fit this version's {blob['variant']} model "
                              f"(saved by an older layout?): {problem}") from None
    return model


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> ROICodec:
    """Load a checkpoint into an eval-mode model, coding state as saved (never rebuilt)."""
    path = Path(path)
    blob = _read(path, map_location)
    if blob["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a {blob['format']} checkpoint (floating-point entropy "
                              f"parameters, files not portable); convert it once with "
                              f"`roicodec convert {path} NEW.pt`")
    model = _model_from(blob, path)
    if not model.coding_ready():
        raise CheckpointError(f"{path} has no coding tables (written without update())")
    return model.eval()


def convert_checkpoint(src: str | Path, dst: str | Path) -> ROICodec:
    """Turn a format-1 (or current) checkpoint into the current format: build the CDF tables
    and the integer hyper-decoder from its float weights (no data needed) and save it."""
    src = Path(src)
    blob = _read(src, "cpu")
    model = _model_from(blob, src).eval()
    model.update(force=True)
    save_checkpoint(model, dst, extra=blob.get("extra") or {})
    return model


def checkpoint_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` metadata saved with a checkpoint (training step, metrics...)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True).get("extra", {})
