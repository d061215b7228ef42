"""Ray Serve application: the champion ROI codec over HTTP, with a web page.

Three deployments, so each part scales on its own load:

- ``Gateway`` (FastAPI ingress, async, light; :mod:`~pipeline.serve.gateway`): checks every
  input before any model work (upload size, image decoding, knob ranges, bitstream
  header; :mod:`~pipeline.serve.inputs`), then calls the model deployments through handles.
- ``CodecModel`` (:mod:`~pipeline.serve.deployments`): the codec checkpoint (a path, or
  the MLflow ``champion`` resolved from ``models:/NAME@champion``), loaded once per
  replica; compress, decompress, round trip with metrics.
- ``MaskModel`` (:mod:`~pipeline.serve.deployments`): the CLIP model for text masks
  (loaded once per replica) and the saliency models; turns prompts / ``saliency`` into a
  float mask.

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
form, 503 a model deployment unavailable, 500 anything else (:mod:`~pipeline.serve.errors`:
one body builder, one exception handler). A bad request never takes a replica down: the
model deployments return errors as values and the ingress app handles every exception.

:func:`build_app` is the application builder for ``serve run cluster/serve_config.yaml``
(``import_path: pipeline.serve.app:build_app``) and :func:`deploy` is what
``jobs/deploy.py`` calls. The settings and autoscaling choices are in
:mod:`~pipeline.serve.settings` (:class:`~pipeline.serve.settings.ServeSettings`,
:func:`~pipeline.serve.settings.deployment_options`).
"""

from dataclasses import asdict
from typing import Any

from ray import serve

from pipeline.serve.deployments import CodecModel, MaskModel
from pipeline.serve.gateway import Gateway
from pipeline.serve.settings import ServeSettings, deployment_options


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

