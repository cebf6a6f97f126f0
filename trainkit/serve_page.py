"""The page that `trainkit serve` shows at /: draw or drop an image, see the top classes as bars
and the run's summary. Plain HTML and JavaScript; everything it knows comes from /info and /predict."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trainkit serve</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
  h1 { font-size: 1.3rem; margin: 0 0 1rem; }
  .cols { display: flex; flex-wrap: wrap; gap: 2rem; }
  .col { flex: 1 1 300px; max-width: 520px; }
  #pad { width: 280px; height: 280px; background: #000; border-radius: 6px; touch-action: none; cursor: crosshair; }
  #drop { border: 2px dashed #999; border-radius: 6px; padding: 1rem; margin-top: 1rem; text-align: center; }
  #drop.over { background: #eef; }
  #preview { max-width: 112px; max-height: 112px; image-rendering: pixelated; display: none; margin: .5rem auto 0; }
  #predicted { font-size: 2.4rem; font-weight: bold; min-height: 3rem; }
  .bar { display: flex; align-items: center; gap: .5rem; margin: .2rem 0; font-variant-numeric: tabular-nums; }
  .bar .name { width: 6rem; text-align: right; overflow: hidden; white-space: nowrap; }
  .bar .track { flex: 1; background: #eee; height: 1.1rem; border-radius: 3px; }
  .bar .fill { background: #3b6fd8; height: 100%; border-radius: 3px; }
  .bar .pct { width: 4rem; }
  #error { color: #b00; min-height: 1.2rem; }
  #summary img { max-width: 100%; margin-top: .5rem; }
  button { margin-top: .5rem; }
</style>
</head>
<body>
<h1>trainkit serve: <span id="title"></span></h1>
<div class="cols">
  <div class="col">
    <div id="draw">
      <canvas id="pad" width="280" height="280"></canvas><br>
      <button id="clear" type="button">Clear</button> <small>draw a digit with the mouse or a finger</small>
    </div>
    <div id="drop">Drop an image here, or <input id="file" type="file" accept="image/*">
      <img id="preview" alt="uploaded image"></div>
  </div>
  <div class="col">
    <div>Predicted class</div>
    <div id="predicted"></div>
    <div id="bars"></div>
    <div id="error"></div>
  </div>
  <div class="col" id="summary"></div>
</div>
<script>
const $ = (id) => document.getElementById(id);
const pad = $("pad"), ctx = pad.getContext("2d");
let busy = false, again = false, drawing = false;

function clearPad() {
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, pad.width, pad.height);
  $("predicted").textContent = ""; $("bars").innerHTML = ""; $("error").textContent = "";
}
function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}
pad.addEventListener("pointerdown", (e) => {
  drawing = true; pad.setPointerCapture(e.pointerId);
  const [x, y] = point(e); ctx.beginPath(); ctx.moveTo(x, y); ctx.lineTo(x + 0.1, y); ctx.stroke();
});
pad.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const [x, y] = point(e); ctx.lineTo(x, y); ctx.stroke(); ask();
});
for (const end of ["pointerup", "pointercancel"]) pad.addEventListener(end, () => { if (drawing) { drawing = false; ask(); } });
$("clear").addEventListener("click", clearPad);

// The drawing is framed like an MNIST digit (its bounding box scaled to 20 pixels, centred in 28)
// and sent as a PNG; the server converts and normalizes it exactly as `trainkit predict` does.
function framed() {
  const d = ctx.getImageData(0, 0, pad.width, pad.height).data;
  let x0 = pad.width, y0 = pad.height, x1 = -1, y1 = -1;
  for (let y = 0; y < pad.height; y++) for (let x = 0; x < pad.width; x++) {
    if (d[(y * pad.width + x) * 4] > 30) { if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y; }
  }
  if (x1 < 0) return null;
  const w = x1 - x0 + 1, h = y1 - y0 + 1, s = 20 / Math.max(w, h);
  const out = document.createElement("canvas"); out.width = out.height = 28;
  const o = out.getContext("2d"); o.fillStyle = "#000"; o.fillRect(0, 0, 28, 28);
  o.imageSmoothingQuality = "high";
  o.drawImage(pad, x0, y0, w, h, (28 - w * s) / 2, (28 - h * s) / 2, w * s, h * s);
  return out;
}
function ask() {
  if (busy) { again = true; return; }
  const c = framed(); if (!c) return;
  busy = true;
  c.toBlob((blob) => send(blob, "drawing.png").finally(() => { busy = false; if (again) { again = false; ask(); } }), "image/png");
}
async function send(blob, name) {
  const form = new FormData(); form.append("file", blob, name);
  try {
    const r = await fetch("/predict?top=5", { method: "POST", body: form });
    const j = await r.json();
    if (!r.ok) { $("error").textContent = j.detail; return; }
    $("error").textContent = "";
    show(j);
  } catch (err) { $("error").textContent = "the server did not answer: " + err; }
}
function show(j) {
  $("predicted").textContent = j.predicted;
  $("bars").innerHTML = "";
  for (const t of j.top) {
    const row = document.createElement("div"); row.className = "bar";
    const pct = (100 * t.probability).toFixed(1);
    row.innerHTML = '<span class="name"></span><span class="track"><div class="fill"></div></span><span class="pct"></span>';
    row.querySelector(".name").textContent = t.class;
    row.querySelector(".fill").style.width = pct + "%";
    row.querySelector(".pct").textContent = pct + "%";
    $("bars").appendChild(row);
  }
}
function upload(file) {
  if (!file) return;
  $("preview").src = URL.createObjectURL(file); $("preview").style.display = "block";
  send(file, file.name);
}
$("file").addEventListener("change", () => upload($("file").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files[0]); });

fetch("/info").then((r) => r.json()).then((info) => {
  $("title").textContent = info.model + " on " + info.dataset;
  if (info.preprocessing.channels !== 1) $("draw").style.display = "none";   // drawing is for digits
  const s = $("summary");
  const acc = info.accuracy === null ? "not recorded" : info.accuracy.toFixed(2) + "%";
  s.innerHTML = "<div><b>Run</b> <span id='run'></span></div><div><b>Dataset</b> <span id='dataset'></span></div>" +
    "<div><b>Test accuracy</b> <span id='accuracy'></span> after <span id='epochs'></span> epoch(s)</div>" +
    "<div><b>Model</b> <span id='model'></span></div>";
  $("run").textContent = info.run; $("dataset").textContent = info.dataset; $("accuracy").textContent = acc;
  $("epochs").textContent = info.epochs;
  $("model").textContent = info.model + ", " + info.parameters.toLocaleString("en") + " parameters, " + info.backend;
  for (const name of info.reports) {
    const img = document.createElement("img"); img.src = "/run/" + name; img.alt = name; s.appendChild(img);
  }
});
ctx.lineWidth = 22; ctx.lineCap = "round"; ctx.lineJoin = "round"; ctx.strokeStyle = "#fff";
clearPad();
</script>
</body>
</html>
"""
