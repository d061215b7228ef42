// roicodec web page: plain JS, no build step. Talks to the same service (relative URLs,
// so the app works under any route prefix): POST roundtrip, POST decompress, GET healthz.
// "Paint importance" keeps a map of brush levels at the image's own pixel size and sends it
// as the mask (gray = level x 255) with graded=true; unpainted pixels get the ROI quality.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  file: null, bitmap: null, downloadUrl: null, busy: false, again: false, hasResult: false, lastMask: null,
  // the painted map: one gray level (0..255) per image pixel, its overlay's RGBA pixels, the brush
  paint: { width: 0, height: 0, levels: null, image: null, count: 0, level: 255, painting: false, last: null },
};

// overlay colours of the brush levels (gray value -> RGBA); 0 (unpainted / erased) is transparent
const LEVEL_COLOURS = [[255, [217, 80, 26, 170]], [153, [232, 176, 0, 150]], [77, [60, 120, 210, 130]]];
const LEVEL_LUT = Array.from({ length: 256 }, (_, v) => {
  if (v === 0) return [0, 0, 0, 0];
  let best = LEVEL_COLOURS[0];
  for (const c of LEVEL_COLOURS) if (Math.abs(c[0] - v) < Math.abs(best[0] - v)) best = c;
  return best[1];
});

function fmt(value, digits, unit) {
  return value === null || value === undefined ? "n/a" : `${Number(value).toFixed(digits)}${unit || ""}`;
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function setStatus(message) { $("status").textContent = message; }

function maskSource() { return document.querySelector('input[name="mask-source"]:checked').value; }

function b64ToBytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("could not display the image"));
    img.src = src;
  });
}

// Original image on the canvas; with a mask, the ROI tinted orange and the rest dimmed.
async function drawOverlay(maskB64) {
  const canvas = $("overlay-canvas");
  const ctx = canvas.getContext("2d");
  if (!state.bitmap) return;
  canvas.width = state.bitmap.width;
  canvas.height = state.bitmap.height;
  ctx.drawImage(state.bitmap, 0, 0);
  if (!maskB64) return;
  const mask = await loadImage("data:image/png;base64," + maskB64);
  const off = document.createElement("canvas");
  off.width = canvas.width;
  off.height = canvas.height;
  const octx = off.getContext("2d");
  octx.drawImage(mask, 0, 0, off.width, off.height);
  const m = octx.getImageData(0, 0, off.width, off.height).data;
  const img = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const p = img.data;
  for (let i = 0; i < p.length; i += 4) {
    const w = m[i] / 255;                  // 1 = ROI
    const dim = 0.45 + 0.55 * w;            // background dimmed
    const tint = 0.35 * w;                  // ROI tinted orange
    p[i] = p[i] * dim * (1 - tint) + 255 * tint;
    p[i + 1] = p[i + 1] * dim * (1 - tint) + 140 * tint;
    p[i + 2] = p[i + 2] * dim * (1 - tint);
  }
  ctx.putImageData(img, 0, 0);
}

async function chooseImage(file) {
  state.file = file || null;
  state.hasResult = false;
  showError("");
  $("results").dataset.ready = "false";
  if (!file) { $("compress-btn").disabled = true; return; }
  try {
    state.bitmap = await loadImage(URL.createObjectURL(file));
  } catch (e) {
    state.bitmap = null;  // let the service say what is wrong with the file
  }
  state.lastMask = null;
  await drawOverlay(null);
  resetPaint();
  $("compress-btn").disabled = false;
  setStatus(`${file.name} ready: set the region of interest and compress.`);
}

// -- paint importance --

function resetPaint() {
  const p = state.paint;
  const canvas = $("paint-canvas");
  p.width = state.bitmap ? state.bitmap.naturalWidth : 0;
  p.height = state.bitmap ? state.bitmap.naturalHeight : 0;
  p.count = 0;
  p.painting = false;
  p.last = null;
  if (p.width && p.height) {
    canvas.width = p.width;  // also clears it
    canvas.height = p.height;
    p.levels = new Uint8Array(p.width * p.height);
    p.image = canvas.getContext("2d").createImageData(p.width, p.height);
  } else {
    p.levels = null;
    p.image = null;
  }
  syncSource();
}

function clearPaint() {
  const p = state.paint;
  if (!p.levels) return;
  p.levels.fill(0);
  p.image.data.fill(0);
  p.count = 0;
  $("paint-canvas").getContext("2d").clearRect(0, 0, p.width, p.height);
  paintChanged();
}

