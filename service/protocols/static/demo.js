// The attnserve demo: calls the public API from the browser. No libraries, nothing loaded from elsewhere.
"use strict";

const SAMPLES = ["ankle-boot", "trouser", "dress", "sandal", "bag", "tshirt"];
// viridis at 9 stops, as service/protocols/v1/pictures.py draws it
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
  [92, 200, 99], [170, 220, 50], [253, 231, 37]];
const $ = (id) => document.getElementById(id);

function colour(x) {
  const pos = Math.min(Math.max(x, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(pos), VIRIDIS.length - 2), t = pos - i;
  const c = VIRIDIS[i].map((v, k) => Math.round(v * (1 - t) + VIRIDIS[i + 1][k] * t));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function percentile(sorted, p) { // linear interpolation, as numpy.percentile
  if (!sorted.length) return 0;
  const r = (p / 100) * (sorted.length - 1), lo = Math.floor(r), hi = Math.ceil(r);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (r - lo);
}

function stretcher(rows) { // percentile stretch p2-p98 over the whole map
  const all = rows.flat().slice().sort((a, b) => a - b);
  const lo = percentile(all, 2), hi = percentile(all, 98);
  return (v) => (hi > lo ? Math.min(Math.max((v - lo) / (hi - lo), 0), 1) : 0);
}

function readable(piece) { // as service/protocols/v1/pictures.py: drop the word-start mark, mark word-internal pieces
  if (piece.startsWith("\u2581")) return piece.slice(1) || "\u2423";
  if (/^\p{P}+$/u.test(piece)) return piece;
  return "\u00b7" + piece;
}

async function apiError(response) { // the API's {"error": {code, message, field}}, or what came instead
  const text = await response.text();
  try {
    const e = JSON.parse(text).error;
    return `${response.status} ${e.code}: ${e.message}` + (e.field ? ` (field: ${e.field})` : "");
  } catch (_) {
    return `${response.status} ${response.statusText}: ${text.slice(0, 300)}`;
  }
}

function showError(id, message) {
  const el = $(id);
  el.textContent = message || "";
  el.classList.toggle("hidden", !message);
}

// ---- models ---------------------------------------------------------------------------------------------
async function loadModels() {
  try {
    const r = await fetch("/v1/models");
    if (!r.ok) throw new Error(await apiError(r));
    const body = await r.json();
    $("models").innerHTML = "";
    const vit = body.models.find((m) => m.task === "image-classification");
    if (vit) setupMapChoices(vit.encoder_layers, vit.heads);
    const mt = body.models.find((m) => m.task === "translation");
    if (mt) setupAlignmentChoices(mt.decoder_layers, mt.heads);
    for (const m of body.models) {
      const span = document.createElement("span");
      span.className = "model";
      span.innerHTML = "<b></b> ";
      span.firstChild.textContent = m.name;
      span.append(`${m.version} · ${m.precision} · ${m.device} · ${m.route}   `);
      $("models").append(span);
    }
  } catch (e) {
    $("models").textContent = `models not available: ${e.message}`;
  }
}

// ---- translation ----------------------------------------------------------------------------------------
let current = null; // {source_tokens, target_tokens, weights} of the last translation
let pinned = -1;

function renderHeatmap(att) {
  current = att;
  pinned = -1;
  const box = $("heatmap");
  box.innerHTML = "";
  if (!att || !att.weights.length) return;
  const scale = stretcher(att.weights);
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  head.append(document.createElement("th"));
  att.source_tokens.forEach((tok, j) => {
    const th = document.createElement("th");
    const span = document.createElement("span");
    span.textContent = readable(tok);
    span.dataset.index = j;
    th.append(span);
    head.append(th);
  });
  const body = table.createTBody();
  att.target_tokens.forEach((tok, i) => {
    const row = body.insertRow();
    row.dataset.index = i;
    const th = document.createElement("th");
    th.textContent = readable(tok);
    row.append(th);
    (att.weights[i] || []).forEach((w) => {
      const td = row.insertCell();
      td.style.background = colour(scale(w));
      td.title = w.toFixed(3);
    });
    row.addEventListener("mouseenter", () => highlight(i));
    row.addEventListener("mouseleave", () => highlight(pinned));
    row.addEventListener("click", () => { pinned = pinned === i ? -1 : i; highlight(pinned); });
  });
  box.append(table);
}

function setupAlignmentChoices(layers, heads) { // decoder layers as checkboxes (the last ticked), heads
  for (let i = 0; i < layers; i++) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" value="${i}"> ${i}`;
    label.firstChild.checked = i === layers - 1;
    $("layer-boxes").append(label);
  }
  for (let h = 0; h < heads; h++) {
    const o = document.createElement("option");
    o.value = String(h);
    o.textContent = String(h);
    $("align-head").append(o);
  }
}

function attentionChoice() { // the translate request's attention fields
  const layers = [...document.querySelectorAll("#layer-boxes input:checked")].map((b) => Number(b.value));
  const head = $("align-head").value;
  const out = { return_encoder_attention: $("encoder").checked };
  if (layers.length) out.attention_layers = layers;
  if (head) out.attention_heads = [Number(head)];
  return out;
}

function spanText(xs) { return xs.length > 2 && xs[xs.length - 1] - xs[0] === xs.length - 1 ?
  `${xs[0]}-${xs[xs.length - 1]}` : xs.join(","); }

function layersText(what, layers, heads) { // as service/protocols/v1/pictures.py layers_caption
  const text = `${what} ${layers.length === 1 ? "layer" : "layers"} ${spanText(layers)}, ` +
    `${heads.length === 1 ? "head" : "heads"} ${spanText(heads)}`;
  return layers.length * heads.length > 1 ? `${text} mean` : text;
}

function renderEncoder(enc) { // source x source, no interaction: hover a cell for its weight
  const box = $("encoder-heatmap");
  box.innerHTML = "";
  $("encoder-panel").classList.toggle("hidden", !enc);
  $("encoder-caption").textContent = enc ? `(${layersText("encoder", enc.layers, enc.heads)})` : "";
  if (!enc || !enc.weights.length) return;
  const scale = stretcher(enc.weights);
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  head.append(document.createElement("th"));
  for (const tok of enc.tokens) {
    const th = document.createElement("th");
    const span = document.createElement("span");
    span.textContent = readable(tok);
    th.append(span);
    head.append(th);
  }
  const body = table.createTBody();
  enc.tokens.forEach((tok, i) => {
    const row = body.insertRow();
    const th = document.createElement("th");
    th.textContent = readable(tok);
    row.append(th);
    enc.weights[i].forEach((w, j) => {
      const td = row.insertCell();
      td.style.background = colour(scale(w));
      td.title = `${readable(tok)} -> ${readable(enc.tokens[j])}: ${w.toFixed(3)}`;
    });
  });
  box.append(table);
}

function highlight(i) { // light up the source tokens target token i attended to
  const box = $("heatmap");
  box.querySelectorAll("tbody tr").forEach((tr) => {
    tr.classList.toggle("active", Number(tr.dataset.index) === i);
    tr.classList.toggle("pinned", Number(tr.dataset.index) === pinned);
  });
  const spans = box.querySelectorAll("thead span");
  const row = current && i >= 0 ? current.weights[i] || [] : [];
  const top = Math.max(0, ...row);
  spans.forEach((span, j) => {
    const w = row[j];
    span.classList.toggle("lit", w !== undefined && w >= 0.5 * top && top > 0);
    span.style.background = w === undefined ? "" : `rgba(255, 183, 3, ${Math.min(1, w / (top || 1))})`;
    span.title = w === undefined ? "" : `weight ${w.toFixed(3)}`;
  });
}

function parseEvents(buffer, onEvent) { // Server-Sent Events: "event: x\ndata: {...}\n\n"; returns the rest
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, cut);
    buffer = buffer.slice(cut + 2);
    let event = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    onEvent(event, data ? JSON.parse(data) : null);
  }
  return buffer;
}

