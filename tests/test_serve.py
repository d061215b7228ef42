"""The Ray Serve HTTP service against a real app on 127.0.0.1 (see serve_fixtures.py).

Round trips over HTTP equal the library's results bit for bit; every bad input gets
its status code and a JSON error, and the service keeps answering afterwards.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.codec.checkpoint import fingerprint, load_checkpoint
from pipeline.codec.coding import bits_per_pixel, decode, encode, image_to_tensor, mask_to_tensor, tensor_to_image
from pipeline.masks import TextMasker, build_mask
from pipeline.masks.ops import to_png

from serve_fixtures import APP_NAME, MAX_PIXELS, MAX_UPLOAD_MB, png_bytes, sample_image  # noqa: E402

pytest_plugins = ["serve_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a dog", "a person"]


@pytest.fixture(scope="module")
def client(serve_app):
    with serve_app.client() as c:
        yield c


@pytest.fixture(scope="module")
def model(serve_app):
    return load_checkpoint(serve_app.checkpoint)


@pytest.fixture(scope="module")
def masker(serve_app):
    return TextMasker("tiny", None, config=serve_app.clip_config)


@pytest.fixture(scope="module")
def image():
    arr, mask = sample_image(64, seed=7)
    return arr, mask


def _library_mask(source: str, arr: np.ndarray, mask: np.ndarray, masker) -> np.ndarray | None:
    img = Image.fromarray(arr)
    if source == "none":
        return None
    if source == "file":  # as the CLI reads a mask PNG
        return np.asarray(Image.open(io.BytesIO(to_png(mask))).convert("L"), dtype=np.float32) / 255.0
    if source == "prompt":
        return build_mask(img, prompts=PROMPTS, text_masker=masker)
    return build_mask(img, saliency=True)


def _form(source: str, mask: np.ndarray) -> tuple[dict, dict]:
    data: dict = {"roi_quality": "0.25", "rate": "0.7"}
    files: dict = {}
    if source == "file":
        files["mask"] = ("mask.png", to_png(mask), "image/png")
    elif source == "prompt":
        data["prompt"] = ", ".join(PROMPTS)
    elif source == "saliency":
        data["saliency"] = "true"
    return data, files


@pytest.mark.parametrize("source", ["none", "file", "prompt", "saliency"])
def test_roundtrip_over_http_equals_library(client, model, masker, image, source):
    arr, objects = image
    data, files = _form(source, objects)
    files["image"] = ("photo.png", png_bytes(arr), "image/png")
    res = client.post("compress", data=data, files=files)
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "application/octet-stream"
    lib_mask = _library_mask(source, arr, objects, masker)
    x = image_to_tensor(Image.fromarray(arr))
    expected = encode(model, x, None if lib_mask is None else mask_to_tensor(lib_mask, (64, 64)), 0.25, 0.7)
    assert res.content == expected  # identical bytes
    assert res.headers["x-width"] == "64" and res.headers["x-height"] == "64"
    assert float(res.headers["x-bpp"]) == pytest.approx(bits_per_pixel(expected, 64, 64), abs=1e-6)
    assert res.headers["x-mask-source"] == source
    assert res.headers["content-disposition"] == 'attachment; filename="photo.roic"'

    png = client.post("decompress", files={"file": ("photo.roic", res.content, "application/octet-stream")})
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(png.content)))
    want = np.asarray(tensor_to_image(decode(model, expected)))
    np.testing.assert_array_equal(got, want)  # identical pixels


def test_mask_endpoint_equals_library(client, masker, image):
    arr, _ = image
    res = client.post("mask", data={"prompt": PROMPTS}, files={"image": ("p.png", png_bytes(arr), "image/png")})
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == "image/png" and res.headers["x-mask-source"] == "prompt"
    got = np.asarray(Image.open(io.BytesIO(res.content)))
    want = np.asarray(Image.open(io.BytesIO(to_png(build_mask(Image.fromarray(arr), prompts=PROMPTS,
                                                                      text_masker=masker)))))
    assert got.shape == (64, 64)
    np.testing.assert_array_equal(got, want)


def test_roundtrip_json_metrics(client, model, image):
    from pipeline.eval.metrics import psnr, quality_weighted_psnr, roi_psnr

    arr, objects = image
    res = client.post("roundtrip", data={"roi_quality": "0.25", "rate": "0.7"},
                      files={"image": ("p.png", png_bytes(arr), "image/png"),
                             "mask": ("m.png", to_png(objects), "image/png")})
    assert res.status_code == 200, res.text
    body = res.json()
    x = image_to_tensor(Image.fromarray(arr))
    m = mask_to_tensor(Image.open(io.BytesIO(to_png(objects))), (64, 64))
    expected = encode(model, x, m, 0.25, 0.7)
    assert base64.b64decode(body["roic"]) == expected
    assert body["bytes"] == len(expected) and body["bpp"] == pytest.approx(bits_per_pixel(expected, 64, 64))
    rec = Image.open(io.BytesIO(base64.b64decode(body["reconstruction_png"])))
    want = tensor_to_image(decode(model, expected))
    np.testing.assert_array_equal(np.asarray(rec), np.asarray(want))
    y = image_to_tensor(want)
    roi, nonroi = roi_psnr(x, y, m)
    assert body["psnr"] == pytest.approx(psnr(x, y)) and body["roi_psnr"] == pytest.approx(roi)
    assert body["nonroi_psnr"] == pytest.approx(nonroi)
    assert body["weighted_psnr"] == pytest.approx(quality_weighted_psnr(x, y, m, 0.25))
    assert Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))).size == (64, 64)
    assert (body["width"], body["height"], body["mask_source"], body["graded"]) == (64, 64, "file", False)


def test_graded_soft_mask_over_http(client, model, image):
    """``graded=true``: the cells follow a soft mask's ramp (a level map of more than two steps),
    unlike the binary file of the same mask; the file decodes to the returned reconstruction."""
    from pipeline.codec.bitstream import unpack
    from pipeline.codec.level_map import unpack_levels
    from pipeline.eval.metrics import quality_weighted_psnr

    arr, _ = image
    h, w = arr.shape[:2]
    ramp = np.tile(np.linspace(0.0, 1.0, w, dtype=np.float32), (h, 1))  # soft: 0 on the left, 1 on the right
    form = {"roi_quality": "0.05", "rate": "0.7", "graded": "true"}
    files = {"image": ("p.png", png_bytes(arr), "image/png"), "mask": ("ramp.png", to_png(ramp), "image/png")}
    res = client.post("roundtrip", data=form, files=files)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["graded"] is True and body["mask_source"] == "file"
    assert isinstance(body["weighted_psnr"], float) and math.isfinite(body["weighted_psnr"])

    data = base64.b64decode(body["roic"])
    x = image_to_tensor(Image.fromarray(arr))
    m = mask_to_tensor(Image.open(io.BytesIO(to_png(ramp))), (h, w))
    assert data == encode(model, x, m, 0.05, 0.7, graded=True)  # the library's bytes
    want = tensor_to_image(decode(model, data))
    rec = Image.open(io.BytesIO(base64.b64decode(body["reconstruction_png"])))
    np.testing.assert_array_equal(np.asarray(rec), np.asarray(want))
    assert body["weighted_psnr"] == pytest.approx(quality_weighted_psnr(x, image_to_tensor(want), m, 0.05))

    binary = encode(model, x, m, 0.05, 0.7)  # the same mask, binary cells
    assert binary != data
    grid = (math.ceil(h / 64) * 4, math.ceil(w / 64) * 4)
    graded_steps = unpack_levels(unpack(data)[1][2][0], grid)
    binary_steps = unpack_levels(unpack(binary)[1][2][0], grid)
    assert len(torch.unique(graded_steps)) > 2, graded_steps  # the ramp's levels
    assert len(torch.unique(binary_steps)) == 2, binary_steps  # ROI and background
    left, right = graded_steps[0, 0, :, 0], graded_steps[0, 0, :, -1]
    assert bool((left > right).all())  # coarser where the mask is low

    compressed = client.post("compress", data=form, files=files)  # /compress takes graded as well
    assert compressed.status_code == 200, compressed.text
    assert compressed.content == data


def test_healthz_and_openapi(client, serve_app, model):
    h = client.get("healthz")
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["codec"]["fingerprint"] == fingerprint(model).hex()
    assert body["codec"]["variant"] == model.variant and body["masks"]["text_masks"] is True
    schema = client.get("openapi.json").json()
    for path in ("/compress", "/decompress", "/mask", "/roundtrip"):
        assert "post" in schema["paths"][path], path
    assert "get" in schema["paths"]["/healthz"]
    form = schema["paths"]["/compress"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in form:
        form = schema["components"]["schemas"][form["$ref"].rsplit("/", 1)[-1]]
    assert {"image", "prompt", "mask", "saliency", "roi_quality", "rate", "graded"} <= set(form["properties"])
    page = client.get("")
    assert page.status_code == 200 and 'id="compress-btn"' in page.text
    assert client.get("static/app.js").status_code == 200
    assert client.get("static/../app.py").status_code == 404


def _chunked(body: bytes, chunk: int = 64 * 1024):
    for i in range(0, len(body), chunk):
        yield body[i:i + chunk]


def _multipart(boundary: str, field: str, filename: str, payload: bytes) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()


def test_bad_inputs_get_their_status_and_the_service_survives(client, serve_app, image):
    from pipeline.codec.coding import encode as lib_encode

    arr, objects = image
    good = png_bytes(arr)
    big = int(MAX_UPLOAD_MB * 2**20) + 4096
    noise = np.random.default_rng(0).integers(0, 256, big, dtype=np.uint8).tobytes()
    side = int(MAX_PIXELS ** 0.5) + 8
    huge = png_bytes(np.zeros((side, side, 3), np.uint8))  # a small file of too many pixels
    roic = client.post("compress", files={"image": ("p.png", good, "image/png")}).content
    other = load_checkpoint(serve_app.other_checkpoint)
    foreign = lib_encode(other, image_to_tensor(Image.fromarray(arr)))
    img = lambda data, name="p.png": {"image": (name, data, "image/png")}  # noqa: E731

    cases = [  # (label, endpoint, kwargs, status, text in the error)
        ("oversized upload (Content-Length)", "compress", {"files": img(noise + good)}, 413, "too large"),
        ("not an image", "compress", {"files": img(b"hello, I am text", "a.txt")}, 415, "not a supported image"),
        ("corrupt image", "compress", {"files": img(good[: len(good) // 2])}, 400, "corrupt"),
        ("empty image", "compress", {"files": img(b"")}, 400, "empty"),
        ("too many pixels", "compress", {"files": img(huge)}, 413, "pixels"),
        ("roi_quality > 1", "compress", {"files": img(good), "data": {"roi_quality": "1.5"}}, 422, "roi_quality"),
        ("rate < 0", "roundtrip", {"files": img(good), "data": {"rate": "-0.1"}}, 422, "rate"),
        ("rate not a number", "compress", {"files": img(good), "data": {"rate": "fast"}}, 422, "rate"),
        ("rate nan", "compress", {"files": img(good), "data": {"rate": "nan"}}, 422, "rate"),
        ("graded not a bool", "roundtrip", {"files": img(good), "data": {"graded": "maybe"}}, 422, "graded"),
        ("too many prompts", "compress", {"files": img(good), "data": {"prompt": ",".join("abcdefghij")}}, 422,
         "prompts"),
        ("mask and prompt", "compress", {"files": {**img(good), "mask": ("m.png", to_png(objects), "image/png")},
                                         "data": {"prompt": "a dog"}}, 422, "not both"),
        ("mask not an image", "compress", {"files": {**img(good), "mask": ("m.png", b"nope", "image/png")}}, 415,
         "mask"),
        ("no image", "compress", {"data": {"rate": "0.5"}}, 422, "image"),
        ("mask without a source", "mask", {"files": img(good)}, 422, "no mask source"),
        ("bitstream of another checkpoint", "decompress", {"files": {"file": ("f.roic", foreign)}}, 400,
         "different checkpoint"),
        ("truncated bitstream", "decompress", {"files": {"file": ("f.roic", roic[:-7])}}, 400, ".roic"),
        ("not a bitstream", "decompress", {"files": {"file": ("f.roic", good)}}, 400, "not a .roic"),
        ("empty bitstream", "decompress", {"files": {"file": ("f.roic", b"")}}, 400, "empty"),
    ]
    for label, endpoint, kwargs, status, text in cases:
        res = client.post(endpoint, **kwargs)
        assert res.status_code == status, (label, res.status_code, res.text[:300])
        body = res.json()
        assert text.lower() in body["error"].lower(), (label, body)
        assert body["status"] == status, label

    # the body limit holds without a Content-Length header too (chunked upload, bytes counted)
    boundary = "roicodecboundary"
    res = client.post("compress", content=_chunked(_multipart(boundary, "image", "big.png", noise)),
                      headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert res.status_code == 413, res.text[:300]
    assert "too large" in res.json()["error"]

    assert client.get("healthz").status_code == 200  # still up, and still working:
    assert client.post("compress", files=img(good)).content == roic


@pytest.fixture(scope="module")
def no_text_client(serve_app):
    """A second app on the session's Serve, started in seconds: the session app's CodecModel,
    a MaskModel with text masks off (prompts answer 503) and a Gateway with half the upload
    limit. Serve removes it with the session's app."""
    import httpx
    from ray import serve

    from pipeline.serve.deployments import MaskModel
    from pipeline.serve.gateway import Gateway
    from pipeline.serve.settings import ServeSettings

    s = ServeSettings.from_args({**serve_app.args, "text_masks": False, "max_upload_mb": MAX_UPLOAD_MB / 2})
    settings = dataclasses.asdict(s)
    codec = serve.get_deployment_handle("CodecModel", app_name=APP_NAME)
    one = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}
    masks = MaskModel.options(**one).bind(settings)
    serve.run(Gateway.options(**one).bind(codec, masks, settings), name="roicodec-no-text", route_prefix="/no-text")
    with httpx.Client(base_url=f"{serve_app.url}no-text/", timeout=120) as c:
        yield c


