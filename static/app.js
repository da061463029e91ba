// zypher-ws live page. Plain JavaScript: no framework, no build step, nothing from other origins.
// Model output reaches the page only through textContent and DOM nodes, never innerHTML.
"use strict";

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const $ = (sel) => document.querySelector(sel);
const predictions = new Map(); // prediction_id -> {record, el}
let model = null;
let socket = null;
let reconnectDelay = 250;
let wsFailures = 0;
let pollTimer = null;

// ---------------------------------------------------------------- API token (when the service requires one)
// Kept for this tab only (sessionStorage); sent as a bearer header, and as the socket's first message.
const token = () => sessionStorage.getItem("zypher-token") || "";

function api(url, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  return fetch(url, { ...options, headers });
}

function setupToken() {
  const input = $("#token");
  input.value = token();
  input.addEventListener("change", () => {
    sessionStorage.setItem("zypher-token", input.value.trim());
    loadModels().catch((e) => { $("#model-name").textContent = `model unavailable: ${e.message}`; });
    if (socket) socket.close(); // reconnects with the new token
  });
}

// ---------------------------------------------------------------- models and input
// The picker lists GET /models; each choice is a model's default version or one version by number.
// Predictions go to that model's own route; the input box is prefilled from its schema.
let grid = false;

async function loadModels() {
  const resp = await api("/models");
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error ? body.error.code : resp.status); // e.g. unauthorized: enter a token
  const picker = $("#model-picker");
  const previous = picker.value;
  picker.replaceChildren();
  for (const m of body.models) {
    const latest = m.versions.find((v) => v.version === m.default_version);
    picker.appendChild(option(`${m.name}`, `${m.name} (version ${m.default_version})`, latest));
    if (m.versions.length > 1) {
      for (const v of m.versions) picker.appendChild(option(`${m.name}/${v.version}`, `${m.name} version ${v.version}`, v));
    }
  }
  const wanted = [...picker.options].some((o) => o.value === previous) ? previous : body.default.name;
  picker.value = wanted;
  await chooseModel();
}

function option(value, text, version) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = version && version.state !== "ready" ? `${text}: ${version.state}` : text;
  if (version && version.error) el.title = version.error;
  return el;
}

function modelPath() {
  const [name, version] = $("#model-picker").value.split("/");
  const base = `/models/${encodeURIComponent(name)}`;
  return version ? `${base}/versions/${encodeURIComponent(version)}` : base;
}

async function chooseModel() {
  const chosen = $("#model-picker").value;
  const resp = await api(modelPath());
  const body = await resp.json();
  if ($("#model-picker").value !== chosen) return; // picked again meanwhile: that answer wins
  if (!resp.ok) throw new Error(body.error ? body.error.code : resp.status);
  model = body;
  $("#model-name").textContent = model.state === "ready"
    ? `${model.name} ${model.version} (${model.runtime})`
    : `${model.name} ${model.version}: ${model.state}${model.error ? ` (${model.error})` : ""}`;
  $("#stream").checked = modelStreams(model);
  grid = isDigitGrid(model.input_schema);
  $("#digits-panel").hidden = !grid;
  if (grid) {
    buildGrid();
    syncJson();
  } else {
    $("#input-json").value = JSON.stringify(exampleFor(model.input_schema), null, 1);
  }
  document.body.dataset.model = `${model.name}/${model.version}`; // the page is ready to take an input
}

// Whether the model offers a stream (predict_stream): then the page asks for it by default.
function modelStreams(m) {
  return Boolean(m && (m.streams === true || m.stream === true || (m.capabilities && m.capabilities.stream)));
}

// 64 numbers, 0 to 16 where the schema bounds them: the 8x8 digit the grid draws.
function isDigitGrid(schema) {
  if (!schema) return false;
  const flat = (schema.oneOf || schema.anyOf || [schema])[0];
  if (!flat || flat.type !== "array" || flat.minItems !== 64 || flat.maxItems !== 64) return false;
  const items = flat.items || {};
  return (items.type === "number" || items.type === "integer") && (items.maximum === undefined || items.maximum === 16);
}

function exampleFor(schema) {
  if (!schema || typeof schema !== "object") return null;
  if ("example" in schema) return schema.example;
  if (schema.oneOf || schema.anyOf) return exampleFor((schema.oneOf || schema.anyOf)[0]);
  switch (schema.type) {
    case "array": return Array.from({ length: schema.minItems || 1 }, () => exampleFor(schema.items));
    case "object": {
      const out = {};
      for (const [k, v] of Object.entries(schema.properties || {})) out[k] = exampleFor(v);
      return out;
    }
    case "number": case "integer": return schema.minimum ?? 0;
    case "string": return "";
    case "boolean": return false;
    default: return {};
  }
}

