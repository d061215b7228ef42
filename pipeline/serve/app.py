"""Ray Serve application: the champion ROI codec over HTTP, with a web page.

Three deployments, so each part scales on its own load:

- ``Gateway`` (FastAPI ingress, async, light): checks every input before any model
  work (upload size, image decoding, knob ranges, bitstream header), then calls the
  model deployments through handles and turns every failure into a JSON error.
- ``CodecModel``: the codec checkpoint (a path, or the MLflow ``champion`` resolved
  from ``models:/NAME@champion``), loaded once per replica; compress, decompress,
  round trip with metrics.
- ``MaskModel``: the CLIP model for text masks (loaded once per replica) and the
  saliency models; turns prompts / ``saliency`` into a float mask.

HTTP API (multipart forms; the OpenAPI schema is at ``/openapi.json``, docs at ``/docs``):

- ``POST /compress``: ``image`` file + mask source (``prompt`` one or more, repeated or
  comma-separated; or a ``mask`` file, white = ROI; or ``saliency=true``; or none = the
  whole image is ROI) + ``roi_quality`` and ``rate`` in [0, 1] -> ``application/octet-stream``
  ``.roic`` bytes; headers ``X-Bpp``, ``X-Width``, ``X-Height``, ``X-Variant``, ``X-Mask-Source``.
- ``POST /decompress``: ``file`` (.roic) -> ``image/png`` (headers ``X-Width``, ``X-Height``, ``X-Bpp``).
- ``POST /mask``: ``image`` + ``prompt`` and/or ``saliency`` -> ``image/png`` (8-bit, white = ROI).
- ``POST /roundtrip``: the ``/compress`` form -> JSON: bpp, PSNR, ROI / non-ROI PSNR, and
  base64 of the ``.roic`` file, the reconstruction PNG and the mask PNG (what the web page uses).
- ``GET /`` the web page, ``GET /healthz`` (asks both model deployments; 503 if one does not answer).

Errors are JSON ``{"error": "...", "status": N}``: 413 upload (or image) too large,
415 not an image, 400 corrupt image / damaged or foreign bitstream, 422 bad knobs or
form, 503 a model deployment unavailable, 500 anything else. A bad request never takes
a replica down: the model deployments return errors as values and the ingress catches
every exception.

:func:`build_app` is the application builder for ``serve run cluster/serve_config.yaml``
(``import_path: pipeline.serve.app:build_app``) and :func:`deploy` is what
``jobs/deploy.py`` calls. The autoscaling choices are in :func:`deployment_options`.
"""

# No ``from __future__ import annotations`` here: Serve rebuilds the class-based FastAPI
# endpoints in its own module, where string annotations such as ``ImageFile`` do not resolve.

import asyncio
import base64
import io
import logging
import math
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline import __version__
from pipeline.masks.saliency import DEFAULT_SALIENCY_MODEL
from pipeline.masks.text import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from pipeline.mlflow_store import resolve_checkpoint

log = logging.getLogger("roicodec.serve")

STATIC_DIR = Path(__file__).with_name("static")
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
DEFAULT_ROI_QUALITY = 0.3  # the CLI's defaults
DEFAULT_RATE = 0.5
MAX_PROMPT_CHARS = 200


# -- settings ------------------------------------------------------------------------------


@dataclass
class ServeSettings:
    """Everything ``build_app`` accepts as ``args`` (``serve_config.yaml``) or ``jobs/deploy.py`` flags."""

    checkpoint: str | None = None          # a checkpoint file every replica can read
    model_uri: str | None = None           # or models:/NAME@champion, models:/NAME/3, runs:/..., a path
    mlflow_tracking_uri: str | None = None  # for model_uri (default: MLFLOW_TRACKING_URI)
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
        if bool(s.checkpoint) == bool(s.model_uri):
            raise ValueError("give exactly one of 'checkpoint' (a file) or 'model_uri' (models:/NAME@champion)")
        if s.checkpoint and not s.model_uri and not Path(s.checkpoint).is_file():
            raise ValueError(f"checkpoint not found: {s.checkpoint}")
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


# -- shared helpers ------------------------------------------------------------------------


