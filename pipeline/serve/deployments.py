"""The model deployments: ``CodecModel`` (the codec checkpoint: compress, decompress,
round trip with metrics) and ``MaskModel`` (CLIP text masks and saliency). Each loads
its model once per replica; methods return dicts, errors as :func:`~pipeline.serve.errors.failure`
values, so a bad request never takes a replica down."""

import io
import logging
import math
import threading
from typing import Any

import numpy as np
from ray import serve

from pipeline.mlflow_store import resolve_checkpoint
from pipeline.serve.errors import failure, one_line
from pipeline.serve.settings import ServeSettings

log = logging.getLogger("roicodec.serve")


def replica_threads(s: ServeSettings, num_cpus: float) -> int:
    """Torch threads of a model replica: ``torch_threads``, else its CPUs (at least 1)."""
    return int(s.torch_threads) if s.torch_threads else max(1, int(round(num_cpus)))


def device_for(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def image_png(image) -> bytes:  # noqa: ANN001 - a PIL image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# Serve pickles a deployment class when it is decorated: what the classes use is imported or defined above.
@serve.deployment(name="CodecModel")
class CodecModel:
    """The codec checkpoint, loaded once per replica. Methods return dicts; errors as values."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from pipeline.codec.checkpoint import fingerprint, load_checkpoint

        s = ServeSettings(**settings)
        torch.set_num_threads(replica_threads(s, s.codec_num_cpus))
        self.device = device_for(s.use_gpu)
        path, self.source = resolve_checkpoint(s.checkpoint, s.model_uri, s.mlflow_tracking_uri)
        self.model = load_checkpoint(path).to(self.device)
        self.fingerprint = fingerprint(self.model).hex()
        self._lock = threading.Lock()  # one coding job at a time per replica (see deployment_options)
        log.info("CodecModel: %s (%s, fingerprint %s) on %s", path, self.model.variant, self.fingerprint,
                 self.device)

    def info(self) -> dict[str, Any]:
        return {"variant": self.model.variant, "fingerprint": self.fingerprint, "device": self.device,
                **self.source}

    def _encode(self, rgb: np.ndarray, mask: np.ndarray | None, roi_quality: float, rate: float,
                graded: bool = False):
        from PIL import Image

        from pipeline.codec.coding import encode, image_to_tensor, mask_to_tensor

        x = image_to_tensor(Image.fromarray(rgb))
        size = tuple(x.shape[-2:])
        m = None if mask is None else mask_to_tensor(mask, size)
        with self._lock:
            data = encode(self.model, x, m, roi_quality, rate, graded=graded)
        return x, m, data

    def compress(self, rgb: np.ndarray, mask: np.ndarray | None, roi_quality: float, rate: float,
                 graded: bool = False) -> dict[str, Any]:
        """Encode; ``graded``: each latent cell's step from the quality ``m + (1 - m) roi_quality``
        (soft mask values kept) instead of the binary ROI cells."""
        from pipeline.codec.coding import bits_per_pixel

        try:
            _, _, data = self._encode(rgb, mask, roi_quality, rate, graded)
        except ValueError as exc:
            return failure(422, one_line(exc))
        except Exception as exc:  # noqa: BLE001 - never let a request take the replica down
            log.exception("compress failed")
            return failure(500, f"compression failed: {one_line(exc)}")
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
            return failure(400, one_line(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("decompress failed")
            return failure(500, f"decompression failed: {one_line(exc)}")
        return {"ok": True, "png": image_png(image), "width": image.width, "height": image.height,
                "bpp": bits_per_pixel(data, image.width, image.height)}

    def roundtrip(self, rgb: np.ndarray, mask: np.ndarray | None, roi_quality: float, rate: float,
                  graded: bool = False) -> dict[str, Any]:
        """Compress (``graded`` as :meth:`compress`), decode, and measure the 8-bit reconstruction:
        PSNR, ROI / non-ROI PSNR and the PSNR weighted by each pixel's quality ``m + (1 - m) roi_quality``
        (plain PSNR without a mask)."""
        from pipeline.codec.coding import bits_per_pixel, decode, image_to_tensor, tensor_to_image
        from pipeline.eval.metrics import psnr, quality_weighted_psnr, roi_psnr

        try:
            x, m, data = self._encode(rgb, mask, roi_quality, rate, graded)
            with self._lock:
                x_hat = decode(self.model, data)
            image = tensor_to_image(x_hat)
            y = image_to_tensor(image)  # the 8-bit image the user gets
            roi, nonroi = roi_psnr(x, y, m) if m is not None else (psnr(x, y), float("nan"))
            weighted = quality_weighted_psnr(x, y, m, roi_quality)
        except ValueError as exc:
            return failure(422, one_line(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("roundtrip failed")
            return failure(500, f"round trip failed: {one_line(exc)}")
        h, w = rgb.shape[:2]
        return {"ok": True, "data": data, "png": image_png(image), "width": w, "height": h,
                "bpp": bits_per_pixel(data, w, h), "variant": self.model.variant,
                "psnr": finite_or_none(psnr(x, y)), "roi_psnr": finite_or_none(roi),
                "nonroi_psnr": finite_or_none(nonroi), "weighted_psnr": finite_or_none(weighted)}


@serve.deployment(name="MaskModel")
class MaskModel:
    """ROI masks: the CLIP text masker (loaded once per replica) and saliency."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from pipeline.masks import MaskError, TextMasker, get_saliency_model

        s = ServeSettings(**settings)
        self.settings = s
        torch.set_num_threads(replica_threads(s, s.mask_num_cpus))
        self.device = device_for(s.use_gpu)
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
            return failure(503, f"text prompts are unavailable on this service: {self.text_error}")
        if saliency and self.saliency_error is not None:
            return failure(503, f"saliency is unavailable on this service: {self.saliency_error}")
        try:
            with self._lock:
                mask = build_mask(Image.fromarray(rgb), prompts=prompts, saliency=saliency,
                                  text_masker=self.masker, saliency_model=self.settings.saliency_model,
                                  saliency_weights=self.settings.saliency_weights)
        except MaskError as exc:
            return failure(422, one_line(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("mask failed")
            return failure(500, f"mask failed: {one_line(exc)}")
        return {"ok": True, "mask": mask}
