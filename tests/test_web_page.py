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

from serve_fixtures import png_bytes, sample_image  # noqa: E402

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
    from pipeline.eval.metrics import psnr, roi_psnr
    from pipeline.masks import TextMasker, build_mask

    arr, _ = sample_image(64, seed=11)
    image_path = tmp_path / "street.png"
    image_path.write_bytes(png_bytes(arr))
    sync_api.expect(page.locator("#model-info")).to_contain_text("model tma", timeout=TIMEOUT_MS)

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
    roi, nonroi = roi_psnr(x, y, mask_to_tensor(mask, (64, 64)))
    shown = lambda v: "n/a" if math.isnan(v) else f"{v:.2f} dB"  # noqa: E731 - the page's format
    assert re.fullmatch(r"\d+\.\d\d dB", page.inner_text("#psnr-value"))
    assert page.inner_text("#psnr-value") == shown(psnr(x, y))
    assert page.inner_text("#roi-psnr-value") == shown(roi)  # n/a: a random CLIP's mask may have no ROI
    assert page.inner_text("#nonroi-psnr-value") == shown(nonroi)
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