class ApiError(Exception):
    """An error with its HTTP status, turned into ``{"error", "status"}`` JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> dict[str, Any]:
    return {"ok": False, "status": status, "error": message}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _replica_threads(s: ServeSettings, num_cpus: float) -> int:
    return int(s.torch_threads) if s.torch_threads else max(1, int(round(num_cpus)))


def _device(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def mask_png(mask: np.ndarray) -> bytes:
    from pipeline.masks.ops import to_png

    return to_png(mask)


def image_png(image) -> bytes:  # noqa: ANN001 - a PIL image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- model deployments ---------------------------------------------------------------------


@serve.deployment(name="CodecModel")
class CodecModel:
    """The codec checkpoint, loaded once per replica. Methods return dicts; errors as values."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from pipeline.codec.checkpoint import fingerprint, load_checkpoint

        s = ServeSettings(**settings)
        torch.set_num_threads(_replica_threads(s, s.codec_num_cpus))
        self.device = _device(s.use_gpu)
        path, self.source = resolve_checkpoint(s.checkpoint, s.model_uri, s.mlflow_tracking_uri)
        self.model = load_checkpoint(path).to(self.device)
        self.fingerprint = fingerprint(self.model).hex()
        self._lock = threading.Lock()  # one coding job at a time per replica (see deployment_options)
        log.info("CodecModel: %s (%s, fingerprint %s) on %s", path, self.model.variant, self.fingerprint,
                 self.device)

    def info(self) -> dict[str, Any]:
        return {"variant": self.model.variant, "fingerprint": self.fingerprint, "device": self.device,
                **self.source}

    def _encode(self, rgb: np.ndarray, mask: np.ndarray | None, roi_quality: float, rate: float):
        from PIL import Image

        from pipeline.codec.coding import encode, image_to_tensor, mask_to_tensor

        x = image_to_tensor(Image.fromarray(rgb))
        size = tuple(x.shape[-2:])
        m = None if mask is None else mask_to_tensor(mask, size)
        with self._lock:
            data = encode(self.model, x, m, roi_quality, rate)
        return x, m, data

    def compress(self, rgb: np.ndarray, mask: np.ndarray | None, roi_quality: float, rate: float
                 ) -> dict[str, Any]:
        from pipeline.codec.coding import bits_per_pixel

        try:
            _, _, data = self._encode(rgb, mask, roi_quality, rate)
        except ValueError as exc:
            return _error(422, _one_line(exc))
        except Exception as exc:  # noqa: BLE001 - never let a request take the replica down
            log.exception("compress failed")
            return _error(500, f"compression failed: {_one_line(exc)}")
        h, w = rgb.shape[:2]
        return {"ok": True, "data": data, "bpp": bits_per_pixel(data, w, h), "width": w, "height": h,
                "variant": self.model.variant}

    def decompress(self, data: bytes) -> dict[str, Any]:
        from pipeline.codec.bitstream import BitstreamError
        from pipeline.codec.coding import bits_per_pixel, decode, tensor_to_image

        try:
            with self._lock:
                x_hat = decode(self.model, data)
            image = tensor_to_image(x_hat)
        except BitstreamError as exc:
            return _error(400, _one_line(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("decompress failed")
            return _error(500, f"decompression failed: {_one_line(exc)}")
        return {"ok": True, "png": image_png(image), "width": image.width, "height": image.height,
                "bpp": bits_per_pixel(data, image.width, image.height)}

    def roundtrip(self, rgb: np.ndarray, mask: np.ndarray | None, roi_quality: float, rate: float
                  ) -> dict[str, Any]:
        """Compress, decode, and measure: PSNR and ROI / non-ROI PSNR of the 8-bit reconstruction."""
        from pipeline.codec.coding import bits_per_pixel, decode, image_to_tensor, tensor_to_image
        from pipeline.eval.metrics import psnr, roi_psnr

        try:
            x, m, data = self._encode(rgb, mask, roi_quality, rate)
            with self._lock:
                x_hat = decode(self.model, data)
            image = tensor_to_image(x_hat)
            y = image_to_tensor(image)  # the 8-bit image the user gets
            roi, nonroi = roi_psnr(x, y, m) if m is not None else (psnr(x, y), float("nan"))
        except ValueError as exc:
            return _error(422, _one_line(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("roundtrip failed")
            return _error(500, f"round trip failed: {_one_line(exc)}")
        h, w = rgb.shape[:2]
        return {"ok": True, "data": data, "png": image_png(image), "width": w, "height": h,
                "bpp": bits_per_pixel(data, w, h), "variant": self.model.variant,
                "psnr": _finite_or_none(psnr(x, y)), "roi_psnr": _finite_or_none(roi),
                "nonroi_psnr": _finite_or_none(nonroi)}


@serve.deployment(name="MaskModel")
class MaskModel:
    """ROI masks: the CLIP text masker (loaded once per replica) and saliency."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from pipeline.masks import MaskError, TextMasker, get_saliency_model

        s = ServeSettings(**settings)
        self.settings = s
        torch.set_num_threads(_replica_threads(s, s.mask_num_cpus))
        self.device = _device(s.use_gpu)
        self.masker, self.text_error = None, None
        if s.text_masks:
            try:
                self.masker = TextMasker(s.clip_model, s.clip_pretrained, config=s.clip_config,
                                         device=self.device, allow_download=s.clip_download)
            except MaskError as exc:  # serve saliency and mask files anyway; /healthz says why
                self.text_error = str(exc)
                log.error("MaskModel: text masks unavailable: %s", exc)
        else:
            self.text_error = "text masks are turned off (text_masks: false)"
        self.saliency_error = None
        try:  # a learned model is loaded here, once per replica (the loader caches it)
            get_saliency_model(s.saliency_model, s.saliency_weights)
        except MaskError as exc:  # serve text masks and mask files anyway; /healthz says why
            self.saliency_error = str(exc)
            log.error("MaskModel: saliency unavailable: %s", exc)
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"text_masks": self.masker is not None, "text_error": self.text_error,
                "clip_model": self.settings.clip_model if self.settings.clip_config is None else "config",
                "saliency_model": self.settings.saliency_model, "saliency_error": self.saliency_error,
                "device": self.device}

    def mask(self, rgb: np.ndarray, prompts: list[str], saliency: bool) -> dict[str, Any]:
        from PIL import Image

        from pipeline.masks import MaskError, build_mask

        if prompts and self.masker is None:
            return _error(503, f"text prompts are unavailable on this service: {self.text_error}")
        if saliency and self.saliency_error is not None:
            return _error(503, f"saliency is unavailable on this service: {self.saliency_error}")
        try:
            with self._lock:
                mask = build_mask(Image.fromarray(rgb), prompts=prompts, saliency=saliency,
                                  text_masker=self.masker, saliency_model=self.settings.saliency_model,
                                  saliency_weights=self.settings.saliency_weights)
        except MaskError as exc:
            return _error(422, _one_line(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("mask failed")
            return _error(500, f"mask failed: {_one_line(exc)}")
        return {"ok": True, "mask": mask}


# -- ingress --------------------------------------------------------------------------------


class UploadTooLarge(HTTPException):
    """Raised from ``receive`` when the body grows past the limit (FastAPI re-raises HTTPExceptions)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload too large (limit {limit / 2**20:g} MB)")


class UploadLimitMiddleware:
    """Pure ASGI: 413 on a ``Content-Length`` over the limit before reading anything, and on
    the bytes actually received (chunked uploads) as soon as they pass it, so at most the
    limit plus one chunk is ever read. The limit comes from the Gateway's settings."""

    def __init__(self, app, limits: dict[str, int]) -> None:  # noqa: ANN001
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits["max_upload_bytes"]
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0 or declared > limit:
                status = 413 if declared > limit else 400
                message = str(UploadTooLarge(limit).detail) if status == 413 else "bad Content-Length header"
                return await JSONResponse({"error": message, "status": status}, status)(scope, receive, send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise UploadTooLarge(limit)
            return message

        async def tracking_send(message) -> None:  # noqa: ANN001
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except UploadTooLarge as exc:
            if started:
                raise
            await JSONResponse({"error": exc.detail, "status": 413}, 413)(scope, receive, send)


_LIMITS = {"max_upload_bytes": int(ServeSettings.max_upload_mb * 2**20)}  # set per replica by Gateway

app = FastAPI(
    title="roicodec",
    version=__version__,
    description="Region-of-interest learned image compression: compress an image with more bits "
                "where a text prompt, a saliency map or a mask says it matters. "
                "Errors are JSON {\"error\", \"status\"}.",
)
app.add_middleware(UploadLimitMiddleware, limits=_LIMITS)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail), "status": exc.status_code}, exc.status_code,
                        headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    return JSONResponse({"error": "; ".join(parts) or "invalid request", "status": 422, "detail": detail}, 422)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s: %s", request.url.path, exc, exc_info=exc)
    return JSONResponse({"error": f"internal error: {_one_line(exc)}", "status": 500}, 500)


def _api_error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "status": exc.status}, exc.status)


def decode_image(data: bytes, what: str, max_pixels: int):  # noqa: ANN201 - a PIL image
    """Fully decode an uploaded image or raise ApiError: 400 empty/corrupt, 415 not an image, 413 too big."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, f"{what}: empty file")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ApiError(415, f"{what}: not a supported image (use {', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on bad headers
        raise ApiError(400, f"{what}: corrupt image ({_one_line(exc)})") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ApiError(400, f"{what}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ApiError(413, f"{what}: {w}x{h} is more than the {max_pixels} pixels this service accepts")
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - truncated or damaged data
        raise ApiError(400, f"{what}: corrupt image ({_one_line(exc)})") from None
    return img


def parse_prompts(values: list[str] | None, max_prompts: int) -> list[str]:
    """Repeated and/or comma-separated prompts; blanks dropped; 422 on too many or too long."""
    prompts = [p.strip() for v in values or [] for p in v.split(",")]
    prompts = [p for p in prompts if p]
    if len(prompts) > max_prompts:
        raise ApiError(422, f"prompt: at most {max_prompts} prompts, got {len(prompts)}")
    long = [p for p in prompts if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise ApiError(422, f"prompt: longer than {MAX_PROMPT_CHARS} characters: {long[0][:40]!r}...")
    return prompts


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)  # bounded even if the body limit were lifted
    if len(data) > limit:
        raise ApiError(413, f"{upload.filename or 'upload'}: file too large (limit {limit / 2**20:g} MB)")
    return data


RoiQuality = Annotated[float, Form(ge=0.0, le=1.0, description="value of non-ROI pixels in the mask, "
                                                                 "in [0, 1]; 1 = uniform quality")]
Rate = Annotated[float, Form(ge=0.0, le=1.0, description="position on the continuous rate scale, in [0, 1]")]
Prompts = Annotated[list[str] | None, Form(description="text prompt(s) for a CLIP mask; repeat the field "
                                                       "or separate with commas")]
Saliency = Annotated[bool, Form(description="add a saliency mask")]
ImageFile = Annotated[UploadFile, File(description="the image (PNG, JPEG, WebP, ...)")]
MaskFile = Annotated[UploadFile | None, File(description="an ROI mask image, white = ROI (instead of prompts)")]

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_PNG = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
_ERRORS = {code: {"description": text} for code, text in (
    (400, "corrupt image or bitstream"), (413, "upload or image too large"), (415, "not an image"),
    (422, "bad form values"), (503, "a model deployment is unavailable"))}


def _safe_name(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:100] or "image"


# Note: Serve pickles a deployment class when it is decorated, so everything the classes
# use must be defined above them.
@serve.deployment(name="Gateway")
@serve.ingress(app)
class Gateway:
    """The HTTP ingress: checks inputs, calls ``MaskModel`` and ``CodecModel`` through handles."""

    def __init__(self, codec, masks, settings: dict[str, Any]) -> None:  # noqa: ANN001 - DeploymentHandles
        self.codec, self.masks = codec, masks
        self.s = ServeSettings(**settings)
        _LIMITS["max_upload_bytes"] = self.s.max_upload_bytes

    async def _call(self, response) -> dict[str, Any]:  # noqa: ANN001 - a DeploymentResponse
        try:
            result = await response
        except Exception as exc:  # noqa: BLE001 - replica died, back-pressure, ...
            log.warning("model call failed: %s", exc)
            raise ApiError(503, f"model deployment unavailable ({type(exc).__name__})") from None
        if not result.get("ok"):
            raise ApiError(result["status"], result["error"])
        return result

    async def _inputs(self, image: UploadFile, prompt: list[str] | None, mask: UploadFile | None,
                      saliency: bool, need_source: bool = False) -> tuple[np.ndarray, np.ndarray | None, str]:
        """Checked inputs: the RGB array, the float mask (or None) and where the mask came from."""
        prompts = parse_prompts(prompt, self.s.max_prompts)
        has_mask_file = mask is not None and bool(mask.filename or mask.size)
        if has_mask_file and (prompts or saliency):
            raise ApiError(422, "give either a mask file or prompts/saliency, not both")
        if need_source and not (prompts or saliency):
            raise ApiError(422, "no mask source: give prompt(s) or saliency=true")
        limit = self.s.max_upload_bytes
        data = await _read_upload(image, limit)
        img = await asyncio.to_thread(decode_image, data, "image", self.s.max_pixels)
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if has_mask_file:
            mdata = await _read_upload(mask, limit)
            mimg = await asyncio.to_thread(decode_image, mdata, "mask", self.s.max_pixels)
            # as the CLI reads a mask file (pipeline.codec.coding.mask_to_tensor): gray / 255
            return rgb, np.asarray(mimg.convert("L"), dtype=np.float32) / 255.0, "file"
        if prompts or saliency:
            result = await self._call(self.masks.mask.remote(rgb, prompts, saliency))
            source = "+".join((["prompt"] if prompts else []) + (["saliency"] if saliency else []))
            return rgb, result["mask"], source
        return rgb, None, "none"

    # -- pages and health --

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self, request: Request) -> HTMLResponse:
        html = (STATIC_DIR / "index.html").read_text()
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        return HTMLResponse(html.replace('<base href="/">', f'<base href="{base}">'))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        if name not in STATIC_FILES:
            return JSONResponse({"error": "not found", "status": 404}, 404)
        return Response((STATIC_DIR / name).read_bytes(), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", summary="Health: both model deployments answer")
    async def healthz(self) -> JSONResponse:
        try:
            codec, masks = await asyncio.wait_for(
                asyncio.gather(self._call_info(self.codec), self._call_info(self.masks)), timeout=30)
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "error": _one_line(exc) or type(exc).__name__}, 503)
        return JSONResponse({"status": "ok", "version": __version__, "codec": codec, "masks": masks,
                             "limits": {"max_upload_mb": self.s.max_upload_mb, "max_pixels": self.s.max_pixels,
                                        "max_prompts": self.s.max_prompts}})

    async def _call_info(self, handle) -> dict[str, Any]:  # noqa: ANN001
        return await handle.info.remote()

    # -- the API --

    @app.post("/compress", summary="Compress an image to a .roic file",
              response_class=Response, responses={200: {"content": _BINARY}, **_ERRORS})
    async def compress(self, image: ImageFile, prompt: Prompts = None, mask: MaskFile = None,
                       saliency: Saliency = False, roi_quality: RoiQuality = DEFAULT_ROI_QUALITY,
                       rate: Rate = DEFAULT_RATE) -> Response:
        try:
            rgb, m, source = await self._inputs(image, prompt, mask, saliency)
            out = await self._call(self.codec.compress.remote(rgb, m, roi_quality, rate))
            stem = Path(image.filename or "image").stem or "image"
            return Response(out["data"], media_type="application/octet-stream", headers={
                "X-Bpp": f"{out['bpp']:.6f}", "X-Width": str(out["width"]), "X-Height": str(out["height"]),
                "X-Variant": out["variant"], "X-Mask-Source": source,
                "Content-Disposition": f'attachment; filename="{_safe_name(stem)}.roic"'})
        except ApiError as exc:
            return _api_error(exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("compress")
            return _api_error(ApiError(500, f"internal error: {_one_line(exc)}"))

    @app.post("/decompress", summary="Decode a .roic file to PNG",
              response_class=Response, responses={200: {"content": _PNG}, **_ERRORS})
    async def decompress(self, file: Annotated[UploadFile, File(description="a .roic file")]) -> Response:
        from pipeline.codec.bitstream import BitstreamError, unpack

        try:
            data = await _read_upload(file, self.s.max_upload_bytes)
            if not data:
                raise ApiError(400, "empty .roic file")
            try:
                header, _ = unpack(data)  # cheap checks first: magic, CRC, header
            except BitstreamError as exc:
                raise ApiError(400, _one_line(exc)) from None
            if header.width * header.height > self.s.max_pixels:
                raise ApiError(413, f"{header.width}x{header.height} is more than the {self.s.max_pixels} "
                                    "pixels this service decodes")
            out = await self._call(self.codec.decompress.remote(data))
            return Response(out["png"], media_type="image/png", headers={
                "X-Width": str(out["width"]), "X-Height": str(out["height"]), "X-Bpp": f"{out['bpp']:.6f}"})
        except ApiError as exc:
            return _api_error(exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("decompress")
            return _api_error(ApiError(500, f"internal error: {_one_line(exc)}"))

    @app.post("/mask", summary="The ROI mask of an image (8-bit PNG, white = ROI)",
              response_class=Response, responses={200: {"content": _PNG}, **_ERRORS})
    async def mask(self, image: ImageFile, prompt: Prompts = None, saliency: Saliency = False) -> Response:
        try:
            _, m, source = await self._inputs(image, prompt, None, saliency, need_source=True)
            png = await asyncio.to_thread(mask_png, m)
            return Response(png, media_type="image/png", headers={"X-Mask-Source": source})
        except ApiError as exc:
            return _api_error(exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("mask")
            return _api_error(ApiError(500, f"internal error: {_one_line(exc)}"))

    @app.post("/roundtrip", summary="Compress and decode: metrics, reconstruction, mask and file (JSON)",
              responses=_ERRORS)
    async def roundtrip(self, image: ImageFile, prompt: Prompts = None, mask: MaskFile = None,
                        saliency: Saliency = False, roi_quality: RoiQuality = DEFAULT_ROI_QUALITY,
                        rate: Rate = DEFAULT_RATE) -> JSONResponse:
        try:
            rgb, m, source = await self._inputs(image, prompt, mask, saliency)
            out = await self._call(self.codec.roundtrip.remote(rgb, m, roi_quality, rate))
            mpng = None if m is None else await asyncio.to_thread(mask_png, m)
            b64 = lambda b: None if b is None else base64.b64encode(b).decode("ascii")  # noqa: E731
            return JSONResponse({
                "width": out["width"], "height": out["height"], "bytes": len(out["data"]), "bpp": out["bpp"],
                "psnr": out["psnr"], "roi_psnr": out["roi_psnr"], "nonroi_psnr": out["nonroi_psnr"],
                "roi_quality": roi_quality, "rate": rate, "variant": out["variant"], "mask_source": source,
                "roic": b64(out["data"]), "reconstruction_png": b64(out["png"]), "mask_png": b64(mpng)})
        except ApiError as exc:
            return _api_error(exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("roundtrip")
            return _api_error(ApiError(500, f"internal error: {_one_line(exc)}"))


# -- building and deploying -----------------------------------------------------------------


def build_app(args: dict):  # noqa: ANN201 - ray.serve.Application
    """Application builder: ``serve run cluster/serve_config.yaml`` and :func:`deploy` call this.

    ``args`` are :class:`ServeSettings` fields (``checkpoint`` or ``model_uri`` required).
    """
    s = ServeSettings.from_args(args)
    settings = asdict(s)
    opts = deployment_options(s)
    codec = CodecModel.options(**opts["CodecModel"]).bind(settings)
    masks = MaskModel.options(**opts["MaskModel"]).bind(settings)
    return Gateway.options(**opts["Gateway"]).bind(codec, masks, settings)


def deploy(args: dict[str, Any], *, host: str = "127.0.0.1", port: int = 8000, name: str = "roicodec",
           route_prefix: str = "/") -> str:
    """Start Serve's HTTP proxy on ``host:port`` (Ray must be initialised), deploy, return the URL.

    Returns once every replica is up (``serve.run`` waits for the application to run).
    """
    application = build_app(args)  # argument errors before touching Serve
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(application, name=name, route_prefix=route_prefix)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{int(port)}{route_prefix.rstrip('/')}/"

