// The ovd serve page: pick or drop an image, name classes, POST /detect, draw the boxes on a canvas.
// The request asks for everything above REQUEST_THR; the slider filters on the page, without a new request.
"use strict";

const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                 "#469990", "#9a6324", "#800000", "#000075"];
const REQUEST_THR = 0.01;
const MIN_SIDE = 480;   // small images (160-px mini-world scenes) are drawn upscaled, so labels stay readable
const MAX_SIDE = 960;

const $ = (id) => document.getElementById(id);
const state = { file: null, bitmap: null, result: null, scale: 1 };
window.ovd = state;  // for debugging from the console (and for tests, which read what was requested)

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function colourOf(name) {
  const classes = state.result ? state.result.classes : [];
  const k = Math.max(0, classes.indexOf(name));
  return PALETTE[k % PALETTE.length];
}

// Labels placed above their box when there is room, else inside; moved down past labels already placed.
function placeLabel(ctx, text, x, y, placed) {
  const w = ctx.measureText(text).width + 6, h = 16;
  let ly = y - h >= 0 ? y - h : y;
  let lx = Math.min(Math.max(0, x), ctx.canvas.width - w);
  for (let tries = 0; tries < 50; tries++) {
    const hit = placed.find((r) => lx < r.x + r.w && r.x < lx + w && ly < r.y + r.h && r.y < ly + h);
    if (!hit) break;
    ly = hit.y + hit.h;
  }
  const rect = { x: lx, y: ly, w, h };
  placed.push(rect);
  return rect;
}

function draw() {
  const canvas = $("view"), ctx = canvas.getContext("2d");
  if (!state.bitmap) return;
  const { width, height } = state.bitmap;
  const scale = Math.min(MAX_SIDE / Math.max(width, height), Math.max(1, MIN_SIDE / Math.min(width, height)));
  state.scale = scale;
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  canvas.dataset.scale = String(scale);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(state.bitmap, 0, 0, canvas.width, canvas.height);
  const thr = parseFloat($("thr").value);
  $("thrval").textContent = thr.toFixed(2);
  if (!state.result) return;
  const shown = state.result.detections.filter((d) => d.score >= thr);
  // lowest score first: the best detection's box is drawn last, on top
  const order = shown.slice().sort((a, b) => a.score - b.score);
  ctx.lineWidth = 3;
  for (const d of order) {
    const [x1, y1, x2, y2] = d.box.map((v) => v * scale);
    ctx.strokeStyle = colourOf(d.name);
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  }
  ctx.font = "13px system-ui, sans-serif";
  ctx.textBaseline = "top";
  const placed = [];
  for (const d of order.slice().reverse()) {  // best first gets the best label place
    const text = `${d.name} ${d.score.toFixed(2)}`;
    const r = placeLabel(ctx, text, d.box[0] * scale, d.box[1] * scale, placed);
    ctx.fillStyle = colourOf(d.name);
    ctx.fillRect(r.x, r.y, r.w, r.h);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, r.x + 3, r.y + 2);
  }
  $("list").textContent = `${shown.length} of ${state.result.detections.length} detections shown` +
    (shown.length ? ": " + shown.slice(0, 10).map((d) => `${d.name} ${d.score.toFixed(2)}`).join(", ") : "");
}

async function useFile(file) {
  if (!file) return;
  state.file = file;
  state.result = null;
  try {
    state.bitmap = await createImageBitmap(file);
  } catch (e) {
    state.bitmap = null;
    setStatus(`cannot show ${file.name}: not an image the browser can read`, true);
    return;
  }
  setStatus(`${file.name}: ${state.bitmap.width} x ${state.bitmap.height}`);
  draw();
}

async function detect() {
  if (!state.file) { setStatus("choose or drop an image first", true); return; }
  const form = new FormData();
  form.append("image", state.file);
  const classes = $("classes").value.trim();
  if (classes) form.append("classes", classes);
  form.append("score_thr", String(REQUEST_THR));
  setStatus("detecting...");
  $("go").disabled = true;
  try {
    const resp = await fetch("/detect", { method: "POST", body: form });
    const body = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
    if (!resp.ok) { setStatus(body.error || `HTTP ${resp.status}`, true); return; }
    state.result = body;
    setStatus(`${body.detections.length} detections in ${body.seconds} s (${body.classes.length} classes)`);
    draw();
  } catch (e) {
    setStatus(`request failed: ${e}`, true);
  } finally {
    $("go").disabled = false;
  }
}

$("file").addEventListener("change", (e) => useFile(e.target.files[0]));
$("go").addEventListener("click", detect);
$("classes").addEventListener("keydown", (e) => { if (e.key === "Enter") detect(); });
$("thr").addEventListener("input", draw);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  useFile(e.dataTransfer.files[0]);
});
fetch("/health").then((r) => r.json()).then((h) => {
  if (h.default_vocabulary) $("classes").placeholder = `default: ${h.default_classes.slice(0, 6).join(", ")}...`;
}).catch(() => {});
