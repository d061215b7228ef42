"""The web page in a real browser: headless Chromium (Debian's) driven by Playwright.

Uses the session's Serve app (serve_fixtures.py): upload an image, type prompts,
compress, and see the mask overlay, the reconstruction, the bpp and the PSNRs; the
downloaded ``.roic`` file is the library's bytes. A screenshot lands in the test's tmp.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from serve_fixtures import VARIANT, png_bytes, sample_image  # noqa: E402

pytest_plugins = ["serve_fixtures"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 120_000  # a loaded 2-core machine; every wait below is bounded by this

# `make setup` installs Debian's chromium; a missing browser is a failed setup, not a skip.
assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: run `make setup` (apt-get install chromium)"
from playwright import sync_api  # noqa: E402 - a dependency: fail, do not skip, when it is missing


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, serve_app):
    context = browser.new_context(viewport={"width": 1200, "height": 950}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(serve_app.url)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_upload_prompt_compress_shows_reconstruction_and_bpp(page, serve_app, tmp_path):
    from pipeline.codec.checkpoint import load_checkpoint
    from pipeline.codec.coding import (bits_per_pixel, decode, encode, image_to_tensor, mask_to_tensor,
                                       tensor_to_image)
    from pipeline.eval.metrics import psnr, quality_weighted_psnr, roi_psnr
    from pipeline.masks import TextMasker, build_mask

    arr, _ = sample_image(64, seed=11)
    image_path = tmp_path / "street.png"
    image_path.write_bytes(png_bytes(arr))
    sync_api.expect(page.locator("#model-info")).to_contain_text(f"model {VARIANT}", timeout=TIMEOUT_MS)

    page.set_input_files("#image-input", str(image_path))
    sync_api.expect(page.locator("#compress-btn")).to_be_enabled()
    page.check("#source-prompt")
    page.fill("#prompt-input", "a dog, a person")
    page.locator("#roi-quality").fill("0.2")  # range inputs: fill sets the value and fires input/change
    page.locator("#rate").fill("0.8")
    sync_api.expect(page.locator("#roi-quality-value")).to_have_text("0.20")
    page.click("#compress-btn")
    page.wait_for_selector("#results[data-ready='true']", timeout=TIMEOUT_MS)

    # the numbers and images the page shows are the library's
    model = load_checkpoint(serve_app.checkpoint)
    masker = TextMasker("tiny", None, config=serve_app.clip_config)
    mask = build_mask(Image.fromarray(arr), prompts=["a dog", "a person"], text_masker=masker)
    expected = encode(model, image_to_tensor(Image.fromarray(arr)), mask_to_tensor(mask, (64, 64)), 0.2, 0.8)
    bpp_text = page.inner_text("#bpp-value")
    assert bpp_text == f"{bits_per_pixel(expected, 64, 64):.4f} bpp", bpp_text
    assert page.inner_text("#bytes-value") == f"{len(expected)} bytes"
    x = image_to_tensor(Image.fromarray(arr))
    y = image_to_tensor(tensor_to_image(decode(model, expected)))
    m = mask_to_tensor(mask, (64, 64))
    roi, nonroi = roi_psnr(x, y, m)
    shown = lambda v: "n/a" if math.isnan(v) else f"{v:.2f} dB"  # noqa: E731 - the page's format
    assert re.fullmatch(r"\d+\.\d\d dB", page.inner_text("#psnr-value"))
    assert page.inner_text("#psnr-value") == shown(psnr(x, y))
    assert page.inner_text("#roi-psnr-value") == shown(roi)  # n/a: a random CLIP's mask may have no ROI
    assert page.inner_text("#nonroi-psnr-value") == shown(nonroi)
    assert page.inner_text("#weighted-psnr-value") == shown(quality_weighted_psnr(x, y, m, 0.2))
    rec = page.locator("#reconstruction-img")
    sync_api.expect(rec).to_be_visible()
    assert rec.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]") == [True, 64, 64]
    sync_api.expect(page.locator("#mask-img")).to_be_visible()
    assert page.locator("#overlay-canvas").evaluate("c => [c.width, c.height]") == [64, 64]
    assert page.locator("#error").is_hidden()

    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.click("#download-link")
    download = info.value
    assert download.suggested_filename == "street.roic"
    assert Path(download.path()).read_bytes() == expected

    shot = tmp_path / "web_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_page_shows_the_service_error_for_a_bad_file(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    page.set_input_files("#image-input", str(bad))
    page.check("#source-none")
    sync_api.expect(page.locator("#prompt-field")).to_be_hidden()
    page.click("#compress-btn")
    error = page.locator("#error")
    sync_api.expect(error).to_be_visible(timeout=TIMEOUT_MS)
    sync_api.expect(error).to_contain_text("not a supported image")
    assert page.locator("#results").get_attribute("data-ready") == "false"


def _form_parts(body: bytes | None) -> dict[str, bytes]:
    """The fields of a multipart form body as the browser sent it: name -> bytes (files included)."""
    assert body, "the request carried no form body"
    boundary = body.split(b"\r\n", 1)[0]  # "--" + the boundary
    parts = {}
    for chunk in body.split(boundary)[1:-1]:
        head, _, payload = chunk[2:].partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        assert name is not None and payload.endswith(b"\r\n"), head
        parts[name.group(1).decode()] = payload[:-2]
    assert parts, body[:200]
    return parts


def _roundtrip(page, sent: list, click: str):  # noqa: ANN001, ANN202
    """Click ``click`` (Compress): the form the page sent (``sent`` is filled by a pass-through
    route, which sees the body Chromium reports) and the service's JSON answer."""
    n = len(sent)
    is_roundtrip = lambda r: r.url.endswith("/roundtrip") and r.request.method == "POST"  # noqa: E731
    with page.expect_response(is_roundtrip, timeout=TIMEOUT_MS) as info:
        page.click(click)
    response = info.value
    assert response.status == 200, response.text()[:300]
    page.wait_for_selector("#results[data-ready='true']", timeout=TIMEOUT_MS)
    assert len(sent) == n + 1, "one request per Compress"
    return _form_parts(sent[-1]), response.json()


