"""Analysis/synthesis transforms by name: ``tlic``, ``tma`` (convolutional), ``sft``, ``swin``."""

from __future__ import annotations

from typing import Any

from pipeline.codec.transforms.base import Transforms
from pipeline.codec.transforms.conv import TLICTransforms, TMATransforms
from pipeline.codec.transforms.sft import SFTTransforms
from pipeline.codec.transforms.swin import SwinTransforms

TRANSFORMS: dict[str, type[Transforms]] = {t.name: t for t in (TLICTransforms, SFTTransforms, TMATransforms,
                                                                 SwinTransforms)}


def build_transforms(name: str, N: int, M: int, **options: Any) -> Transforms:
    """Transforms by name, e.g. ``build_transforms("tlic", 64, 96, alpha=0.2)``."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transforms {name!r}; choose from {sorted(TRANSFORMS)}")
    try:
        return TRANSFORMS[name](N, M, **options)
    except TypeError:
        raise ValueError(f"{name} transforms take no option(s) {', '.join(sorted(options))}") from None


__all__ = ["TRANSFORMS", "Transforms", "build_transforms"]
