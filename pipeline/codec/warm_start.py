"""Warm start: initialise a codec variant from CompressAI's pretrained mean-scale hyperprior.

Every variant is built on the transforms and hyperprior of CompressAI's
``MeanScaleHyperprior`` (Minnen et al. 2018, zoo name ``mbt2018-mean``), so its
pretrained weights carry over. What each variant does with them
(:meth:`~pipeline.codec.models.ROICodec.warm_start_names` and ``adapt_warm_start``):

- ``tlic``: ``g_a``/``g_s``/``h_a``/``h_s`` and the entropy bottleneck as they are;
- ``sft``/``ggm``: the same tensors in their per-scale layers, SFT blocks at the identity;
- ``tma``: the mask input channel of the first convolution at zero, the latent mask
  attention at its prior (the identity at uniform quality);
- ``ggm``: the hyper-decoder's scale outputs times sqrt(2) and its shape outputs at
  beta = 2, the generalized Gaussian equal to the Gaussian the weights were trained with;
- ``swin``: refused (its Swin transforms have no counterpart in those weights); our own
  ``swin`` checkpoints warm-start it.

The gain units are the identity at the rate point whose lambda is nearest the one the
weights were trained for and ``sqrt(lambda_i / lambda_k)`` at the others (high-rate
theory: the best quantiser step goes as ``lambda^-1/2``). At that rate point and
uniform quality, ``tlic``, ``sft`` and ``tma`` then compute exactly what the pretrained
model computes. Everything else starts fresh and is listed in the :class:`WarmStartReport`.

Sources (:func:`load_init_source`): ``compressai:mbt2018-mean:Q`` (the zoo's MSE weights of
quality Q, read from the torch hub cache: nothing is downloaded), a file holding a
CompressAI state dict (``torch.save(net.state_dict())`` or CompressAI's training
checkpoint ``{"state_dict": ...}``), or one of our checkpoints of the same variant.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import torch
from torch import Tensor

from pipeline.codec.checkpoint import CheckpointError, checkpoint_file, checkpoint_state_dict
from pipeline.codec.default_model import DEFAULT, default_checkpoint
from pipeline.codec.models import ROICodec, build_model, rename_prefixes

ZOO_PREFIX = "compressai:"
ZOO_ARCHITECTURE = "mbt2018-mean"
# The lambdas CompressAI trained its MSE zoo models with, by quality (its documentation).
ZOO_LAMBDAS = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.1800}
# The sub-modules whose parameters a MeanScaleHyperprior state dict provides.
HYPERPRIOR_MODULES = ("g_a", "g_s", "h_a", "h_s", "entropy_bottleneck")


class InitError(ValueError):
    """Init weights that cannot be found, read or fitted; the message is one line."""


@dataclass
class InitSource:
    """Weights to start from: ``state`` in CompressAI's ``MeanScaleHyperprior`` key layout
    (``kind="compressai"``) or a roicodec checkpoint's state dict (``kind="roicodec"``)."""

    spec: str
    path: Path
    kind: str
    state: dict[str, Tensor]
    N: int
    M: int
    trained_lambda: float | None = None  # the zoo quality's lambda; None when unknown
    variant: str | None = None  # roicodec checkpoints only
    sha256: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)  # roicodec checkpoints: what built the model

    def describe(self) -> str:
        lam = f", lambda {self.trained_lambda:g}" if self.trained_lambda is not None else ""
        what = f"{self.variant} checkpoint" if self.kind == "roicodec" else "MeanScaleHyperprior weights"
        return f"{self.spec}: {what} N={self.N} M={self.M}{lam} ({self.path}, sha256 {self.sha256[:12]})"


@dataclass
class WarmStartReport:
    """What a warm start did: copied tensors, adapted ones (why), fresh layers, unused source tensors."""

    source: str
    copied: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    rate_point: int | None = None
    rate_lambdas: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "copied": self.copied, "adapted": self.adapted, "fresh": self.fresh,
                "unused": self.unused, "rate_point": self.rate_point, "rate_lambdas": self.rate_lambdas}

    def lines(self) -> list[str]:
        """A human summary, one fact per line (the training job prints it)."""
        out = [f"warm start from {self.source}",
               f"  {len(self.copied)} tensors copied, {len(self.adapted)} adapted, "
               f"{len(self.fresh)} layers fresh"]
        out += [f"  adapted {name}: {why}" for name, why in self.adapted.items()]
        if self.fresh:
            out.append(f"  fresh (not in the weights): {', '.join(self.fresh)}")
        if self.unused:
            out.append(f"  unused source tensors: {', '.join(self.unused)}")
        if self.rate_point is not None:
            lam = self.rate_lambdas[self.rate_point]
            out.append(f"  gain units: identity at rate point {self.rate_point} (lambda {lam:g}), "
                       f"sqrt(lambda ratio) at the others")
        return out


# -- sources ------------------------------------------------------------------------------------

