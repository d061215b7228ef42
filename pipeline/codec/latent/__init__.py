"""Latent structures by name: ``hyperprior`` (mean-scale) and ``context`` (channel groups x checkerboard)."""

from __future__ import annotations

from typing import Any

from pipeline.codec.entropy import EntropyFamily
from pipeline.codec.latent.base import LatentStructure
from pipeline.codec.latent.context import ContextLatent, default_groups
from pipeline.codec.latent.hyperprior import HyperpriorLatent

STRUCTURES: dict[str, type[LatentStructure]] = {s.name: s for s in (HyperpriorLatent, ContextLatent)}


def build_latent(name: str, N: int, M: int, family: EntropyFamily, **options: Any) -> LatentStructure:
    """A latent structure by name around ``family``."""
    if name not in STRUCTURES:
        raise ValueError(f"unknown entropy model {name!r}; choose from {list(STRUCTURES)}")
    return STRUCTURES[name](N, M, family, **options)


__all__ = ["STRUCTURES", "ContextLatent", "HyperpriorLatent", "LatentStructure", "build_latent", "default_groups"]