function brushSize() { return Number($("brush-size").value); }  // its diameter in screen pixels

// A pointer event's position in image pixels (the canvas is drawn "object-fit: contain"), and the scale.
function toImage(ev) {
  const canvas = $("paint-canvas");
  const p = state.paint;
  const rect = canvas.getBoundingClientRect();
  const cw = canvas.clientWidth, ch = canvas.clientHeight;
  const scale = Math.min(cw / p.width, ch / p.height);
  const left = rect.left + canvas.clientLeft + (cw - p.width * scale) / 2;
  const top = rect.top + canvas.clientTop + (ch - p.height * scale) / 2;
  return { x: (ev.clientX - left) / scale, y: (ev.clientY - top) / scale, scale };
}

// Set the pixels whose centres lie in the disc to the brush level (no blending, so the map
// only ever holds the brush levels); grow the dirty box.
function stamp(cx, cy, r, v, box) {
  const p = state.paint;
  const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(p.width - 1, Math.ceil(cx + r));
  const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(p.height - 1, Math.ceil(cy + r));
  if (x0 > x1 || y0 > y1) return;
  const [cr, cg, cb, ca] = LEVEL_LUT[v];
  const d = p.image.data;
  const r2 = r * r;
  for (let y = y0; y <= y1; y++) {
    const dy = y + 0.5 - cy;
    for (let x = x0; x <= x1; x++) {
      const dx = x + 0.5 - cx;
      if (dx * dx + dy * dy > r2) continue;
      const i = y * p.width + x;
      const old = p.levels[i];
      if (old === v) continue;
      p.count += (v ? 1 : 0) - (old ? 1 : 0);
      p.levels[i] = v;
      d[4 * i] = cr; d[4 * i + 1] = cg; d[4 * i + 2] = cb; d[4 * i + 3] = ca;
    }
  }
  box.x0 = Math.min(box.x0, x0); box.y0 = Math.min(box.y0, y0);
  box.x1 = Math.max(box.x1, x1); box.y1 = Math.max(box.y1, y1);
}

// The brush from the last point to pt: discs close enough together to leave no gaps.
function strokeTo(pt) {
  const p = state.paint;
  const r = Math.max(0.75, brushSize() / 2 / pt.scale);  // at least the pixel under the pointer
  const from = p.last || pt;
  const n = Math.max(1, Math.ceil(Math.hypot(pt.x - from.x, pt.y - from.y) / Math.max(0.5, r / 3)));
  const box = { x0: Infinity, y0: Infinity, x1: -Infinity, y1: -Infinity };
  for (let k = p.last ? 1 : 0; k <= n; k++) {
    stamp(from.x + (pt.x - from.x) * k / n, from.y + (pt.y - from.y) * k / n, r, p.level, box);
  }
  p.last = pt;
  if (box.x1 >= box.x0) {
    $("paint-canvas").getContext("2d").putImageData(p.image, 0, 0, box.x0, box.y0,
                                                     box.x1 - box.x0 + 1, box.y1 - box.y0 + 1);
  }
  updatePaintStatus();
}

function moveBrushCursor(ev) {
  const cursor = $("brush-cursor");
  const rect = $("stage").getBoundingClientRect();
  cursor.style.left = `${ev.clientX - rect.left}px`;
  cursor.style.top = `${ev.clientY - rect.top}px`;
  cursor.style.width = cursor.style.height = `${brushSize()}px`;
  cursor.hidden = false;
}

function updatePaintStatus() {
  const p = state.paint;
  let text;
  if (!p.levels) text = "this browser cannot show this image, so it cannot be painted";
  else if (!p.count) text = "nothing painted yet: Compress codes the image at uniform quality";
  else text = `${(100 * p.count / (p.width * p.height)).toFixed(1)}% of the image painted`;
  $("paint-status").textContent = text;
  $("paint-kept").hidden = !(p.count > 0 && maskSource() !== "paint");
}

function paintChanged() {
  updatePaintStatus();
  if (state.hasResult && maskSource() === "paint") setStatus("The painted map changed: press Compress to code it.");
}

function setBrushLevel(button) {
  state.paint.level = Math.round(Number(button.dataset.level) * 255);
  document.querySelectorAll("button.level").forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
}