const pixels = new Array(64).fill(0);
let gridBuilt = false;
function buildGrid() {
  if (gridBuilt) return;
  gridBuilt = true;
  const grid = $("#grid");
  let painting = null;
  for (let i = 0; i < 64; i++) {
    const cell = document.createElement("div");
    cell.className = "cell";
    cell.dataset.index = String(i);
    cell.setAttribute("role", "gridcell");
    grid.appendChild(cell);
  }
  const paint = (cell, value) => { if (cell && cell.dataset.index !== undefined) setPixel(Number(cell.dataset.index), value); };
  grid.addEventListener("pointerdown", (e) => {
    e.preventDefault();
    painting = e.button === 2 || e.shiftKey ? 0 : 16;
    paint(e.target, painting);
  });
  grid.addEventListener("pointerover", (e) => { if (painting !== null) paint(e.target, painting); });
  window.addEventListener("pointerup", () => { painting = null; });
  grid.addEventListener("contextmenu", (e) => e.preventDefault());
  $("#clear").addEventListener("click", () => { for (let i = 0; i < 64; i++) setPixel(i, 0); });
}

function setPixel(i, value) {
  pixels[i] = value;
  const cell = $("#grid").children[i];
  const shade = Math.round(255 - (value / 16) * 255);
  cell.style.background = `rgb(${shade},${shade},${shade})`;
  syncJson();
}

function syncJson() {
  const rows = [];
  for (let r = 0; r < 8; r++) rows.push(pixels.slice(r * 8, r * 8 + 8));
  $("#input-json").value = "[" + rows.map((row) => JSON.stringify(row)).join(",\n ") + "]";
}

// ---------------------------------------------------------------- submitting
async function submit() {
  const errorEl = $("#submit-error");
  errorEl.textContent = "";
  let input;
  try {
    input = JSON.parse($("#input-json").value);
  } catch (e) {
    errorEl.textContent = `Input is not valid JSON: ${e.message}`;
    return;
  }
  const mode = document.querySelector('input[name="mode"]:checked').value;
  const headers = { "Content-Type": "application/json" };
  if (mode === "async") headers["Async-Mode"] = "true";
  const started = performance.now();
  const payload = $("#stream").checked ? { input, stream: true } : { input };
  const resp = await api(`${modelPath()}/predict`, { method: "POST", headers, body: JSON.stringify(payload) });
  const body = await resp.json();
  if (body.error && !body.prediction_id) {
    errorEl.textContent = `${resp.status} ${body.error.code}: ${body.error.message}`;
    return;
  }
  track(body, { submittedAt: started, mode });
}

// ---------------------------------------------------------------- the list
function track(record, extra = {}) {
  let entry = predictions.get(record.prediction_id);
  if (!entry) {
    const el = $("#prediction-template").content.firstElementChild.cloneNode(true);
    el.dataset.predictionId = record.prediction_id;
    el.querySelector(".pid").textContent = record.prediction_id;
    el.querySelector(".cancel").addEventListener("click", () => cancel(record.prediction_id));
    $("#predictions").prepend(el);
    entry = { record, el, nextIndex: 0, ...extra }; // nextIndex: the stream's next chunk, each shown once
    predictions.set(record.prediction_id, entry);
    subscribe([record.prediction_id]);
  }
  update(record);
}

const RANK = { queued: 0, running: 1, succeeded: 2, failed: 2, canceled: 2 };

function update(record) {
  const entry = predictions.get(record.prediction_id);
  if (!entry) return;
  if (RANK[record.status] < RANK[entry.record.status]) return; // never move backwards
  entry.record = record;
  const el = entry.el;
  if (Number.isInteger(record.queue_position)) entry.queuePosition = record.queue_position;
  showStatus(entry);
  el.dataset.status = record.status;
  el.querySelector(".cancel").hidden = TERMINAL.has(record.status);
  if (isStream(record)) {
    // Its result is the list of chunks so far: take those past the last one shown.
    if (Array.isArray(record.result)) {
      for (let i = entry.nextIndex; i < record.result.length; i++) appendChunk(entry, i, record.result[i]);
    }
    if (record.progress) showProgress(entry, record.progress);
  } else {
    renderResult(el, record);
  }
  el.querySelector(".error-text").textContent = record.error ? `${record.error.code}: ${record.error.message}` : "";
  el.querySelector(".timings").textContent = timings(record);
}

