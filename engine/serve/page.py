"""The single page of `hamengine serve`: inline HTML, CSS and JS, no external resources (it must work
on machines without internet access). Element ids are the contract with tests/test_serve_browser.py:
#file, #drop, #preview, #bars (.bar[data-dx]), #top-class[data-dx], #overlay, #model-info, #notice,
#error, and body[data-state] = idle | busy | done | error."""
from __future__ import annotations

import html
import json
from typing import Any

from hamengine.config import CLASS_NAMES

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hamengine - skin lesion classifier (research)</title>
<style>
:root { --fg:#1d2330; --muted:#5b6475; --accent:#2f6fdf; --bg:#f5f6f8; --card:#fff; --warn:#8a4b00; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color:var(--fg); background:var(--bg); }
header { padding:14px 24px; background:#1d2330; color:#fff; display:flex; gap:16px;
         align-items:baseline; flex-wrap:wrap; }
header h1 { font-size:19px; margin:0; }
header #model-info { color:#c9d1e0; font-size:13px; }
#notice { margin:14px 24px 0; padding:10px 14px; border:1px solid #e6b566; background:#fff6e5;
          color:var(--warn); border-radius:6px; font-weight:600; }
main { display:grid; grid-template-columns: minmax(280px, 1fr) minmax(320px, 1.2fr); gap:18px;
       padding:18px 24px; }
@media (max-width: 860px) { main { grid-template-columns: 1fr; } }
.card { background:var(--card); border-radius:8px; padding:16px; box-shadow:0 1px 3px rgba(0,0,0,.08); }
.card h2 { font-size:15px; margin:0 0 10px; color:var(--muted); text-transform:uppercase;
           letter-spacing:.04em; }
#drop { display:block; border:2px dashed #aab3c5; border-radius:8px; padding:22px; text-align:center; cursor:pointer;
        color:var(--muted); }
