"""Checkpoint files: save/load a codec variant with its config, coding state and fingerprint.

Format 2 (``roicodec-checkpoint/2``) carries the coding state built by ``update()``: the
CDF tables of both entropy models and the integer-exact hyper-decoder that selects y's
tables. Loading never rebuilds them, so every machine codes with the same integers.
A format-1 checkpoint (float weights only) is refused with the command that converts it.

A checkpoint is input like any file: loading never runs code from it (``weights_only``), checks
the zip archive's checksums, the blob's layout, every config option's type and range before a
model is built (N, M and every width at most :data:`MAX_WIDTH`, so a crafted config cannot ask
for gigabytes), refuses tensors that declare more elements than they hold (an expanded view
would make a coding table gigabytes when loaded), and compares the weights with the fingerprint
the checkpoint records (written since 2026-12; older checkpoints have none and still load).
Every failure is one :class:`CheckpointError` line.

Format 3 (``roicodec-checkpoint/3``, written now) is format 2 stored compactly, every bit
kept (``layout`` says what was packed, :func:`unpack_state_dict` restores it): each CDF
table (``*._quantized_cdf``, rows padded with zeros to the longest) as its rows' own
``_cdf_length`` entries end to end, 0/1 float masks (CompressAI's masked convs) as bool, and
int64 tensors whose values fit int16 (the integer hyper-decoder's weights, |w| < 2^15) as int16.
In memory everything keeps its dtype (DDP's broadcast takes no int16 on gloo); format-2 files
load as they are. Older code refuses a format-3 file by its format string, rather
than loading packed tables as padded ones.
"""

from __future__ import annotations

import hashlib
import math
import weakref
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.codec.bitstream import FINGERPRINT_BYTES
from pipeline.codec.models import ROICodec, build_model, rename_prefixes

