"""The HTTP ingress: ``Gateway``, a Serve deployment with the FastAPI app :data:`api`.

It checks every input (:mod:`pipeline.serve.inputs`) before any model work, calls
``MaskModel`` and ``CodecModel`` through handles, and leaves every failure to the app's
one exception handler (:mod:`pipeline.serve.errors`). The upload limit is the Gateway
replica's own ``max_upload_mb``: the app's middleware asks the replica for it.
"""

# No ``from __future__ import annotations`` here: Serve rebuilds the class-based FastAPI
# endpoints in its own module, where string annotations such as ``ImageFile`` do not resolve.

import asyncio
import base64
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from pipeline import __version__
from pipeline.serve.errors import ApiError, install_error_handler, one_line
from pipeline.serve.inputs import (DEFAULT_RATE, DEFAULT_ROI_QUALITY, ImageFile, MaskFile, Prompts, Rate,
                                   RoicFile, RoiQuality, Saliency, UploadLimitMiddleware, decode_image,
                                   parse_prompts, read_upload, safe_name)
from pipeline.serve.settings import ServeSettings

log = logging.getLogger("roicodec.serve")

STATIC_DIR = Path(__file__).with_name("static")
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_PNG = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
_ERRORS = {code: {"description": text} for code, text in (
    (400, "corrupt image or bitstream"), (413, "upload or image too large"), (415, "not an image"),
    (422, "bad form values"), (503, "a model deployment is unavailable"))}


# the form field of graded quality maps, beside those of pipeline.serve.inputs (Saliency's kind)
Graded = Annotated[bool, Form(description="graded quality: each 16x16 latent cell is coded at the quality "
                                          "m + (1 - m) * roi_quality of its pixels (soft mask values and "
                                          "painted levels kept) instead of binary ROI cells (any pixel >= 0.5)")]


def replica_upload_limit() -> int:
    """The upload limit of the Gateway replica serving this request (Serve finds the
    endpoints' ``self`` the same way)."""
    return serve.get_replica_context().servable_object.s.max_upload_bytes


def mask_png(mask: np.ndarray) -> bytes:
    from pipeline.masks.ops import to_png

    return to_png(mask)


api = FastAPI(
    title="roicodec",
    version=__version__,
    description="Region-of-interest learned image compression: compress an image with more bits "
                "where a text prompt, a saliency map or a mask says it matters. "
                "Errors are JSON {\"error\", \"status\"}.",
)
api.add_middleware(UploadLimitMiddleware, limit=replica_upload_limit)
install_error_handler(api)