// A waiting prediction's place in line: from its record where that says (GET), else from the last
// `queue` message. queue_position counts from 0 (next to run); people count from 1.
function showStatus(entry) {
  const record = entry.record;
  const status = entry.el.querySelector(".status");
  const position = record.status === "queued" ? entry.queuePosition : undefined;
  status.textContent = Number.isInteger(position) ? `queued, position ${position + 1}` : record.status;
  status.dataset.status = record.status;
  status.title = record.status === "queued" && record.estimated_start_at ? `expected to start ${record.estimated_start_at}` : "";
}

function onQueue(msg) {
  const entry = predictions.get(msg.prediction_id);
  if (!entry || !Number.isInteger(msg.queue_position)) return;
  entry.queuePosition = msg.queue_position;
  if (msg.estimated_start_at) entry.record = { ...entry.record, estimated_start_at: msg.estimated_start_at };
  showStatus(entry);
}

function isStream(record) {
  return record.stream === true;
}

// ---------------------------------------------------------------- streams: chunks in index order, each once
function onChunk(id, index, chunk) {
  const entry = predictions.get(id);
  if (!entry) return;
  if (index < entry.nextIndex) return; // had it already (a snapshot after a reconnect carried it)
  if (index > entry.nextIndex) {
    resubscribe(id); // a chunk went missing: ask for the ones after the last shown
    return;
  }
  appendChunk(entry, index, chunk);
}

function appendChunk(entry, index, chunk) {
  const span = document.createElement("span");
  span.className = "chunk";
  span.dataset.index = String(index);
  span.textContent = chunkText(chunk);
  entry.el.querySelector(".stream-text").appendChild(span);
  entry.nextIndex = index + 1;
  entry.el.dataset.chunks = String(entry.nextIndex);
}

// Text as it is; a token generator's {"token": ...} or {"text": ...} as its text; anything else as JSON.
function chunkText(chunk) {
  if (typeof chunk === "string") return chunk;
  if (chunk && typeof chunk === "object") {
    if (typeof chunk.token === "string") return chunk.token;
    if (typeof chunk.text === "string") return chunk.text;
  }
  return `${JSON.stringify(chunk)} `;
}

function showProgress(entry, progress) {
  const bar = entry.el.querySelector(".progress");
  const fraction = Math.min(1, Math.max(0, Number(progress.fraction) || 0));
  bar.hidden = false;
  bar.value = fraction;
  bar.title = `${Math.round(fraction * 100)}%`;
  entry.el.querySelector(".progress-message").textContent = progress.message || "";
}

function subscribeMessage(id) {
  const entry = predictions.get(id);
  const message = { op: "subscribe", prediction_id: id };
  if (entry && entry.nextIndex > 0) message.from_index = entry.nextIndex - 1; // replay from the next chunk
  return message;
}

// A subscribe of an id already watched changes nothing on the server: unsubscribe first.
function resubscribe(id) {
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  socket.send(JSON.stringify({ op: "unsubscribe", prediction_id: id }));
  socket.send(JSON.stringify(subscribeMessage(id)));
}

function renderResult(el, record) {
  const label = el.querySelector(".label");
  const bars = el.querySelector(".bars");
  const json = el.querySelector(".json");
  label.textContent = "";
  bars.replaceChildren();
  json.textContent = "";
  const result = record.result;
  if (result === null || result === undefined) return;
  const classes = probabilities(result);
  if (classes) {
    // Any classifier: its label, and a bar per class ({"0": p, ...} or [p, ...]).
    label.textContent = String(result.label);
    bars.style.gridTemplateColumns = `repeat(${classes.length}, 1.3rem)`;
    for (const [name, p] of classes) {
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.height = `${Math.max(1, Math.round(Number(p) * 100))}%`;
      bar.title = `${name}: ${(Number(p) * 100).toFixed(1)}%`;
      const tick = document.createElement("span");
      tick.textContent = name;
      bar.appendChild(tick);
      bars.appendChild(bar);
    }
  } else {
    json.textContent = JSON.stringify(result, null, 2);
  }
}

function probabilities(result) {
  if (!result || typeof result !== "object" || !("label" in result)) return null;
  const p = result.probabilities;
  let entries = null;
  if (Array.isArray(p)) entries = p.map((v, i) => [String(i), v]);
  else if (p && typeof p === "object") entries = Object.entries(p);
  if (!entries || !entries.length || entries.length > 50) return null;
  return entries.every(([, v]) => typeof v === "number") ? entries : null;
}

function timings(r) {
  const t = (s) => (s ? Date.parse(s) : null);
  const parts = [];
  const created = t(r.created_at), started = t(r.started_at), done = t(r.completed_at);
  if (created && started) parts.push(`queued ${started - created} ms`);
  if (started && done) parts.push(`ran ${done - started} ms`);
  if (created && done) parts.push(`total ${done - created} ms`);
  if (r.metrics && r.metrics.batch_size) parts.push(`batch of ${r.metrics.batch_size}`);
  return parts.join(" · ");
}