def zoo_weights_path(quality: int, architecture: str = ZOO_ARCHITECTURE) -> tuple[Path, str]:
    """Where ``torch.hub`` caches the zoo's MSE weights of ``quality``, and their download URL."""
    from compressai.zoo.image import model_urls

    try:
        url = model_urls[architecture]["mse"][quality]
    except KeyError:
        raise InitError(f"CompressAI publishes no {architecture} MSE weights of quality {quality} "
                        f"(qualities {min(ZOO_LAMBDAS)}-{max(ZOO_LAMBDAS)})") from None
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path), url


def _parse_zoo(spec: str) -> int:
    parts = spec[len(ZOO_PREFIX):].split(":")
    if len(parts) != 2 or not parts[1].isdigit():
        raise InitError(f"zoo weights are named compressai:{ZOO_ARCHITECTURE}:QUALITY, got {spec!r}")
    if parts[0] != ZOO_ARCHITECTURE:
        raise InitError(f"only CompressAI's {ZOO_ARCHITECTURE} shares our transforms and hyperprior, "
                        f"got {parts[0]!r}")
    quality = int(parts[1])
    if quality not in ZOO_LAMBDAS:
        raise InitError(f"{ZOO_ARCHITECTURE} qualities are {min(ZOO_LAMBDAS)}-{max(ZOO_LAMBDAS)}, got {quality}")
    return quality


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for files that are not tensors
        raise InitError(f"{path} is not a readable state dict or checkpoint ({type(exc).__name__})") from None


def _hyperprior_state(blob: Any, path: Path) -> dict[str, Tensor]:
    """A CompressAI state dict in the current ``MeanScaleHyperprior`` key names, checked."""
    from compressai.models import MeanScaleHyperprior
    from compressai.models.utils import remap_old_keys
    from compressai.zoo.pretrained import load_pretrained

    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]  # CompressAI's examples/train.py checkpoint
    if not isinstance(blob, dict) or not all(isinstance(v, Tensor) for v in blob.values()):
        raise InitError(f"{path} holds no state dict of tensors")
    state = dict(remap_old_keys("entropy_bottleneck", load_pretrained(blob)))
    for key in ("g_a.0.weight", "g_a.6.weight"):
        if key not in state:
            raise InitError(f"{path} is not a mean-scale hyperprior state dict: no tensor {key}")
    reference = MeanScaleHyperprior(state["g_a.0.weight"].shape[0], state["g_a.6.weight"].shape[0])
    for name, p in reference.named_parameters():
        if name not in state:
            raise InitError(f"{path} does not fit a MeanScaleHyperprior: no tensor {name}")
        if tuple(state[name].shape) != tuple(p.shape):
            raise InitError(f"{path} does not fit a MeanScaleHyperprior: {name} has shape "
                            f"{tuple(state[name].shape)}, expected {tuple(p.shape)}")
    return state


def load_init_source(spec: str) -> InitSource:
    """Resolve ``--init``: ``compressai:mbt2018-mean:Q`` (torch hub cache), ``default`` (the
    installed pretrained model) or a file path."""
    trained_lambda = None
    if spec.startswith(ZOO_PREFIX):
        quality = _parse_zoo(spec)
        path, url = zoo_weights_path(quality)
        if not path.is_file():
            raise InitError(f"{spec}: pretrained weights not in the torch hub cache, expected {path} "
                            f"(nothing is downloaded here: fetch {url} into {path.parent}, or point "
                            f"TORCH_HOME at a cache that has it)")
        digest = _sha256(path)
        prefix = re.search(r"-([a-f0-9]+)\.", path.name)
        if prefix and not digest.startswith(prefix.group(1)):
            raise InitError(f"{path} is damaged: its SHA-256 does not start with {prefix.group(1)} as its name says")
        trained_lambda = ZOO_LAMBDAS[quality]
    elif spec == DEFAULT:
        try:
            path = default_checkpoint()
        except CheckpointError as exc:
            raise InitError(str(exc)) from None
        digest = _sha256(path)
    else:
        given = Path(spec).expanduser()
        path = checkpoint_file(given)  # a training checkpoint folder: its model.pt
        if not path.is_file():
            raise InitError(f"init weights not found: {given}")
        digest = _sha256(path)
    blob = _read(path)
    if isinstance(blob, dict) and str(blob.get("format", "")).startswith("roicodec-checkpoint/"):
        cfg = blob.get("config") or {}
        return InitSource(spec, path, "roicodec", checkpoint_state_dict(blob), int(cfg.get("N", 0)),
                          int(cfg.get("M", 0)), None, blob.get("variant"), digest, dict(cfg))
    state = _hyperprior_state(blob, path)
    return InitSource(spec, path, "compressai", state, state["g_a.0.weight"].shape[0],
                      state["g_a.6.weight"].shape[0], trained_lambda, None, digest)


# -- applying ----------------------------------------------------------------------------------

def _fresh_layers(fresh: Sequence[str], all_names: Sequence[str]) -> list[str]:
    """Fresh parameters named by the largest modules that hold nothing else (``g_a.sfts``, ``g_a.attention``)."""
    fresh_set, out = set(fresh), set()
    for name in fresh:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if all(n in fresh_set for n in all_names if n == prefix or n.startswith(prefix + ".")):
                out.add(prefix)
                break
    return sorted(out)


