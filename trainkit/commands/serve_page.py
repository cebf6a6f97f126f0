"""The page that `trainkit serve` shows at /: draw or drop an image, see the top classes as bars
(and what was done to the image), the run's summary and its figures (full size on click). Plain HTML and JavaScript; everything it knows comes from /info and /predict."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trainkit serve</title>
<link rel="icon" type="image/svg+xml" href="/favicon.svg">
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
  #notes { color: #555; font-size: .9rem; }
  #reports img { max-width: min(100%, 900px); margin: .5rem 1rem 0 0; cursor: zoom-in; vertical-align: top; }
  #full { display: none; position: fixed; inset: 0; background: rgba(0, 0, 0, .8); overflow: auto; cursor: zoom-out; z-index: 10; }
  #full img { display: block; margin: 1rem auto; background: #fff; max-width: none; }
  button { margin-top: .5rem; }
  #pick { display: inline-block; border: 1px solid #888; border-radius: 4px; padding: .15rem .5rem; background: #f4f4f4; cursor: pointer; }
  #filename { color: #333; font-style: italic; }
</style>
</head>
<body>
<h1>trainkit serve: <span id="title"></span></h1>
<div class="cols">
  <div class="col">
    <div id="draw">
      <canvas id="pad" width="280" height="280"></canvas><br>
      <button id="clear" type="button">Clear</button>
      <small id="hint">draw a digit with the mouse or a finger; strokes add up to one drawing until you press Clear</small>
    </div>
    <div id="drop">Drop an image here, or
      <label id="pick">choose a file<input id="file" type="file" accept="image/*" hidden></label>
      <span id="filename"></span>
      <img id="preview" alt="uploaded image"></div>
  </div>
  <div class="col">
    <div>Predicted class</div>
    <div id="predicted"></div>
    <div id="bars"></div>
    <div id="error"></div>
    <div id="notes"></div>
  </div>
  <div class="col" id="summary"></div>
</div>
<div id="reports"></div>
<div id="full" title="click or Esc to close"><img id="fullimg" alt=""></div>
<script>
const $ = (id) => document.getElementById(id);
const pad = $("pad"), ctx = pad.getContext("2d");
let busy = false, again = false, drawing = false, inked = false, asked = 0;

function clearAnswer() {
  $("predicted").textContent = ""; $("bars").innerHTML = ""; $("error").textContent = ""; $("notes").textContent = "";
}
function clearUpload() {   // the file input is emptied too: choosing the same file again is a new upload
  $("file").value = ""; $("filename").textContent = ""; hidePreview();
}
function hidePreview() { $("preview").removeAttribute("src"); $("preview").style.display = "none"; }
function clearPad() {
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, pad.width, pad.height); inked = false;
}
function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}
pad.addEventListener("pointerdown", (e) => {
  if (!inked) clearUpload();         // a new drawing: the old upload's preview goes
  drawing = true; inked = true; pad.setPointerCapture(e.pointerId);
  const [x, y] = point(e); ctx.beginPath(); ctx.moveTo(x, y); ctx.lineTo(x + 0.1, y); ctx.stroke();
});
pad.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const [x, y] = point(e); ctx.lineTo(x, y); ctx.stroke(); ask();
});
for (const end of ["pointerup", "pointercancel"]) pad.addEventListener(end, () => { if (drawing) { drawing = false; ask(); } });
$("clear").addEventListener("click", () => {   // an answer still on its way is for what was cleared
  asked++; again = false; clearPad(); clearUpload(); clearAnswer();
});

// The whole drawing is sent as a PNG: the server prepares it as it prepares an upload or a file
// given to `trainkit predict` (for a run on digits: framed like MNIST's, see preprocess.py).
function ask() {
  if (!inked) return;
  if (busy) { again = true; return; }
  busy = true;
  pad.toBlob((blob) => send(blob, "drawing.png").finally(() => { busy = false; if (again) { again = false; ask(); } }), "image/png");
}
async function send(blob, name) {
  const form = new FormData(); form.append("file", blob, name);
  const mine = ++asked;              // only the latest request's answer is shown
  try {
    const r = await fetch("/predict?top=5", { method: "POST", body: form });
    const j = await r.json();
    if (mine !== asked) return;
    clearAnswer();
    if (!r.ok) { hidePreview(); $("error").textContent = j.detail; return; }   // no broken picture beside it
    show(j);
  } catch (err) {
    if (mine !== asked) return;
    clearAnswer(); $("error").textContent = "the server did not answer: " + err;
  }
}
function show(j) {
  $("predicted").textContent = j.predicted;
  for (const t of j.top) {
    const row = document.createElement("div"); row.className = "bar";
    const pct = (100 * t.probability).toFixed(1);
    row.innerHTML = '<span class="name"></span><span class="track"><div class="fill"></div></span><span class="pct"></span>';
    row.querySelector(".name").textContent = t.class;
    row.querySelector(".fill").style.width = pct + "%";
    row.querySelector(".pct").textContent = pct + "%";
    $("bars").appendChild(row);
  }
  // what was done to the image beyond a resize (inverted, made grayscale, squashed)
  $("notes").textContent = (j.notes || []).filter((n) => !n.startsWith("framed")).join("; ");
}
function upload(file) {
  if (!file) return;
  clearPad();                        // the drawing is not what is predicted now
  $("filename").textContent = file.name;   // the input itself is emptied (below), so the name is shown here
  $("preview").src = URL.createObjectURL(file); $("preview").style.display = "block";
  send(file, file.name);
}
$("preview").addEventListener("error", hidePreview);   // a file the browser cannot show either
$("file").addEventListener("change", () => { const f = $("file").files[0]; upload(f); $("file").value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files[0]); });
$("full").addEventListener("click", () => { $("full").style.display = "none"; });
document.addEventListener("keydown", (e) => { if (e.key === "Escape") $("full").style.display = "none"; });

fetch("/info").then((r) => r.json()).then((info) => {
  $("title").textContent = info.model + " on " + info.dataset;
  if (info.preprocessing.channels !== 1) $("draw").style.display = "none";   // drawing is for digits
  const s = $("summary");
  const acc = info.accuracy === null ? "not recorded" : info.accuracy.toFixed(2) + "%";
  s.innerHTML = "<div><b>Run</b> <span id='run'></span></div><div><b>Dataset</b> <span id='dataset'></span></div>" +
    "<div><b>Test accuracy</b> <span id='accuracy'></span> after <span id='epochs'></span></div>" +
    "<div><b>Model</b> <span id='model'></span></div>" +
    (info.digits ? "<div><small>Images are framed like MNIST's digits (20x20, centred by mass); " +
                   "a dark digit on light paper is inverted.</small></div>" : "");
  $("run").textContent = info.run; $("dataset").textContent = info.dataset; $("accuracy").textContent = acc;
  // 1.5 epochs for a run stopped half-way through its second (--target-acc, a pruned trial)
  $("epochs").textContent = +info.epochs.toFixed(2) + (info.epochs === 1 ? " epoch" : " epochs") +
    (info.stopped ? " (stopped part way through the last)" : "");
  $("model").textContent = info.model + ", " + info.parameters.toLocaleString("en") + " parameters, " + info.backend;
  for (const name of info.reports) {   // shown wide below; a click shows the figure at its full size
    const img = document.createElement("img"); img.src = "/run/" + name; img.alt = name; img.title = "click: full size";
    img.addEventListener("click", () => { $("fullimg").src = img.src; $("full").style.display = "block"; });
    $("reports").appendChild(img);
  }
});
ctx.lineWidth = 22; ctx.lineCap = "round"; ctx.lineJoin = "round"; ctx.strokeStyle = "#fff";
clearPad();
</script>
</body>
</html>
"""

# The page's icon: a white 7 on the page's blue
FAVICON = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">
<rect width="32" height="32" rx="6" fill="#3b6fd8"/>
<path d="M9 8h14l-8 17" fill="none" stroke="#fff" stroke-width="4" stroke-linecap="round" stroke-linejoin="round"/>
</svg>
"""