async function translate(ev) {
  ev.preventDefault();
  const text = $("source").value;
  const beam = Number($("beam").value), stream = $("stream").checked;
  const body = { texts: [text], beam_size: beam, return_attention: true, stream, ...attentionChoice() };
  showError("translate-error", "");
  $("translation").textContent = "";
  $("alignment-img").classList.add("hidden");
  $("alignment-png").classList.add("hidden");
  $("alignment-caption").textContent = "";
  renderHeatmap(null);
  renderEncoder(null);
  $("translate-btn").disabled = true;
  const t0 = performance.now();
  let first = null;
  try {
    const r = await fetch("/v1/translate", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    if (!r.ok) throw new Error(await apiError(r));
    let result;
    if (stream) {
      const rows = [], tokens = [];
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = parseEvents(buffer + value, (event, data) => {
          if (event === "token") {
            first = first ?? performance.now() - t0;
            $("translation").textContent = data.text;
            tokens.push(data.token);
            if (data.alignment) {
              rows.push(data.alignment);
              renderHeatmap({ source_tokens: data.alignment.map(() => ""), target_tokens: tokens, weights: rows });
            }
          } else if (event === "done") result = data;
          else if (event === "error") throw new Error(`${data.error.code}: ${data.error.message}`);
        });
      }
      if (!result) throw new Error("the stream ended without a done event");
    } else {
      result = await r.json();
    }
    const t = result.translations[0];
    $("translation").textContent = t.text;
    renderHeatmap(t.attention);
    if (t.attention) $("alignment-caption").textContent = `alignment: ${layersText("decoder", t.attention.layers,
      t.attention.heads)}`;
    renderEncoder(t.encoder_attention);
    $("alignment-png").classList.remove("hidden");
    const ms = performance.now() - t0;
    $("translate-latency").textContent = (first !== null ? `first token ${first.toFixed(0)} ms, ` : "") +
      `${ms.toFixed(0)} ms · ${result.model} ${result.version}`;
  } catch (e) {
    showError("translate-error", e.message);
    $("translate-latency").textContent = "";
  } finally {
    $("translate-btn").disabled = false;
  }
}