CHECKPOINT_FORMAT = "roicodec-checkpoint/3"
CODING_FORMATS = ("roicodec-checkpoint/2", CHECKPOINT_FORMAT)  # with the coding state
OLD_FORMATS = ("roicodec-checkpoint/1",)
MODEL_FILE = "model.pt"  # the checkpoint file in a training checkpoint folder
CDF_SUFFIX, LENGTH_SUFFIX = "_quantized_cdf", "_cdf_length"
MAX_PADDING = 64  # a table padded over its rows' own entries: 7.6x at most in our models (trained or not)
NARROW_MAX = torch.iinfo(torch.int16).max
MASK_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as a roicodec model."""


# -- what a checkpoint's config may ask for -------------------------------------------------------
MAX_WIDTH = 512      # N, M and every channel width: at the bounds a model stays near 1 GB of float32
MAX_RATES = 64       # rate points of the gain units
MAX_GROUPS = 16      # channel groups of the context model
MAX_DEPTH = 8        # blocks per swin stage
MAX_WINDOW = 32      # swin attention windows
MAX_KERNEL = 31      # tlic's smoothing kernel


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_in(lo: int, hi: int, none: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if none and v is None:
            return None
        return None if _is_int(v) and lo <= v <= hi else f"an integer in [{lo}, {hi}]" + (" or None" if none else "")
    return check


def _number(none: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if none and v is None:
            return None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return None if ok else "a finite number" + (" or None" if none else "")
    return check


def _ints(lo_len: int, hi_len: int, lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = (isinstance(v, (list, tuple)) and lo_len <= len(v) <= hi_len
              and all(_is_int(x) and lo <= x <= hi for x in v))
        count = f"{lo_len}" if lo_len == hi_len else f"{lo_len} to {hi_len}"
        return None if ok else f"a list of {count} integers in [{lo}, {hi}]"
    return check


def _one_of(names: Callable[[], list[str]]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if isinstance(v, str) and v in names() else f"one of {', '.join(names())}"
    return check


def _structures() -> list[str]:
    from pipeline.codec.latent import STRUCTURES
    return list(STRUCTURES)


def _families() -> list[str]:
    from pipeline.codec.entropy import FAMILIES
    return list(FAMILIES)


def _beta_modes() -> list[str]:
    from pipeline.codec.entropy.families import GeneralizedGaussianFamily
    return list(GeneralizedGaussianFamily.BETA_MODES)


# every option a part's constructor takes (tests/test_checkpoint_files.py checks none is missing)
CONFIG_OPTIONS: dict[str, Callable[[Any], str | None]] = {
    "N": _int_in(1, MAX_WIDTH), "M": _int_in(1, MAX_WIDTH), "n_rates": _int_in(1, MAX_RATES),
    # latent structure
    "entropy": _one_of(_structures), "groups": _ints(1, MAX_GROUPS, 1, MAX_WIDTH),
    "context_hidden": _int_in(1, MAX_WIDTH, none=True),
    # entropy family
    "family": _one_of(_families), "beta_mode": _one_of(_beta_modes),
    # transforms: tlic, tma, sft, swin
    "alpha": _number(), "protected": _int_in(0, MAX_WIDTH, none=True), "smooth_kernel": _int_in(1, MAX_KERNEL),
    "attention_hidden": _int_in(1, MAX_WIDTH), "attention_prior": _number(none=True),
    "cond_channels": _int_in(1, MAX_WIDTH),
    "dims": _ints(3, 3, 1, MAX_WIDTH), "depths": _ints(4, 4, 1, MAX_DEPTH), "hyper_depths": _ints(2, 2, 1, MAX_DEPTH),
    "window": _int_in(1, MAX_WINDOW), "hyper_window": _int_in(1, MAX_WINDOW),
}


def check_config(variant: Any, config: Any) -> None:
    """Raise :class:`CheckpointError` unless ``variant`` and ``config`` describe a model
    :func:`build_model` may build: a known variant, known options of the right types, widths
    and counts within the bounds above (so a crafted config never asks for gigabytes)."""
    from pipeline.codec.models import MODELS

    if not isinstance(variant, str) or variant not in MODELS:
        raise CheckpointError(f"unknown codec variant {str(variant)[:40]!r}; known: {', '.join(sorted(MODELS))}")
    if not isinstance(config, dict):
        raise CheckpointError(f"config is a {type(config).__name__}, not a dict")
    for key, value in config.items():
        check = CONFIG_OPTIONS.get(key) if isinstance(key, str) else None
        if check is None:
            raise CheckpointError(f"unknown config option {str(key)[:40]!r}")
        expected = check(value)
        if expected is not None:
            raise CheckpointError(f"config option {key!r} must be {expected}, got {str(value)[:40]!r}")


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


def _pack_cdf(cdf: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor | None:
    """The rows of a zero-padded CDF table, each cut to its length, end to end (int32); None
    when the table is not one (then it is stored as it is)."""
    if (lengths is None or cdf.dim() != 2 or cdf.dtype != torch.int32 or lengths.dim() != 1
            or lengths.numel() != cdf.shape[0] or lengths.is_floating_point() or cdf.numel() == 0):
        return None
    lengths = lengths.to(cdf.device, torch.int64)
    if bool((lengths < 0).any()) or int(lengths.max()) != cdf.shape[1]:  # CompressAI's: the longest row fills it
        return None
    valid = torch.arange(cdf.shape[1], device=cdf.device)[None, :] < lengths[:, None]
    if bool(cdf[~valid].any()):  # padding that is not zero: keep every bit, store it whole
        return None
    return cdf[valid]  # row-major: row 0's entries, then row 1's...


def _unpack_cdf(values: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """The zero-padded table (rows of ``width``) whose rows :func:`_pack_cdf` put end to end."""
    if (values.dim() != 1 or values.dtype != torch.int32 or lengths.dim() != 1 or lengths.is_floating_point()
            or not lengths.numel() or bool((lengths < 0).any()) or int(lengths.max()) != width
            or int(lengths.to(torch.int64).sum()) != values.numel()):
        raise CheckpointError("a packed CDF table does not match its lengths")
    if lengths.numel() * width > MAX_PADDING * values.numel():  # a crafted one: gigabytes of zeros
        raise CheckpointError(f"a packed CDF table would grow over {MAX_PADDING}x when padded")
    lengths = lengths.to(values.device, torch.int64)
    valid = torch.arange(width, device=values.device)[None, :] < lengths[:, None]
    cdf = values.new_zeros(lengths.numel(), width)
    cdf[valid] = values
    return cdf


def pack_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """A state dict stored compactly, and its ``layout`` (``{name: how it was packed}``); every
    bit comes back with :func:`unpack_state_dict`."""
    packed, layout = {}, {}
    for name, t in state.items():
        if name.endswith(CDF_SUFFIX):
            rows = _pack_cdf(t, state.get(name[:-len(CDF_SUFFIX)] + LENGTH_SUFFIX))
            if rows is not None:
                packed[name], layout[name] = rows, ["cdf", int(t.shape[1])]
                continue
        if name.rsplit(".", 1)[-1] == "mask" and t.dtype in MASK_DTYPES.values() and t.numel():
            as_bool = t.to(torch.bool)
            if torch.equal(as_bool.to(t.dtype), t) and not bool(torch.signbit(t).any()):  # only 0.0 and 1.0
                packed[name], layout[name] = as_bool, ["bool", str(t.dtype).removeprefix("torch.")]
                continue
        if t.dtype == torch.int64 and t.numel() and bool((t.abs() <= NARROW_MAX).all()):
            packed[name], layout[name] = t.to(torch.int16), ["narrow", "int64"]  # the integer weights: |w| < 2^15
            continue
        packed[name] = t
    return packed, layout


def unpack_state_dict(state: dict[str, torch.Tensor], layout: dict[str, list] | None) -> dict[str, torch.Tensor]:
    """The state dict :func:`pack_state_dict` packed (``layout`` None or empty: as it is)."""
    if not layout:
        return dict(state)
    if not isinstance(layout, dict):
        raise CheckpointError("the checkpoint's layout is not a table of packed tensors")
    out = dict(state)
    for name, how in layout.items():
        kind, arg = how if isinstance(how, (list, tuple)) and len(how) == 2 else (None, None)
        if not isinstance(out.get(name), torch.Tensor):
            raise CheckpointError(f"the checkpoint's layout names {name}, which it does not hold")
        if kind == "cdf" and isinstance(arg, int) and name.endswith(CDF_SUFFIX):
            lengths = state.get(name[:-len(CDF_SUFFIX)] + LENGTH_SUFFIX)
            if not isinstance(lengths, torch.Tensor):
                raise CheckpointError(f"the checkpoint holds no lengths for the packed {name}")
            out[name] = _unpack_cdf(state[name], lengths, arg)
        elif kind == "bool" and arg in MASK_DTYPES:
            out[name] = state[name].to(MASK_DTYPES[arg])
        elif kind == "narrow" and arg == "int64" and state[name].dtype == torch.int16:
            out[name] = state[name].to(torch.int64)
        else:
            raise CheckpointError(f"unknown packing {how!r} of {name}")
    return out


def checkpoint_state_dict(blob: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of a loaded checkpoint blob (any format), unpacked."""
    return unpack_state_dict(blob["state_dict"], blob.get("layout"))