def test_paint_importance_sends_a_graded_map_and_the_painted_region_is_sharper(page, serve_app, tmp_path):
    """Paint the left copy of a doubled photo with the "best" brush at a low floor: the page sends
    the painted levels (gray PNG at the image's size) with graded=true, and in the file it gets back
    the painted pixels decode better than the rest and than the same pixels' unpainted copy."""
    import base64
    import io

    import numpy as np
    import torch

    from pipeline.codec.checkpoint import load_checkpoint
    from pipeline.codec.coding import decode, image_to_tensor, tensor_to_image
    from pipeline.eval.metrics import masked_psnr

    tile, _ = sample_image(64, seed=11)
    arr = np.concatenate([tile, tile], axis=1)  # 64x128: the right half a copy of the left
    h, w = arr.shape[:2]
    photo = png_bytes(arr)
    sync_api.expect(page.locator("#model-info")).to_contain_text(f"model {VARIANT}", timeout=TIMEOUT_MS)
    # from memory, not a path: Chromium reports the bytes of in-memory files in the request's body
    page.set_input_files("#image-input", files=[{"name": "twins.png", "mimeType": "image/png", "buffer": photo}])
    sync_api.expect(page.locator("#compress-btn")).to_be_enabled()
    page.check("#source-paint")
    sync_api.expect(page.locator("#prompt-field")).to_be_hidden()
    sync_api.expect(page.locator("#paint-field")).to_contain_text("replaces prompts")
    canvas = page.locator("#paint-canvas")
    sync_api.expect(canvas).to_be_visible()
    assert canvas.evaluate("c => [c.width, c.height]") == [w, h]
    page.locator("#roi-quality").fill("0.1")
    sent: list[bytes | None] = []  # the requests go on to the service unchanged
    page.route("**/roundtrip", lambda route: (sent.append(route.request.post_data_buffer), route.continue_()))

    # nothing painted: uniform quality, no mask and no graded field (the harness tells the two apart)
    form, body = _roundtrip(page, sent, "#compress-btn")
    assert form["image"] == photo and form["roi_quality"] == b"0.1", sorted(form)
    assert "graded" not in form and "mask" not in form, sorted(form)
    assert body["graded"] is False and body["mask_source"] == "none"

    # paint a block of the left half with "best": a zigzag of strokes in image pixels 16..48
    page.click("#brush-best")
    page.locator("#brush-size").fill("24")
    box = canvas.bounding_box()
    left, top, cw, ch = canvas.evaluate("c => [c.clientLeft, c.clientTop, c.clientWidth, c.clientHeight]")
    scale = min(cw / w, ch / h)  # the canvas shows the image "object-fit: contain"
    ox, oy = box["x"] + left + (cw - w * scale) / 2, box["y"] + top + (ch - h * scale) / 2
    at = lambda x, y: (ox + x * scale, oy + y * scale)  # noqa: E731 - image pixel -> page point
    page.mouse.move(*at(16, 16))
    page.mouse.down()
    for k, y in enumerate(range(16, 49, 4)):
        page.mouse.move(*at(48 if k % 2 == 0 else 16, y), steps=6)
        page.mouse.move(*at(48 if k % 2 == 0 else 16, y + 4), steps=2)
    page.mouse.up()
    sync_api.expect(page.locator("#paint-status")).to_contain_text("% of the image painted")

    form, body = _roundtrip(page, sent, "#compress-btn")
    assert form.get("graded") == b"true" and "mask" in form and "prompt" not in form, sorted(form)
    assert form["roi_quality"] == b"0.1"
    sent = np.asarray(Image.open(io.BytesIO(form["mask"])).convert("L"))
    assert sent.shape == (h, w)  # the image's own pixel size
    assert set(np.unique(sent).tolist()) == {0, 255}  # the brush's levels only: no blur
    painted = sent == 255
    assert painted[16:49, 16:49].all() and not painted[:, 64:].any()  # the block, in the left half only
    assert not painted[:4].any() and not painted[-4:].any()
    returned = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    np.testing.assert_array_equal(returned, sent)  # the service coded that map
    assert body["graded"] is True and body["mask_source"] == "file"
    sync_api.expect(page.locator("#weighted-psnr-value")).to_have_text(f"{body['weighted_psnr']:.2f} dB")

    # the file the page got, decoded by the library: the painted pixels are the sharpest
    roic = base64.b64decode(body["roic"])
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.click("#download-link")
    assert Path(info.value.path()).read_bytes() == roic
    model = load_checkpoint(serve_app.checkpoint)
    x = image_to_tensor(Image.fromarray(arr))
    y = image_to_tensor(tensor_to_image(decode(model, roic)))
    weight = torch.from_numpy(painted.astype(np.float32))[None, None]
    copy = torch.roll(weight, w // 2, dims=-1)  # the same pixels in the unpainted right half
    inside, rest, twin = masked_psnr(x, y, weight), masked_psnr(x, y, 1 - weight), masked_psnr(x, y, copy)
    print(f"painted {inside:.2f} dB, the rest {rest:.2f} dB, the painted pixels' copy {twin:.2f} dB")
    assert inside > rest and inside > twin

    shot = tmp_path / "web_page_paint.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

    # back to prompts: the painted map is kept, not sent, and the page says so
    page.check("#source-prompt")
    sync_api.expect(page.locator("#paint-kept")).to_be_visible()
    sync_api.expect(canvas).to_be_hidden()
