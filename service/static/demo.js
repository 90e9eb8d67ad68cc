// The drawing demo: pointer events on a canvas -> MNIST-style 28x28 image -> POST /v1/predict -> bars.
// No framework, no build step. MNIST preprocessing: the ink's bounding box is scaled (area average) to
// fit 20x20, then placed in 28x28 so that its centre of mass is the image centre; white digit on black,
// values in [0, 1].
"use strict";

const BOX = 20;
const SIDE = 28;
const INK = 0.1; // a canvas pixel brighter than this is ink

function grayPixels(canvas) {
  const { width, height } = canvas;
  const rgba = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  const gray = new Float32Array(width * height);
  for (let i = 0; i < gray.length; i++) gray[i] = rgba[i * 4] / 255; // white on black: red = intensity
  return { gray, width, height };
}

// Returns 784 numbers in [0, 1] (row-major), or null for an empty canvas.
function toMnist(canvas) {
  const { gray, width, height } = grayPixels(canvas);
  let x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (gray[y * width + x] > INK) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  if (x1 < 0) return null;
  // A square around the bounding box (keeps the aspect ratio), area-averaged down to 20x20.
  const side = Math.max(x1 - x0 + 1, y1 - y0 + 1);
  const sx = (x0 + x1 + 1) / 2 - side / 2;
  const sy = (y0 + y1 + 1) / 2 - side / 2;
  const box = new Float32Array(BOX * BOX);
  const cell = side / BOX;
  for (let y = y0; y <= y1; y++) {
    const ty = Math.min(BOX - 1, Math.max(0, Math.floor((y + 0.5 - sy) / cell)));
    for (let x = x0; x <= x1; x++) {
      const v = gray[y * width + x];
      if (v === 0) continue;
      const tx = Math.min(BOX - 1, Math.max(0, Math.floor((x + 0.5 - sx) / cell)));
      box[ty * BOX + tx] += v;
    }
  }
  let peak = 0;
  for (let i = 0; i < box.length; i++) {
    box[i] /= cell * cell;
    if (box[i] > peak) peak = box[i];
  }
  // Centre of mass (pixel centres) of the 20x20 box, then shift it to the centre of the 28x28 image.
  let mass = 0, mx = 0, my = 0;
  for (let y = 0; y < BOX; y++) {
    for (let x = 0; x < BOX; x++) {
      const v = Math.min(1, box[y * BOX + x] / peak);
      box[y * BOX + x] = v;
      mass += v;
      mx += (x + 0.5) * v;
      my += (y + 0.5) * v;
    }
  }
  const ox = Math.round(SIDE / 2 - mx / mass);
  const oy = Math.round(SIDE / 2 - my / mass);
  const out = new Array(SIDE * SIDE).fill(0);
  for (let y = 0; y < BOX; y++) {
    for (let x = 0; x < BOX; x++) {
      const tx = x + ox, ty = y + oy;
      if (tx >= 0 && tx < SIDE && ty >= 0 && ty < SIDE) {
        out[ty * SIDE + tx] = Math.round(box[y * BOX + x] * 10000) / 10000;
      }
    }
  }
  return out;
}

function showPreview(canvas, pixels) {
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(SIDE, SIDE);
  for (let i = 0; i < SIDE * SIDE; i++) {
    const v = Math.round((pixels ? pixels[i] : 0) * 255);
    img.data.set([v, v, v, 255], i * 4);
  }
  ctx.putImageData(img, 0, 0);
}

function buildBars(list) {
  const rows = [];
  for (let d = 0; d < 10; d++) {
    const li = document.createElement("li");
    li.dataset.digit = String(d);
    const name = document.createElement("span");
    name.textContent = String(d);
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = "bar";
    track.append(bar);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = "-";
    li.append(name, track, pct);
    list.append(li);
    rows.push({ li, bar, pct });
  }
  return rows;
}

function main() {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const preview = document.getElementById("preview");
  const result = document.getElementById("result");
  const labelEl = document.getElementById("label");
  const meta = document.getElementById("meta");
  const rows = buildBars(document.getElementById("bars"));
  let drawing = false;
  let last = null;
  let strokes = 0; // strokes since the last Clear; the answer shown is for result.dataset.seq strokes
  let shown = 0;

  function reset() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
    strokes = 0;
    shown = 0;
    result.dataset.seq = "0";
    labelEl.textContent = "?";
    meta.textContent = "No digit yet.";
    meta.classList.remove("error");
    for (const r of rows) {
      r.bar.style.width = "0";
      r.pct.textContent = "-";
      r.li.classList.remove("top");
    }
    showPreview(preview, null);
  }

  function point(e) {
    const rect = pad.getBoundingClientRect();
    return {
      x: ((e.clientX - rect.left) * pad.width) / rect.width,
      y: ((e.clientY - rect.top) * pad.height) / rect.height,
    };
  }

  function line(a, b) {
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = pad.width / 14;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.stroke();
  }

  function show(seq, answer, ms) {
    if (seq < shown) return; // an older stroke's answer arrived late
    shown = seq;
    labelEl.textContent = String(answer.label);
    meta.classList.remove("error");
    meta.textContent = `${answer.model} v${answer.version} - ${ms.toFixed(0)} ms`;
    answer.probabilities.forEach((p, d) => {
      rows[d].bar.style.width = `${(p * 100).toFixed(1)}%`;
      rows[d].pct.textContent = `${(p * 100).toFixed(1)}%`;
      rows[d].li.classList.toggle("top", d === answer.label);
    });
    result.dataset.seq = String(seq);
  }

  async function classify() {
    const seq = strokes;
    const pixels = toMnist(pad);
    showPreview(preview, pixels);
    if (!pixels) return;
    const t0 = performance.now();
    try {
      const resp = await fetch("/v1/predict", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image: pixels }),
      });
      const answer = await resp.json();
      if (seq !== strokes) return; // cleared or drawn on meanwhile
      if (!resp.ok) throw new Error(answer.error ? answer.error.message : `HTTP ${resp.status}`);
      show(seq, answer, performance.now() - t0);
    } catch (err) {
      meta.textContent = `Error: ${err.message}`;
      meta.classList.add("error");
      result.dataset.seq = String(seq);
    }
  }

  pad.addEventListener("pointerdown", (e) => {
    if (e.pointerType === "mouse" && e.button !== 0) return;
    pad.setPointerCapture(e.pointerId);
    drawing = true;
    last = point(e);
    line(last, last);
    e.preventDefault();
  });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    for (const ev of events.length ? events : [e]) {
      const p = point(ev);
      line(last, p);
      last = p;
    }
    e.preventDefault();
  });
  const end = () => {
    if (!drawing) return;
    drawing = false;
    strokes += 1;
    classify();
  };
  pad.addEventListener("pointerup", end);
  pad.addEventListener("pointercancel", end);
  document.getElementById("clear").addEventListener("click", reset);
  reset();
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", main);