def save_checkpoint(model: ROICodec, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (variant, config, weights, coding state) and ``extra`` metadata.

    The coding state (CDF tables, integer hyper-decoder) is built here if ``update()`` has
    not run, so every checkpoint can code as it is loaded. The model's :func:`fingerprint`
    is recorded too: loading refuses weights that no longer match it (a damaged file).
    """
    if not model.coding_ready():
        model.update(force=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state, layout = pack_state_dict(model.state_dict())
    torch.save({"format": CHECKPOINT_FORMAT, "variant": model.variant, "config": model.config,
                "state_dict": state, "layout": layout, "fingerprint": fingerprint(model).hex(),
                "extra": extra or {}}, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a half checkpoint
    return path


def _check_archive(path: Path) -> None:
    """A readable zip archive (``torch.save``'s format) whose members match their checksums."""
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            for info in archive.infolist():
                if info.file_size > size or info.compress_size > size:
                    raise CheckpointError(f"{path} is damaged (member {info.filename[-40:]} declares "
                                          f"{info.file_size} bytes in a file of {size})")
            # torch writes a CRC32 of every member unless told not to (then 0: nothing to compare)
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as member:
                    while member.read(1 << 20):
                        pass
    except CheckpointError:
        raise
    except zipfile.BadZipFile as exc:
        message = str(exc).splitlines()[0] if str(exc) else "bad zip archive"
        damaged = "CRC" in message
        raise CheckpointError(f"{path} is {'damaged' if damaged else 'not a readable checkpoint'} "
                              f"({message[:80]})") from None
    except Exception as exc:  # noqa: BLE001 - zipfile raises several types for mangled archives
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None


def _check_tensors(state: Any, path: Path) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: state_dict is a {type(state).__name__}, not a dict")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry {str(name)[:60]!r} is not a named tensor")
        # an expanded view (stride 0) declares more elements than its data holds: loading
        # would allocate its full size (a coding table of gigabytes from a few bytes)
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise CheckpointError(f"{path}: state_dict entry {name[:60]!r} declares {value.numel()} elements "
                                  f"but holds {value.untyped_storage().nbytes()} bytes")


def checkpoint_file(path: str | Path) -> Path:
    """``path``, or its ``model.pt`` when it is a training checkpoint folder."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checked blob of a checkpoint file: a dict with a known format, a variant, a config
    within bounds, a state dict of real tensors; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_archive(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for non-checkpoint files
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from exc
    if not isinstance(blob, dict) or blob.get("format") not in (*CODING_FORMATS, *OLD_FORMATS):
        raise CheckpointError(f"{path} is not a roicodec checkpoint")
    missing = [key for key in ("variant", "config", "state_dict") if key not in blob]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {', '.join(missing)})")
    try:
        check_config(blob["variant"], blob["config"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    _check_tensors(blob["state_dict"], path)
    recorded = blob.get("fingerprint")
    if recorded is not None and not (isinstance(recorded, str) and len(recorded) == 2 * FINGERPRINT_BYTES):
        raise CheckpointError(f"{path}: its recorded fingerprint is not {2 * FINGERPRINT_BYTES} hex digits")
    if blob.get("extra") is not None and not isinstance(blob["extra"], dict):
        raise CheckpointError(f"{path}: extra is a {type(blob['extra']).__name__}, not a dict")
    return blob


def _model_from(blob: dict[str, Any], path: Path) -> ROICodec:
    """The model of a checked blob, its weights compared with the recorded fingerprint if any."""
    try:
        model = build_model(blob["variant"], **blob["config"])
    except (ValueError, TypeError) as exc:  # options this variant does not take, groups not summing to M...
        raise CheckpointError(f"{path}: its config does not build a {blob['variant']} model: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        state = checkpoint_state_dict(blob)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: its packed tensors do not unpack ({exc})") from None
    try:
        model.load_state_dict(state, strict=blob["format"] in CODING_FORMATS)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: another layout of the variant
        lines = str(exc).splitlines()  # "Error(s) in loading state_dict ...:" then the problems
        problem = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path} does not fit this version's {blob['variant']} model "
                              f"(saved by an older layout?): {problem[:300]}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:  # CompressAI's buffer resizing
        raise CheckpointError(f"{path}: its state_dict does not load ({type(exc).__name__})") from None
    check_fingerprint(model, blob, path)
    _check_coding_tables(model, path)
    return model


def _check_coding_tables(model: ROICodec, path: Path) -> None:
    """Tables the rANS coder can use without reading out of bounds or dividing by zero: every
    CDF row starts at 0, rises strictly to 2^precision at its length, and every table index the
    integer networks can produce names a row (a crafted table crashes the coder's process)."""
    from compressai.entropy_models import EntropyBottleneck

    from pipeline.codec.integer import GaussianTableIndex, GeneralizedGaussianTableIndex

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: its coding tables are invalid ({what})")

    rows_of: dict[int, int] = {}
    for name, module in model.named_modules():
        cdf, lengths, offsets = (getattr(module, k, None) for k in ("_quantized_cdf", "_cdf_length", "_offset"))
        if not all(isinstance(t, torch.Tensor) for t in (cdf, lengths, offsets)) or cdf.numel() == 0:
            continue
        if cdf.dim() != 2 or lengths.shape != (cdf.shape[0],) or offsets.shape != (cdf.shape[0],):
            raise bad(f"{name}: table shapes {tuple(cdf.shape)}, {tuple(lengths.shape)}, {tuple(offsets.shape)}")
        width, top = cdf.shape[1], 1 << int(getattr(module, "entropy_coder_precision", 16))
        lengths = lengths.to(torch.int64)
        if bool(((lengths < 2) | (lengths > width)).any()):
            raise bad(f"{name}: a CDF length outside [2, {width}]")
        cdf = cdf.to(torch.int64)
        inside = torch.arange(width)[None, :] < lengths[:, None]
        rises = (cdf[:, 1:] > cdf[:, :-1]) | ~inside[:, 1:]
        ends = cdf.gather(1, (lengths - 1)[:, None]).squeeze(1)
        if bool((cdf[:, 0] != 0).any()) or bool((ends != top).any()) or not bool(rises.all()):
            raise bad(f"{name}: a CDF that does not rise from 0 to {top}")
        if isinstance(module, EntropyBottleneck) and cdf.shape[0] != module.channels:
            raise bad(f"{name}: {cdf.shape[0]} tables for {module.channels} channels")
        rows_of[id(module)] = cdf.shape[0]
    rows = rows_of.get(id(model.family.conditional), 0)
    if rows == 0:  # no tables yet (a format-1 checkpoint to convert): load_checkpoint refuses it
        return
    for name, module in model.named_modules():  # the table indexes all name rows of the family's tables
        if isinstance(module, GaussianTableIndex):
            largest = module.thresholds.numel()
        elif isinstance(module, GeneralizedGaussianTableIndex):
            betas = module.scale_thresholds.shape[0]
            index = module.channel_beta_index
            if bool(((index < 0) | (index >= betas)).any()):
                raise bad(f"{name}: a channel shape index outside [0, {betas})")
            largest = betas * module.scale_levels - 1
        else:
            continue
        if largest >= rows:
            raise bad(f"{name}: indexes up to {largest} for {rows} tables")


def check_fingerprint(model: ROICodec, blob: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`CheckpointError` when ``blob`` records a fingerprint that ``model`` (its
    weights loaded) does not have; a checkpoint without one (written before 2026-12) passes."""
    recorded = blob.get("fingerprint")
    if recorded is not None and recorded.lower() != fingerprint(model).hex():
        raise CheckpointError(f"{path}: checkpoint weights do not match its recorded fingerprint: damaged file? "
                              f"(recorded {recorded}, weights {fingerprint(model).hex()})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> ROICodec:
    """Load a checkpoint into an eval-mode model, coding state as saved (never rebuilt)."""
    path = Path(path)
    blob = read_checkpoint(path, map_location)
    if blob["format"] not in CODING_FORMATS:
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
    blob = read_checkpoint(src, "cpu")
    model = _model_from(blob, src).eval()
    model.update(force=True)
    save_checkpoint(model, dst, extra=blob.get("extra") or {})
    return model


def checkpoint_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` metadata saved with a checkpoint (training step, metrics...)."""
    return read_checkpoint(Path(path), "cpu").get("extra") or {}
