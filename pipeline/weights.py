"""Reading a model's weights file (a state dict, as training scripts save them)."""

from __future__ import annotations

from pathlib import Path

import torch


def read_state_dict(path: str | Path, error: type[Exception], what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a weights file, never executing code (``weights_only``).

    Accepts a state dict, or one under ``state_dict`` / ``model`` (training checkpoints);
    DataParallel's ``module.`` key prefix is dropped. Raises ``error`` with one line when
    the file cannot be read or holds no state dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for files that are not tensors
        raise error(f"cannot read {what} {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                    ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"{what} {path} hold no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
