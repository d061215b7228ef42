// roicodec web page: plain JS, no build step. Talks to the same service (relative URLs,
// so the app works under any route prefix): POST roundtrip, POST decompress, GET healthz.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, bitmap: null, downloadUrl: null, busy: false, again: false, hasResult: false };

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
  await drawOverlay(null);
  $("compress-btn").disabled = false;
  setStatus(`${file.name} ready: set the region of interest and compress.`);
}

function formData() {
  const fd = new FormData();
  fd.append("image", state.file);
  const source = maskSource();
  if (source === "prompt") {
    const prompts = $("prompt-input").value.trim();
    if (!prompts) throw new Error("Type at least one prompt, or choose saliency or none.");
    fd.append("prompt", prompts);
  } else if (source === "saliency") {
    fd.append("saliency", "true");
  }
  fd.append("roi_quality", $("roi-quality").value);
  fd.append("rate", $("rate").value);
  return fd;
}

async function compress() {
  if (!state.file) { showError("Choose an image first."); return; }
  if (state.busy) { state.again = true; return; }  // slider moved while busy: run once more after
  let fd;
  try { fd = formData(); } catch (e) { showError(e.message); return; }
  state.busy = true;
  showError("");
  $("compress-btn").disabled = true;
  $("results").dataset.ready = "false";
  setStatus("Compressing…");
  const started = performance.now();
  try {
    const res = await fetch("roundtrip", { method: "POST", body: fd });
    let body = null;
    try { body = await res.json(); } catch (e) { /* not JSON */ }
    if (!res.ok) throw new Error((body && body.error) || `the service answered HTTP ${res.status}`);
    await show(body);
    setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(2)} s ` +
              `(${body.width}×${body.height}, mask: ${body.mask_source}).`);
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
  await drawOverlay(r.mask_png);
  $("bpp-value").textContent = fmt(r.bpp, 4, " bpp");
  $("bytes-value").textContent = `${r.bytes} bytes`;
  $("psnr-value").textContent = fmt(r.psnr, 2, " dB");
  $("roi-psnr-value").textContent = fmt(r.roi_psnr, 2, " dB");
  $("nonroi-psnr-value").textContent = fmt(r.nonroi_psnr, 2, " dB");
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

function syncSource() { $("prompt-field").hidden = maskSource() !== "prompt"; }

function bindSlider(id) {
  const input = $(id);
  const out = $(id + "-value");
  input.addEventListener("input", () => { out.textContent = Number(input.value).toFixed(2); });
  input.addEventListener("change", () => { if (state.hasResult) compress(); });
}

$("image-input").addEventListener("change", (e) => chooseImage(e.target.files[0]));
$("controls").addEventListener("submit", (e) => { e.preventDefault(); compress(); });
document.querySelectorAll('input[name="mask-source"]').forEach((el) => el.addEventListener("change", syncSource));
bindSlider("roi-quality");
bindSlider("rate");
$("roic-input").addEventListener("change", (e) => decodeFile(e.target.files[0]));
syncSource();
modelInfo();
