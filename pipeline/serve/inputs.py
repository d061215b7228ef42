"""HTTP inputs of the service, checked before any model work: the upload-size middleware,
upload reading, image decoding, prompt parsing and the form fields' types and ranges.
Every check raises :class:`~pipeline.serve.errors.ApiError` (or FastAPI's 422)."""

import io
from typing import Annotated, Callable

from fastapi import File, Form, HTTPException, UploadFile

from pipeline.serve.errors import ApiError, error_response, one_line

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
DEFAULT_ROI_QUALITY = 0.3  # the CLI's defaults
DEFAULT_RATE = 0.5
MAX_PROMPT_CHARS = 200


class UploadTooLarge(HTTPException):
    """Raised from ``receive`` when the body grows past the limit (FastAPI re-raises HTTPExceptions)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload too large (limit {limit / 2**20:g} MB)")


class UploadLimitMiddleware:
    """Pure ASGI: 413 on a ``Content-Length`` over the limit before reading anything, and on
    the bytes actually received (chunked uploads) as soon as they pass it, so at most the
    limit plus one chunk is ever read. ``limit()`` gives the limit in bytes for each request."""

    def __init__(self, app, limit: Callable[[], int]) -> None:  # noqa: ANN001 - an ASGI app
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > limit:
                return await error_response(413, UploadTooLarge(limit).detail)(scope, receive, send)
            if declared < 0:
                return await error_response(400, "bad Content-Length header")(scope, receive, send)
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
            await error_response(413, exc.detail)(scope, receive, send)


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The file's bytes; 413 past ``limit`` (bounded even if the body limit were lifted)."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"{upload.filename or 'upload'}: file too large (limit {limit / 2**20:g} MB)")
    return data


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
        raise ApiError(400, f"{what}: corrupt image ({one_line(exc)})") from None
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
        raise ApiError(400, f"{what}: corrupt image ({one_line(exc)})") from None
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


def safe_name(stem: str) -> str:
    """A file name stem safe in a ``Content-Disposition`` header."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:100] or "image"


# the form fields (FastAPI checks types and ranges: 422)
RoiQuality = Annotated[float, Form(ge=0.0, le=1.0, description="value of non-ROI pixels in the mask, "
                                                                 "in [0, 1]; 1 = uniform quality")]
Rate = Annotated[float, Form(ge=0.0, le=1.0, description="position on the continuous rate scale, in [0, 1]")]
Prompts = Annotated[list[str] | None, Form(description="text prompt(s) for a CLIP mask; repeat the field "
                                                       "or separate with commas")]
Saliency = Annotated[bool, Form(description="add a saliency mask")]
ImageFile = Annotated[UploadFile, File(description="the image (PNG, JPEG, WebP, ...)")]
MaskFile = Annotated[UploadFile | None, File(description="an ROI mask image, white = ROI (instead of prompts)")]
RoicFile = Annotated[UploadFile, File(description="a .roic file")]