def _shape_error(model: ROICodec, source: InitSource, name: str, got: tuple, want: tuple) -> InitError:
    return InitError(f"{source.spec} does not fit {model.variant} (N={model.N}, M={model.M}): {name} has shape "
                     f"{got} in the weights, the model needs {want} (the weights are N={source.N}, M={source.M})")


def nearest_rate_point(rate_lambdas: Sequence[float], trained_lambda: float) -> int:
    """The rate point whose lambda is nearest ``trained_lambda`` on a log scale."""
    return min(range(len(rate_lambdas)), key=lambda i: abs(math.log(rate_lambdas[i] / trained_lambda)))


@torch.no_grad()
def _set_gains(model: ROICodec, rate_lambdas: Sequence[float], point: int) -> None:
    lam = torch.tensor([float(v) for v in rate_lambdas], dtype=torch.float64)
    gains = torch.sqrt(lam / lam[point]).to(model.gain.gain.dtype)[:, None].expand_as(model.gain.gain)
    model.gain.gain.copy_(gains)
    model.gain.inverse_gain.copy_(1.0 / gains)


@torch.no_grad()
def warm_start(model: ROICodec, source: InitSource, rate_lambdas: Sequence[float] | None = None,
               trained_lambda: float | None = None) -> WarmStartReport:
    """Copy ``source``'s weights into ``model`` (in place) as described in the module docstring.

    ``rate_lambdas``: the lambda of each of the model's rate points (``rate_lambdas()`` of the
    training run); ``trained_lambda``: the lambda the weights were trained for (default: the
    zoo quality's; for a file, the middle rate point). Raises :class:`InitError` naming the
    first tensor that does not fit.
    """
    report = WarmStartReport(source.describe())
    own = dict(model.named_parameters())
    if source.kind == "roicodec":
        if source.variant != model.variant:
            raise InitError(f"{source.path} is a {source.variant} checkpoint; a warm start from our checkpoints "
                            f"needs the same variant ({model.variant}); CompressAI weights fit every variant")
        state = model.upgrade_state_dict(source.state)
        for name, p in own.items():
            if name not in state:
                report.fresh.append(name)
                continue
            if tuple(state[name].shape) != tuple(p.shape):
                raise _shape_error(model, source, name, tuple(state[name].shape), tuple(p.shape))
            p.copy_(state[name])
            report.copied.append(name)
        report.fresh = _fresh_layers(report.fresh, list(own))
        return report

    if not model.warm_startable:
        raise InitError(f"CompressAI's mean-scale hyperprior has no weights for {model.variant}'s transforms; train "
                        f"{model.variant} from random weights, or warm-start it from one of our {model.variant} "
                        "checkpoints")
    renames = model.warm_start_names()
    buffers = dict(model.named_buffers())
    targets: dict[str, str] = {}
    for name, tensor in source.state.items():
        if not name.startswith(tuple(m + "." for m in HYPERPRIOR_MODULES)):
            continue
        target = rename_prefixes(name, renames)
        if target not in own:  # a buffer (CDF tables, bounds): rebuilt or constant here
            if target not in buffers:
                report.unused.append(name)
            continue
        value, note = model.adapt_warm_start(target, tensor)
        if tuple(value.shape) != tuple(own[target].shape):
            raise _shape_error(model, source, name, tuple(tensor.shape), tuple(own[target].shape))
        own[target].copy_(value)
        targets[target] = name
        if note:
            report.adapted[target] = note
        else:
            report.copied.append(target)
    model.finish_warm_start(report.adapted)
    report.fresh = _fresh_layers([n for n in own if n not in targets and n not in report.adapted
                                  and not n.startswith("gain.")], list(own))
    if rate_lambdas is not None:
        report.rate_lambdas = [float(v) for v in rate_lambdas]
        if len(report.rate_lambdas) != model.n_rates:
            raise InitError(f"{len(report.rate_lambdas)} lambdas given for {model.n_rates} rate points")
        lam = trained_lambda or source.trained_lambda
        report.rate_point = (nearest_rate_point(report.rate_lambdas, lam) if lam is not None
                             else model.n_rates // 2)
        _set_gains(model, report.rate_lambdas, report.rate_point)
    else:
        report.fresh.append("gain")
    return report


def rate_of_point(model: ROICodec, point: int) -> float:
    """The continuous ``rate`` in [0, 1] of trained rate point ``point``."""
    return point / (model.n_rates - 1) if model.n_rates > 1 else 1.0


def warm_started(variant: str, spec: str, rate_lambdas: Sequence[float], trained_lambda: float | None = None,
                 **config: Any) -> tuple[ROICodec, WarmStartReport]:
    """Build ``variant`` with one rate point per lambda (N and M default to the weights'; the rest of
    the model options to a checkpoint's of the same variant) and warm-start it from ``spec`` (see
    :func:`load_init_source`)."""
    source = load_init_source(spec)
    base = source.model_config if source.kind == "roicodec" and source.variant == variant else {}
    config = {**base, "N": source.N, "M": source.M, **config, "n_rates": len(rate_lambdas)}
    model = build_model(variant, **config)
    return model, warm_start(model, source, rate_lambdas, trained_lambda)