async function cancel(id) {
  const resp = await api(`/predict/${encodeURIComponent(id)}`, { method: "DELETE" });
  const body = await resp.json();
  if (body.prediction_id) update(body);
}

function unfinishedIds() {
  return [...predictions.values()].filter((e) => !TERMINAL.has(e.record.status)).map((e) => e.record.prediction_id);
}

// ---------------------------------------------------------------- live updates
function setConnection(state) {
  const badge = $("#connection");
  badge.dataset.state = state;
  badge.textContent = state;
}

function subscribe(ids) {
  if (!ids.length || !socket || socket.readyState !== WebSocket.OPEN) return;
  // Streams that have shown chunks resume after the last one; the rest subscribe in one message.
  const resuming = ids.filter((id) => (predictions.get(id) || {}).nextIndex > 0);
  for (const id of resuming) socket.send(JSON.stringify(subscribeMessage(id)));
  const fresh = ids.filter((id) => !resuming.includes(id));
  if (fresh.length) socket.send(JSON.stringify({ op: "subscribe", prediction_ids: fresh }));
}

function connect() {
  if (!("WebSocket" in window) || wsFailures >= 5) {
    startPolling();
    return;
  }
  setConnection("connecting");
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  const ws = new WebSocket(url);
  socket = ws;
  ws.addEventListener("open", () => {
    wsFailures = 0;
    reconnectDelay = 250;
    stopPolling();
    setConnection("open");
    if (token()) ws.send(JSON.stringify({ op: "auth", token: token() }));
    subscribe(unfinishedIds()); // resubscribe after a reconnect: the server replies with current state
  });
  ws.addEventListener("message", (event) => {
    let msg;
    try { msg = JSON.parse(event.data); } catch { return; }
    if (msg.prediction) {
      if (predictions.has(msg.prediction.prediction_id)) update(msg.prediction);
      else track(msg.prediction);
    } else if (msg.type === "output") {
      onChunk(msg.prediction_id, msg.index, msg.chunk);
    } else if (msg.type === "queue") {
      onQueue(msg);
    } else if (msg.type === "progress" && predictions.has(msg.prediction_id)) {
      showProgress(predictions.get(msg.prediction_id), msg);
    } else if (msg.type === "error" && msg.prediction_id && predictions.has(msg.prediction_id)) {
      const entry = predictions.get(msg.prediction_id);
      entry.el.querySelector(".error-text").textContent = `${msg.error.code}: ${msg.error.message}`;
    }
  });
  ws.addEventListener("close", () => {
    if (socket !== ws) return;
    socket = null;
    wsFailures += 1;
    setConnection("closed");
    if (wsFailures >= 5) startPolling(); // WebSocket unavailable (a proxy?): poll, and keep trying now and then
    setTimeout(connect, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 5000);
  });
}

function startPolling() {
  if (pollTimer) return;
  setConnection("polling");
  pollTimer = setInterval(async () => {
    for (const id of unfinishedIds()) {
      try {
        const resp = await api(`/predict/${encodeURIComponent(id)}`);
        if (resp.ok) update(await resp.json());
      } catch { /* server away; try again next tick */ }
    }
  }, 1000);
  if (wsFailures >= 5) setTimeout(() => { wsFailures = 4; connect(); }, 10000);
}

function stopPolling() {
  if (pollTimer) clearInterval(pollTimer);
  pollTimer = null;
}

// ---------------------------------------------------------------- start
document.addEventListener("DOMContentLoaded", () => {
  $("#submit").addEventListener("click", () => submit().catch((e) => { $("#submit-error").textContent = String(e); }));
  $("#watch-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("#watch-id").value.trim();
    if (id) watch(id);
  });
  setupToken();
  $("#model-picker").addEventListener("change", () => {
    chooseModel().catch((e) => { $("#model-name").textContent = `model unavailable: ${e.message}`; });
  });
  loadModels().catch((e) => { $("#model-name").textContent = `model unavailable: ${e.message}`; });
  connect();
  const params = new URLSearchParams(location.search);
  for (const id of (params.get("watch") || "").split(",").filter(Boolean)) watch(id);
});

async function watch(id) {
  const resp = await api(`/predict/${encodeURIComponent(id)}`);
  const body = await resp.json();
  if (body.prediction_id) track(body);
  else $("#submit-error").textContent = `${body.error.code}: ${body.error.message}`;
}