// The painted map as a grayscale PNG at the image's size: gray = level x 255, unpainted = 0.
function paintedMaskPng() {
  const p = state.paint;
  const canvas = document.createElement("canvas");
  canvas.width = p.width;
  canvas.height = p.height;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(p.width, p.height);
  const d = img.data;
  for (let i = 0; i < p.levels.length; i++) {
    const v = p.levels[i];
    d[4 * i] = v; d[4 * i + 1] = v; d[4 * i + 2] = v; d[4 * i + 3] = 255;  // opaque: exact values
  }
  ctx.putImageData(img, 0, 0);
  return new Promise((resolve, reject) => canvas.toBlob(
    (blob) => (blob ? resolve(blob) : reject(new Error("could not encode the painted map"))), "image/png"));
}

function bindPaint() {
  const canvas = $("paint-canvas");
  const p = state.paint;
  canvas.addEventListener("pointerdown", (ev) => {
    if (ev.button !== 0 || !p.levels) return;
    ev.preventDefault();
    canvas.setPointerCapture(ev.pointerId);
    p.painting = true;
    p.last = null;
    strokeTo(toImage(ev));
  });
  canvas.addEventListener("pointermove", (ev) => {
    moveBrushCursor(ev);
    if (p.painting) strokeTo(toImage(ev));
  });
  const end = () => {
    if (!p.painting) return;
    p.painting = false;
    p.last = null;
    paintChanged();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("pointerleave", () => { $("brush-cursor").hidden = true; });
  document.querySelectorAll("button.level").forEach((b) => b.addEventListener("click", () => setBrushLevel(b)));
  const size = $("brush-size");
  size.addEventListener("input", () => { $("brush-size-value").textContent = `${size.value} px`; });
  $("paint-clear").addEventListener("click", clearPaint);
}

// The form to send and whether it carries a painted map (a painted map replaces prompts and
// saliency: the API refuses a mask file with either).
async function formData() {
  const fd = new FormData();
  fd.append("image", state.file);
  const source = maskSource();
  let painted = false;
  if (source === "prompt") {
    const prompts = $("prompt-input").value.trim();
    if (!prompts) throw new Error("Type at least one prompt, or choose saliency, paint importance or none.");
    fd.append("prompt", prompts);
  } else if (source === "saliency") {
    fd.append("saliency", "true");
  } else if (source === "paint") {
    if (!state.paint.levels) throw new Error("This browser cannot show this image, so it cannot be painted: " +
                                             "choose another region-of-interest source.");
    if (state.paint.count > 0) {  // nothing painted: uniform quality, as "none"
      fd.append("mask", await paintedMaskPng(), "painted-mask.png");
      fd.append("graded", "true");
      painted = true;
    }
  }
  fd.append("roi_quality", $("roi-quality").value);
  fd.append("rate", $("rate").value);
  return { fd, painted };
}

async function compress() {
  if (!state.file) { showError("Choose an image first."); return; }
  if (state.busy) { state.again = true; return; }  // slider moved while busy: run once more after
  state.busy = true;
  let form;
  try {
    form = await formData();
  } catch (e) {
    showError(e.message);
    state.busy = false;
    if (state.again) { state.again = false; compress(); }
    return;
  }
  showError("");
  $("compress-btn").disabled = true;
  $("results").dataset.ready = "false";
  setStatus("Compressing…");
  const started = performance.now();
  try {
    const res = await fetch("roundtrip", { method: "POST", body: form.fd });
    let body = null;
    try { body = await res.json(); } catch (e) { /* not JSON */ }
    if (!res.ok) throw new Error((body && body.error) || `the service answered HTTP ${res.status}`);
    await show(body);
    const p = state.paint;
    let note = "";
    if (form.painted && (body.width !== p.width || body.height !== p.height)) {
      note = ` The service read the image as ${body.width}×${body.height}, the browser shows it as ` +
             `${p.width}×${p.height} (EXIF rotation?): the painted map was resized to fit.`;
    }
    setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(2)} s ` +
              `(${body.width}×${body.height}, mask: ${form.painted ? "painted, graded" : body.mask_source}).` + note);
  } catch (e) {
    showError(e.message || String(e));
    setStatus("");
  } finally {
    state.busy = false;
    $("compress-btn").disabled = !state.file;
    if (state.again) { state.again = false; compress(); }
  }
}

async function show(r) {
  const rec = $("reconstruction-img");
  rec.src = "data:image/png;base64," + r.reconstruction_png;
  rec.hidden = false;
  $("reconstruction-empty").hidden = true;
  const maskImg = $("mask-img");
  if (r.mask_png) {
    maskImg.src = "data:image/png;base64," + r.mask_png;
    maskImg.hidden = false;
    $("mask-empty").hidden = true;
  } else {
    maskImg.hidden = true;
    $("mask-empty").hidden = false;
  }
  state.lastMask = r.mask_png;
  await drawOverlay(maskSource() === "paint" ? null : r.mask_png);  // the paint layer shows the painted map
  $("bpp-value").textContent = fmt(r.bpp, 4, " bpp");
  $("bytes-value").textContent = `${r.bytes} bytes`;
  $("psnr-value").textContent = fmt(r.psnr, 2, " dB");
  $("roi-psnr-value").textContent = fmt(r.roi_psnr, 2, " dB");
  $("nonroi-psnr-value").textContent = fmt(r.nonroi_psnr, 2, " dB");
  $("weighted-psnr-value").textContent = fmt(r.weighted_psnr, 2, " dB");
  if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
  state.downloadUrl = URL.createObjectURL(new Blob([b64ToBytes(r.roic)], { type: "application/octet-stream" }));
  const link = $("download-link");
  link.href = state.downloadUrl;
  link.download = (state.file.name.replace(/\.[^.]*$/, "") || "image") + ".roic";
  link.hidden = false;
  state.hasResult = true;
  $("results").dataset.ready = "true";
}

async function decodeFile(file) {
  if (!file) return;
  const fd = new FormData();
  fd.append("file", file);
  $("decode-status").textContent = "Decoding…";
  try {
    const res = await fetch("decompress", { method: "POST", body: fd });
    if (!res.ok) {
      let body = null;
      try { body = await res.json(); } catch (e) { /* not JSON */ }
      throw new Error((body && body.error) || `HTTP ${res.status}`);
    }
    const img = $("decoded-img");
    img.src = URL.createObjectURL(await res.blob());
    img.hidden = false;
    $("decode-status").textContent =
      `${res.headers.get("X-Width")}×${res.headers.get("X-Height")}, ${res.headers.get("X-Bpp")} bpp`;
  } catch (e) {
    $("decode-status").textContent = "Error: " + (e.message || e);
  }
}

async function modelInfo() {
  try {
    const res = await fetch("healthz");
    const h = await res.json();
    if (!res.ok) throw new Error(h.error || `HTTP ${res.status}`);
    const text = h.masks.text_masks ? "text prompts on" : "text prompts off";
    $("model-info").textContent = `model ${h.codec.variant} (${h.codec.fingerprint}) on ${h.codec.device}; ` +
      `${text}; uploads up to ${h.limits.max_upload_mb} MB`;
    if (!h.masks.text_masks) {
      $("source-prompt").disabled = true;
      $("source-saliency").checked = true;
      syncSource();
    }
  } catch (e) {
    $("model-info").textContent = "service not answering: " + (e.message || e);
  }
}

function syncSource() {
  const source = maskSource();
  const painting = source === "paint";
  $("prompt-field").hidden = source !== "prompt";
  $("paint-field").hidden = !painting;
  $("paint-canvas").hidden = !painting || !state.paint.levels;
  if (!painting) $("brush-cursor").hidden = true;
  $("overlay-caption").textContent = painting ? "Original: paint where quality matters" : "Original, ROI highlighted";
  updatePaintStatus();
}

function changeSource() {
  syncSource();
  drawOverlay(maskSource() === "paint" ? null : state.lastMask);
}

function bindSlider(id) {
  const input = $(id);
  const out = $(id + "-value");
  input.addEventListener("input", () => { out.textContent = Number(input.value).toFixed(2); });
  input.addEventListener("change", () => { if (state.hasResult) compress(); });
}

$("image-input").addEventListener("change", (e) => chooseImage(e.target.files[0]));
$("controls").addEventListener("submit", (e) => { e.preventDefault(); compress(); });
document.querySelectorAll('input[name="mask-source"]').forEach((el) => el.addEventListener("change", changeSource));
bindPaint();
bindSlider("roi-quality");
bindSlider("rate");
$("roic-input").addEventListener("change", (e) => decodeFile(e.target.files[0]));
syncSource();
modelInfo();