def test_every_error_has_one_shape(client, no_text_client, image):
    good = png_bytes(image[0])
    big = np.zeros(int(MAX_UPLOAD_MB * 2**20) + 4096, np.uint8).tobytes()
    img = lambda data, name="p.png": {"files": {"image": (name, data, "image/png")}}  # noqa: E731
    boundary = "roicodecboundary"
    chunked = {"content": _chunked(_multipart(boundary, "image", "big.png", big)),
               "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}
    cases = [  # (client, method, path, kwargs, status, text in the error): every way an error is made
        (client, "POST", "compress", img(big), 413, f"upload too large (limit {MAX_UPLOAD_MB:g} MB)"),
        (no_text_client, "POST", "compress", img(big), 413, f"upload too large (limit {MAX_UPLOAD_MB / 2:g} MB)"),
        (client, "POST", "compress", chunked, 413, "too large"),
        (client, "POST", "compress", img(b"text", "a.txt"), 415, "not a supported image"),
        (client, "POST", "decompress", {"files": {"file": ("f.roic", good)}}, 400, "not a .roic"),
        (client, "POST", "compress", {**img(good), "data": {"rate": "2"}}, 422, "rate"),
        (client, "POST", "mask", img(good), 422, "no mask source"),
        (client, "GET", "static/nothing.js", {}, 404, "not found"),
        (client, "GET", "compress", {}, 405, "not allowed"),
        (no_text_client, "POST", "compress", {**img(good), "data": {"prompt": "a dog"}}, 503, "turned off"),
    ]
    for c, method, path, kwargs, status, text in cases:
        res = c.request(method, path, **kwargs)
        assert res.status_code == status, (path, status, res.text[:300])
        assert res.headers["content-type"] == "application/json", (path, status)
        body = res.json()
        assert set(body) == {"error", "status"} and type(body["status"]) is int, body
        assert body["status"] == status and isinstance(body["error"], str), body
        assert text.lower() in body["error"].lower(), (text, body)
    assert no_text_client.post("compress", **img(good)).status_code == 200  # the rest of that app works


def test_an_unexpected_error_is_a_json_500_and_the_limit_is_the_apps():
    """The ingress's error handler and upload middleware on a bare FastAPI app (no Serve)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pipeline.serve.errors import install_error_handler
    from pipeline.serve.inputs import UploadLimitMiddleware

    api = FastAPI()
    api.add_middleware(UploadLimitMiddleware, limit=lambda: 2**20)
    install_error_handler(api)

    @api.post("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom\nsecond line")

    with TestClient(api, raise_server_exceptions=False) as c:
        res = c.post("/boom")
        assert (res.status_code, res.json()) == (500, {"error": "internal error: kaboom", "status": 500})
        res = c.post("/boom", content=bytes(2**20 + 1))
        assert res.json() == {"error": "upload too large (limit 1 MB)", "status": 413}


def test_serve_config_yaml_is_a_valid_serve_config(serve_app):
    from ray.serve.schema import ServeDeploySchema

    from pipeline.serve.app import build_app

    config = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    (app_cfg,) = config["applications"]
    module, attr = app_cfg["import_path"].split(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    args = {**app_cfg["args"], "checkpoint": str(serve_app.checkpoint), "model_uri": None,
            "clip_config": str(serve_app.clip_config), "use_gpu": False}
    application = build_app(args)
    names = {d["name"] for d in app_cfg.get("deployments", [])}
    assert names <= {"Gateway", "CodecModel", "MaskModel"}
    assert type(application).__name__ == "Application"


def test_deployment_options_autoscaling_and_gpu(serve_app):
    from pipeline.serve.settings import ServeSettings, deployment_options, resolve_use_gpu

    s = ServeSettings.from_args({"checkpoint": str(serve_app.checkpoint), "use_gpu": True})
    opts = deployment_options(s)
    codec = opts["CodecModel"]
    assert codec["ray_actor_options"]["num_gpus"] == 0.5 and codec["max_ongoing_requests"] == 4
    assert codec["autoscaling_config"]["target_ongoing_requests"] == 2.0
    assert codec["autoscaling_config"]["min_replicas"] == 1 and codec["autoscaling_config"]["max_replicas"] == 4
    assert "num_gpus" not in opts["Gateway"]["ray_actor_options"]
    fixed = deployment_options(ServeSettings.from_args({"checkpoint": str(serve_app.checkpoint),
                                                        "codec_replicas": 2, "use_gpu": "false"}))
    assert fixed["CodecModel"]["num_replicas"] == 2 and "autoscaling_config" not in fixed["CodecModel"]
    assert "num_gpus" not in fixed["CodecModel"]["ray_actor_options"]
    assert resolve_use_gpu("auto") == torch.cuda.is_available()
    with pytest.raises(ValueError, match="give one of"):  # neither: the default model (tests/test_default_model.py)
        ServeSettings.from_args({"checkpoint": str(serve_app.checkpoint), "model_uri": "models:/x@champion"})
    with pytest.raises(ValueError, match="unknown app argument"):
        ServeSettings.from_args({"checkpoint": str(serve_app.checkpoint), "chekpoint": "x"})


def test_deploy_script_arguments(serve_app, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("deploy_job", ROOT / "jobs" / "deploy.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    ns = job.build_parser().parse_args(["--checkpoint", str(serve_app.checkpoint), "--clip-config",
                                        str(serve_app.clip_config), "--codec-replicas", "2", "--port", "8123"])
    args = job.app_args(ns)
    assert args["codec_replicas"] == 2 and args["clip_config"] == str(serve_app.clip_config)
    from pipeline.serve.settings import ServeSettings

    assert ServeSettings.from_args(args).clip_config["embed_dim"] == 32
    assert job.main(["--checkpoint", str(tmp_path / "missing.pt"), "--no-block"]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_champion_from_mlflow_resolves_to_the_checkpoint(serve_app, tmp_path):
    tracking = pytest.importorskip("pipeline.train.tracking")
    from pipeline.mlflow_store import resolve_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.start_run(uri, "serve-test", "serve-run", {"variant": "tma"})
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    (ckdir / "model.pt").write_bytes(serve_app.checkpoint.read_bytes())
    out = tracking.finish_run(uri, run_id, checkpoint_dir=ckdir, final_metrics={"val_loss": 1.0, "step": 3},
                              registered_model="roicodec-serve-test")
    assert out["champion_version"] == "1"
    path, info = resolve_checkpoint(None, "models:/roicodec-serve-test@champion", uri)
    assert fingerprint(load_checkpoint(path)) == fingerprint(load_checkpoint(serve_app.checkpoint))
    assert info["model_version"] == "1" and info["run_id"] == run_id