# Note: Serve pickles a deployment class when it is decorated, so everything the class
# uses must be imported or defined above it.
@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    """The HTTP ingress: checks inputs, calls ``MaskModel`` and ``CodecModel`` through handles."""

    def __init__(self, codec, masks, settings: dict[str, Any]) -> None:  # noqa: ANN001 - DeploymentHandles
        self.codec, self.masks = codec, masks
        self.s = ServeSettings(**settings)

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
        data = await read_upload(image, limit)
        img = await asyncio.to_thread(decode_image, data, "image", self.s.max_pixels)
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if has_mask_file:
            mdata = await read_upload(mask, limit)
            mimg = await asyncio.to_thread(decode_image, mdata, "mask", self.s.max_pixels)
            # as the CLI reads a mask file (pipeline.codec.coding.mask_to_tensor): gray / 255
            return rgb, np.asarray(mimg.convert("L"), dtype=np.float32) / 255.0, "file"
        if prompts or saliency:
            result = await self._call(self.masks.mask.remote(rgb, prompts, saliency))
            source = "+".join((["prompt"] if prompts else []) + (["saliency"] if saliency else []))
            return rgb, result["mask"], source
        return rgb, None, "none"

    # -- pages and health --

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self, request: Request) -> HTMLResponse:
        html = (STATIC_DIR / "index.html").read_text()
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        return HTMLResponse(html.replace('<base href="/">', f'<base href="{base}">'))

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        if name not in STATIC_FILES:
            raise ApiError(404, "not found")
        return Response((STATIC_DIR / name).read_bytes(), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache"})

    @api.get("/healthz", summary="Health: both model deployments answer")
    async def healthz(self) -> JSONResponse:
        try:
            codec, masks = await asyncio.wait_for(
                asyncio.gather(self._call_info(self.codec), self._call_info(self.masks)), timeout=30)
        except Exception as exc:  # noqa: BLE001 - a timeout, a dead replica, ...
            raise ApiError(503, f"model deployment unavailable: {one_line(exc)}") from None
        return JSONResponse({"status": "ok", "version": __version__, "codec": codec, "masks": masks,
                             "limits": {"max_upload_mb": self.s.max_upload_mb, "max_pixels": self.s.max_pixels,
                                        "max_prompts": self.s.max_prompts}})

    async def _call_info(self, handle) -> dict[str, Any]:  # noqa: ANN001
        return await handle.info.remote()

    # -- the API --

    @api.post("/compress", summary="Compress an image to a .roic file",
              response_class=Response, responses={200: {"content": _BINARY}, **_ERRORS})
    async def compress(self, image: ImageFile, prompt: Prompts = None, mask: MaskFile = None,
                       saliency: Saliency = False, roi_quality: RoiQuality = DEFAULT_ROI_QUALITY,
                       rate: Rate = DEFAULT_RATE, graded: Graded = False) -> Response:
        rgb, m, source = await self._inputs(image, prompt, mask, saliency)
        out = await self._call(self.codec.compress.remote(rgb, m, roi_quality, rate, graded))
        stem = Path(image.filename or "image").stem or "image"
        return Response(out["data"], media_type="application/octet-stream", headers={
            "X-Bpp": f"{out['bpp']:.6f}", "X-Width": str(out["width"]), "X-Height": str(out["height"]),
            "X-Variant": out["variant"], "X-Mask-Source": source,
            "Content-Disposition": f'attachment; filename="{safe_name(stem)}.roic"'})

    @api.post("/decompress", summary="Decode a .roic file to PNG",
              response_class=Response, responses={200: {"content": _PNG}, **_ERRORS})
    async def decompress(self, file: RoicFile) -> Response:
        from pipeline.codec.bitstream import BitstreamError, unpack

        data = await read_upload(file, self.s.max_upload_bytes)
        if not data:
            raise ApiError(400, "empty .roic file")
        try:
            header, _ = unpack(data)  # cheap checks first: magic, CRC, header
        except BitstreamError as exc:
            raise ApiError(400, one_line(exc)) from None
        if header.width * header.height > self.s.max_pixels:
            raise ApiError(413, f"{header.width}x{header.height} is more than the {self.s.max_pixels} "
                                "pixels this service decodes")
        out = await self._call(self.codec.decompress.remote(data))
        return Response(out["png"], media_type="image/png", headers={
            "X-Width": str(out["width"]), "X-Height": str(out["height"]), "X-Bpp": f"{out['bpp']:.6f}"})

    @api.post("/mask", summary="The ROI mask of an image (8-bit PNG, white = ROI)",
              response_class=Response, responses={200: {"content": _PNG}, **_ERRORS})
    async def mask(self, image: ImageFile, prompt: Prompts = None, saliency: Saliency = False) -> Response:
        _, m, source = await self._inputs(image, prompt, None, saliency, need_source=True)
        png = await asyncio.to_thread(mask_png, m)
        return Response(png, media_type="image/png", headers={"X-Mask-Source": source})

    @api.post("/roundtrip", summary="Compress and decode: metrics, reconstruction, mask and file (JSON)",
              responses=_ERRORS)
    async def roundtrip(self, image: ImageFile, prompt: Prompts = None, mask: MaskFile = None,
                        saliency: Saliency = False, roi_quality: RoiQuality = DEFAULT_ROI_QUALITY,
                        rate: Rate = DEFAULT_RATE, graded: Graded = False) -> JSONResponse:
        rgb, m, source = await self._inputs(image, prompt, mask, saliency)
        out = await self._call(self.codec.roundtrip.remote(rgb, m, roi_quality, rate, graded))
        mpng = None if m is None else await asyncio.to_thread(mask_png, m)
        b64 = lambda b: None if b is None else base64.b64encode(b).decode("ascii")  # noqa: E731
        return JSONResponse({
            "width": out["width"], "height": out["height"], "bytes": len(out["data"]), "bpp": out["bpp"],
            "psnr": out["psnr"], "roi_psnr": out["roi_psnr"], "nonroi_psnr": out["nonroi_psnr"],
            "weighted_psnr": out["weighted_psnr"], "roi_quality": roi_quality, "rate": rate, "graded": graded,
            "variant": out["variant"], "mask_source": source,
            "roic": b64(out["data"]), "reconstruction_png": b64(out["png"]), "mask_png": b64(mpng)})
