"""The pretrained default model: the checkpoint installed with the package, used wherever a
checkpoint is not given (``roicodec compress/decompress/evaluate``, ``jobs/deploy.py``, the
service) and named by ``default`` (``--checkpoint default``, ``--init default``).

The file is package data, ``pipeline/models/`` + :data:`DEFAULT_FILE` (one committed version:
a better model replaces it). ``$ROICODEC_DEFAULT_CHECKPOINT`` names another file as the default
(a model of one's own, or a test's). How it was trained: ``configs/default_model.yaml`` and
docs/models.md.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from pipeline.codec.checkpoint import CheckpointError, checkpoint_file

DEFAULT = "default"
DEFAULT_FILE = "roicodec-default.pt"
ENV = "ROICODEC_DEFAULT_CHECKPOINT"
TRAIN_COMMAND = "python jobs/train.py --config configs/default_model.yaml"


def default_checkpoint() -> Path:
    """The default model's checkpoint file; :class:`CheckpointError` (one line saying what to
    do) when none is installed."""
    override = os.environ.get(ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise CheckpointError(f"${ENV} names {path}, which is not a file")
        return path
    path = Path(str(resources.files("pipeline") / "models" / DEFAULT_FILE))
    if not path.is_file():
        raise CheckpointError(f"no default model is installed ({path}): give --checkpoint CKPT, "
                              f"or train it with `{TRAIN_COMMAND}` (docs/models.md)")
    return path


def checkpoint_path(spec: str | os.PathLike | None) -> Path:
    """``spec`` as a checkpoint path: ``None`` or ``"default"`` is :func:`default_checkpoint`, a
    folder (a training checkpoint) its ``model.pt``."""
    if spec is None or str(spec) == DEFAULT:
        return default_checkpoint()
    return checkpoint_file(spec)