#drop.over { border-color:var(--accent); background:#eef3ff; }
#drop input { display:block; margin:10px auto 0; }
.images { display:flex; align-items:flex-start; gap:12px; margin-top:14px; flex-wrap:wrap; }
.images figure { margin:0; flex:1 1 200px; }
.images img { width:100%; border-radius:6px; background:#e9ecf1; min-height:40px; display:block; }
.images figcaption { font-size:12px; color:var(--muted); margin-top:4px; }
#top-class { font-size:20px; font-weight:700; margin-bottom:12px; min-height:28px; }
#top-class .p { color:var(--accent); margin-left:6px; }
.bar { display:grid; grid-template-columns: 1fr 64px; gap:4px 10px; margin:7px 0; align-items:center; }
.bar .name { font-size:14px; }
.bar .name code { color:var(--muted); font-size:12px; margin-left:4px; }
.bar .pct { text-align:right; font-variant-numeric:tabular-nums; }
.bar .track { grid-column:1 / span 2; height:12px; background:#e9ecf1; border-radius:6px; overflow:hidden; }
.bar .fill { height:100%; background:var(--accent); border-radius:6px; }
.bar:first-child .fill { background:#d2553b; }
#error { color:#b00020; font-weight:600; min-height:20px; margin-top:10px; }
#metrics { font-size:13px; color:var(--muted); margin-top:14px; }
footer { padding:0 24px 20px; font-size:12px; color:var(--muted); }
</style></head>
<body data-state="idle">
<header><h1>hamengine</h1><span id="model-info">__MODEL_INFO__</span></header>
<div id="notice" role="alert">Research software, not a diagnosis. It has not been validated for clinical
use; a dermatologist must assess any skin lesion of concern.</div>
<main>
 <section class="card">
  <h2>Image</h2>
  <label id="drop" for="file">Drop a dermatoscopic image here, or choose one (JPEG or PNG, up to
   __MAX_MB__ MiB)<input id="file" type="file" accept="image/jpeg,image/png,image/*"></label>
  __META_FIELDS__
  <div id="error" aria-live="polite"></div>
  <div class="images">
   <figure><img id="preview" alt="uploaded image"><figcaption>Uploaded image</figcaption></figure>
   <figure><img id="overlay" alt="Grad-CAM overlay"><figcaption id="overlay-caption">Grad-CAM:
    regions that drove the top prediction</figcaption></figure>
  </div>
 </section>
 <section class="card">
  <h2>Class probabilities</h2>
  <div id="top-class"></div>
  <div id="bars"></div>
  <div id="latency" style="font-size:12px;color:var(--muted)"></div>
  <div id="metrics"></div>
 </section>
</main>
<footer>Seven HAM10000 diagnostic categories. Probabilities are calibrated on the validation split when
the run has a calibration temperature; they are model outputs, not clinical risk estimates.</footer>
<script>
"use strict";
const NAMES = __NAMES__;
const $ = (id) => document.getElementById(id);
let overlayUrl = null, previewUrl = null;

function setState(s) { document.body.dataset.state = s; }
function showError(msg) { $("error").textContent = msg; setState("error"); }
function pct(p) { return (100 * p).toFixed(1) + "%"; }

async function detail(resp) {
  try { const j = await resp.json(); return j.detail ? (typeof j.detail === "string" ? j.detail
        : JSON.stringify(j.detail)) : resp.statusText; } catch (e) { return resp.statusText; }
}

function renderBars(result) {
  const rows = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  const bars = $("bars");
  bars.replaceChildren();
  for (const [dx, p] of rows) {
    const row = document.createElement("div");
    row.className = "bar"; row.dataset.dx = dx;
    const name = document.createElement("div"); name.className = "name";
    name.textContent = NAMES[dx] || dx;
    const code = document.createElement("code"); code.textContent = dx; name.appendChild(code);
    const val = document.createElement("div"); val.className = "pct"; val.textContent = pct(p);
    const track = document.createElement("div"); track.className = "track";
    const fill = document.createElement("div"); fill.className = "fill";
    fill.style.width = Math.max(0.5, 100 * p).toFixed(2) + "%";
    track.appendChild(fill); row.append(name, val, track); bars.appendChild(row);
  }
  const top = $("top-class");
  top.dataset.dx = result.top.dx;
  top.textContent = result.top.name + " (" + result.top.dx + ")";
  const p = document.createElement("span"); p.className = "p"; p.textContent = pct(result.top.probability);
  top.appendChild(p);
  $("latency").textContent = "server latency " + result.latency_ms.toFixed(1) + " ms";
}

async function analyse(file) {
  if (!file) return;
  $("error").textContent = ""; setState("busy");
  $("bars").replaceChildren(); $("top-class").textContent = "Analysing\u2026";
  delete $("top-class").dataset.dx;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file); $("preview").src = previewUrl;
  $("overlay").removeAttribute("src");
  const form = () => {
    const f = new FormData(); f.append("image", file, file.name);
    for (const k of ["age", "sex", "site"]) {  // present only for a model trained with --meta
      const el = $("meta-" + k); if (el && el.value !== "") f.append(k, el.value);
    }
    return f;
  };
  try {
    const resp = await fetch("api/predict", { method: "POST", body: form() });
    if (!resp.ok) {
      $("top-class").textContent = ""; $("preview").removeAttribute("src");
      showError(resp.status + ": " + await detail(resp)); return;
    }
    renderBars(await resp.json());
    const ex = await fetch("api/explain", { method: "POST", body: form() });
    if (!ex.ok) { showError("Grad-CAM failed: " + await detail(ex)); return; }
    if (overlayUrl) URL.revokeObjectURL(overlayUrl);
    overlayUrl = URL.createObjectURL(await ex.blob()); $("overlay").src = overlayUrl;
    const cls = ex.headers.get("X-Class");
    if (cls) $("overlay-caption").textContent = "Grad-CAM for " + (NAMES[cls] || cls);
    setState("done");
  } catch (e) { showError("request failed: " + e); }
}

async function loadModel() {
  try {
    const m = await (await fetch("api/model")).json();
    $("model-info").textContent = "model " + m.model + " \u00b7 run " + m.run + " \u00b7 " +
      m.input_size + " px \u00b7 " + m.device + (m.temperature && m.temperature !== 1 ?
      " \u00b7 T=" + m.temperature.toFixed(2) : "") +
      (m.decision === "val-bias" ? " \u00b7 decision: val-bias" : "");
    const t = m.test_metrics;
    if (t) {
      const parts = [];
      for (const k of ["balanced_accuracy", "accuracy", "macro_auc"])
        if (typeof t[k] === "number") parts.push(k.replace("_", " ") + " " + t[k].toFixed(3));
      if (parts.length) $("metrics").textContent = "Test split of this run: " + parts.join(", ");
    }
  } catch (e) { /* the header keeps the server-rendered text */ }
}

const drop = $("drop");
$("file").addEventListener("change", (e) => analyse(e.target.files[0]));
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => analyse(e.dataTransfer.files[0]));
loadModel();
</script>
</body></html>
"""


def meta_fields(meta: dict[str, Any] | None) -> str:
    """Optional age / sex / site inputs for a model trained with --meta (empty otherwise)."""
    if not meta:
        return ""

    def options(values: list[str]) -> str:
        return "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>'
                       for v in values if v != "unknown")

    return ('<fieldset id="meta"><legend>Patient (optional; left out = unknown)</legend>'
            '<label>Age <input id="meta-age" type="number" min="0" max="120" step="1"></label> '
            '<label>Sex <select id="meta-sex"><option value="">unknown</option>'
            f'{options(meta.get("sex", []))}</select></label> '
            '<label>Body site <select id="meta-site"><option value="">unknown</option>'
            f'{options(meta.get("localization", []))}</select></label></fieldset>')


def render_page(info: dict[str, Any]) -> str:
    """The page with the model line, upload limit and class names filled in (all escaped)."""

    model_line = f"model {info.get('model')} · run {info.get('run')} · {info.get('input_size')} px"
    names = {c["dx"]: c["name"] for c in info.get("classes", [])} or dict(CLASS_NAMES)
    # JSON inside <script>: escape "<" so a name can never close the script element.
    names_js = json.dumps(names).replace("<", "\\u003c")
    return (_PAGE.replace("__MODEL_INFO__", html.escape(model_line))
            .replace("__MAX_MB__", html.escape(f"{info.get('max_upload_mb', 10):g}"))
            .replace("__META_FIELDS__", meta_fields(info.get("metadata")))
            .replace("__NAMES__", names_js))