async function alignmentPng(ev) { // the same alignment drawn by the API (Accept: image/png)
  ev.preventDefault();
  const body = { texts: [$("source").value], beam_size: Number($("beam").value), ...attentionChoice() };
  const r = await fetch("/v1/translate", { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", Accept: "image/png" } });
  if (!r.ok) return showError("translate-error", await apiError(r));
  const img = $("alignment-img");
  img.src = URL.createObjectURL(await r.blob());
  img.classList.remove("hidden");
}

// ---- classification -------------------------------------------------------------------------------------
let lastFile = null;
let classifyRun = 0; // only the latest classification draws (a map change may start one before the last ends)

function setupMapChoices(layers, heads) { // the ViT's layers and heads, from GET /v1/models
  const layer = $("map-layer"), head = $("map-head");
  const add = (select, value, text) => {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    select.append(o);
  };
  for (let i = 0; i < layers; i++) add(layer, String(i), String(i));
  for (let h = 0; h < heads; h++) add(head, String(h), String(h));
}

function mapChoice() { // the form fields of the chosen map (multipart: lists as comma-separated text)
  const method = $("map").value;
  const fields = { attention: method };
  if (method === "cls") {
    const layer = $("map-layer").value, head = $("map-head").value;
    if (layer) fields.attention_layers = layer; // "" = the service's default: the mean of all layers
    if (head) fields.attention_heads = head;
  }
  return fields;
}

function mapChanged() {
  const cls = $("map").value === "cls";
  $("map-layer").disabled = !cls;
  $("map-head").disabled = !cls;
  if (lastFile) classify(lastFile);
}

async function classify(file) {
  lastFile = file;
  const run = ++classifyRun;
  showError("classify-error", "");
  $("topk").innerHTML = "";
  $("overlay").classList.add("hidden");
  $("overlay-caption").textContent = "";
  $("classify-latency").textContent = "classifying…";
  const choice = mapChoice();
  const form = (picture) => {
    const f = new FormData();
    f.append("images", file, file.name || "image.png");
    f.append("top_k", "5");
    if (picture) for (const [k, v] of Object.entries(choice)) f.append(k, v);
    return f;
  };
  const t0 = performance.now();
  try {
    const [json, png] = await Promise.all([
      fetch("/v1/classify", { method: "POST", body: form(false) }),
      fetch("/v1/classify", { method: "POST", body: form(true), headers: { Accept: "image/png" } }),
    ]);
    if (run !== classifyRun) return;
    if (!json.ok) throw new Error(await apiError(json));
    const result = await json.json();
    if (run !== classifyRun) return;
    $("topk").innerHTML = "";
    for (const { label, score } of result.predictions[0].top_k) {
      const li = document.createElement("li");
      li.innerHTML = '<span class="label"></span><span class="bar"></span><span class="score"></span>';
      li.children[0].textContent = label;
      li.children[1].style.width = `${Math.max(1, score * 100)}%`;
      li.children[2].textContent = `${(score * 100).toFixed(1)}%`;
      $("topk").append(li);
    }
    $("classify-latency").textContent = `${(performance.now() - t0).toFixed(0)} ms · ${result.model} ` +
      result.version;
    if (!png.ok) throw new Error(await apiError(png));
    const blob = await png.blob();
    if (run !== classifyRun) return;
    $("overlay").src = URL.createObjectURL(blob);
    $("overlay").classList.remove("hidden");
    $("overlay-caption").textContent = png.headers.get("X-Attention") || "";
  } catch (e) {
    if (run !== classifyRun) return;
    showError("classify-error", e.message);
    if (!$("topk").children.length) $("classify-latency").textContent = "";
  }
}

function setupClassify() {
  for (const id of ["map", "map-layer", "map-head"]) $(id).addEventListener("change", mapChanged);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => { if (e.target.files.length) classify(e.target.files[0]); });
  for (const name of SAMPLES) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = name;
    button.dataset.sample = name;
    button.innerHTML = `<img src="/static/samples/${name}.png" alt="${name}">`;
    button.addEventListener("click", async () => {
      document.querySelectorAll(".samples button").forEach((b) => b.classList.toggle("chosen", b === button));
      const blob = await (await fetch(`/static/samples/${name}.png`)).blob();
      classify(new File([blob], `${name}.png`, { type: "image/png" }));
    });
    $("samples").append(button);
  }
}

$("translate-form").addEventListener("submit", translate);
$("alignment-png").addEventListener("click", alignmentPng);
setupClassify();
loadModels();
