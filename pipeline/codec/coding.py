"""Image <-> ``.roic`` bytes with a model: the one path used by the CLI, eval and serving."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.codec.bitstream import DEFAULT_MAX_PIXELS, BitstreamError, RoicHeader, pack, unpack
from pipeline.codec.checkpoint import fingerprint
from pipeline.codec.models import ROICodec


def _check_knob(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _check_ready(model: ROICodec) -> None:
    if not model.coding_ready():
        raise ValueError("the model has no coding tables: run model.update() (or load a checkpoint)")


def encode(model: ROICodec, x: torch.Tensor, mask: torch.Tensor | None = None,
           roi_quality: float = 1.0, rate: float = 1.0, graded: bool = False) -> bytes:
    """Compress one image (1,3,H,W in [0,1]) with an optional mask (1,1,H,W) to ``.roic`` bytes.

    ``graded``: each latent cell's step follows the quality ``m + (1 - m) Q`` (a soft mask's
    ramps, or a quality map given as the mask with Q = 0) instead of the binary ROI cells."""
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"expected one RGB image of shape (1,3,H,W), got {tuple(x.shape)}")
    roi_quality, rate = _check_knob("roi_quality", roi_quality), _check_knob("rate", rate)
    _check_ready(model)
    height, width = x.shape[-2:]
    device = next(model.parameters()).device
    out = model.compress(x.to(device), None if mask is None else mask.to(device), roi_quality, rate, graded)
    header = RoicHeader(model.variant, fingerprint(model), width, height, rate, roi_quality)
    return pack(header, out["strings"])


def hyper_latent_shape(model: ROICodec, header: RoicHeader) -> tuple[int, int]:
    """The hyper-latent grid (h, w) of a file: its image size over the model's stride, rounded up."""
    return -(-header.height // model.stride), -(-header.width // model.stride)


def decode(model: ROICodec, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
           float64: bool = False) -> torch.Tensor:
    """Decode ``.roic`` bytes to a (1,3,H,W) float32 image in [0,1].

    The decoded symbols are the same on every machine. The synthesis transform runs in the
    model's precision (float32): another machine's rounding noise can move a pixel by one
    level where a value sits at a rounding tie. ``float64=True`` runs it in float64 (about
    2.8x the decode time on CPU), where that noise (~1e-16) has not changed a pixel in any
    of our checks: the same 8-bit image everywhere.

    Any file that cannot be decoded (damaged, another model's, declaring more than
    ``max_pixels`` pixels, or crafted so that decoding fails) raises :class:`BitstreamError`.
    """
    header, groups = unpack(data)
    _check_ready(model)
    if header.variant != model.variant:
        raise BitstreamError(f"file was encoded with variant {header.variant!r}, "
                             f"the loaded checkpoint is {model.variant!r}")
    if header.fingerprint != fingerprint(model):
        raise BitstreamError("file was encoded with a different checkpoint "
                             f"(fingerprint {header.fingerprint.hex()}, "
                             f"loaded {fingerprint(model).hex()}): decode it with --checkpoint of the model "
                             f"that made it")
    if len(groups) != (2 if header.version == 2 else 3) or any(len(g) != 1 for g in groups):
        raise BitstreamError("corrupted .roic file (unexpected string layout)")
    if header.width * header.height > max_pixels:
        raise BitstreamError(f".roic header declares {header.width}x{header.height} pixels, more than "
                             f"the decoder's limit of {max_pixels} (raise it with --max-pixels)")
    shape = hyper_latent_shape(model, header)
    if float64:
        model = copy.deepcopy(model).double()
    try:
        x_hat = model.decompress(groups, shape, header.rate, header.roi_quality,
                                 cell_maps=header.version == 3)["x_hat"]
    except Exception as exc:  # the entropy decoder or the transforms choked on crafted data
        raise BitstreamError(f"corrupted .roic payload ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no message'})") from exc
    return x_hat[..., :header.height, :header.width].float().nan_to_num(0.0).cpu()


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image (any mode) as a (1,3,H,W) float tensor in [0,1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def mask_to_tensor(mask: np.ndarray | Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A mask (float array in [0,1] or 8-bit image, white = ROI) as (1,1,H,W) at ``size`` (h, w)."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    t = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t.clamp(0, 1)


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """A (1,3,H,W) tensor in [0,1] as an 8-bit RGB PIL image."""
    arr = (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file; a clear ``ValueError`` if it is not one."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise
    except Exception as exc:  # Pillow raises several types for bad files
        raise ValueError(f"{path} is not a readable image ({exc})") from exc


def bits_per_pixel(data: bytes, width: int, height: int) -> float:
    """Real bpp of a file: its size in bits over the pixel count."""
    return 8.0 * len(data) / (width * height)


def encode_at_target_bpp(model: ROICodec, x: torch.Tensor, mask: torch.Tensor | None,
                         roi_quality: float, target_bpp: float, iterations: int = 12, graded: bool = False
                         ) -> tuple[bytes, float]:
    """Bisect the continuous rate knob for the largest file not above ``target_bpp``.

    Returns the bytes and the rate used: rate 1's file when it fits, else the rate found by
    ``iterations`` halvings of [0, 1] (a step of 2^-12 by default), whose file is at most
    ``target_bpp`` while the rate one step up makes a larger one. Raises ``ValueError`` naming
    the smallest bpp reachable (rate 0's file) when even that is above ``target_bpp``: the
    model cannot meet the budget at this ``roi_quality`` (a lower one makes smaller files).
    """
    if not target_bpp > 0:
        raise ValueError(f"target bpp must be positive, got {target_bpp}")
    height, width = x.shape[-2:]
    lo, hi = 0.0, 1.0
    best = encode(model, x, mask, roi_quality, lo, graded), lo
    smallest = bits_per_pixel(best[0], width, height)
    if smallest > target_bpp:
        raise ValueError(f"no rate meets {target_bpp:g} bpp: the smallest file this model makes of this image at "
                         f"roi-quality {roi_quality:g} is {smallest:.4f} bpp (rate 0)")
    top = encode(model, x, mask, roi_quality, hi, graded)
    if bits_per_pixel(top, width, height) <= target_bpp:
        return top, hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        data = encode(model, x, mask, roi_quality, mid, graded)
        if bits_per_pixel(data, width, height) <= target_bpp:
            best, lo = (data, mid), mid
        else:
            hi = mid
    return best
