// The raftgen web page: plain script over the node's public JSON API (no
// framework, no build step). Every text from the API goes in with
// textContent, never as markup.
"use strict";

const KEY_STORE = "raftgen.apiKey";
const JOBS_STORE = "raftgen.jobs";
/** Ids of this browser's jobs kept in localStorage. */
const MAX_MINE = 100;
/** Jobs shown in "Your jobs" and in the gallery. */
const MAX_LISTED = 24;
const CLUSTER_POLL_MS = 2000;
const GALLERY_POLL_MS = 5000;
/** Polling of one job when EventSource cannot be used (an API key is set). */
const JOB_POLL_MS = 1000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

// ---- API ----

function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

/** Calls the API; resolves to {ok, status, body}. A 401 opens the key panel. */
async function api(method, path, body) {
  const headers = {};
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try {
    data = await resp.json();
  } catch (_) {
    data = null;
  }
  // An answer to a request sent before the key changed says nothing of the new key.
  if (resp.status === 401 && key === apiKey()) showKeyPanel(errorMessage(data) || "This cluster needs an API key.");
  return { ok: resp.ok, status: resp.status, body: data };
}

function errorMessage(body) {
  return body && body.error && body.error.message;
}

// ---- API key ----

function showKeyPanel(message) {
  $("#key-message").textContent = apiKey() ? "The key was refused: " + message : message;
  $("#key-panel").hidden = false;
}

function setupKey() {
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("#api-key").value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORE, key);
    $("#api-key").value = "";
    $("#key-panel").hidden = true;
    restart();
  });
  $("#key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    restart();
  });
}

// ---- Cluster view ----

let lastModels = "";

function healthText(m) {
  if (m.healthy === true) return "healthy";
  if (m.healthy === false) return "unreachable";
  return "unknown";
}

function renderCluster(c) {
  const members = c.members || [];
  const leader = c.leader_id == null ? "none" : "node " + c.leader_id;
  $("#cluster-summary").textContent =
    `${members.length} nodes · leader ${leader} · term ${c.term} · queue depth ${c.queue_depth}`;
  const here = members.find((m) => m.addr === location.host);
  $("#summary").textContent = (here ? `This page is from node ${here.id}; ` : "") + `leader ${leader}.`;
  const rows = members.map((m) => {
    const isLeader = m.id === c.leader_id;
    const role =
      (isLeader ? "leader, " : "") + m.role + (m.draining ? ", draining" : "") + (m === here ? " (this page)" : "");
    const models = (m.models || []).join(", ");
    return el(
      "tr",
      { "data-node-id": String(m.id), class: isLeader ? "leader" : "" },
      el("td", {}, String(m.id)),
      el("td", {}, m.addr || ""),
      el("td", { "data-role": isLeader ? "leader" : m.role }, role),
      el("td", { class: "health-" + healthText(m) }, healthText(m)),
      el("td", {}, `${m.running} / ${m.slots}`),
      el("td", {}, models),
    );
  });
  $("#cluster tbody").replaceChildren(...rows);
  renderModels(Object.keys(c.model_hashes || {}));
}

function renderModels(names) {
  const key = names.join("\n");
  if (key === lastModels) return;
  lastModels = key;
  const select = $("#f-model");
  const chosen = select.value;
  if (names.length === 0) {
    select.replaceChildren(el("option", { value: "", disabled: true }, "no node serves a model"));
    return;
  }
  select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  if (names.includes(chosen)) select.value = chosen;
  loadModelDefaults();
}

/** Each model's native size and default steps (`GET /v1/models`). */
let modelDefaults = new Map();

async function loadModelDefaults() {
  try {
    const r = await api("GET", "/v1/models");
    if (!r.ok) return;
    modelDefaults = new Map(r.body.data.map((m) => [m.id, m]));
    applyModelDefaults();
  } catch (_) {
    // The fields keep their placeholders ("model default").
  }
}

/** Fills width, height and steps with the chosen model's defaults, unless
 *  the user typed a value, and says what a larger size costs. */
function applyModelDefaults() {
  const m = modelDefaults.get($("#f-model").value);
  if (!m) return;
  const form = $("#submit-form");
  for (const name of ["width", "height"]) {
    const input = form.elements[name];
    if (!input.dataset.userSet) input.value = String(m.default_side_px);
  }
  form.elements.steps.placeholder = `model default (${m.default_steps})`;
  sizeHint();
}

/** Time grows with the pixels: a size above the model's native one says by how much. */
function sizeHint() {
  const m = modelDefaults.get($("#f-model").value);
  const form = $("#submit-form");
  const w = Number(form.elements.width.value) || (m && m.default_side_px);
  const h = Number(form.elements.height.value) || (m && m.default_side_px);
  const hint = $("#size-hint");
  if (!m || !w || !h) {
    hint.textContent = "";
    return;
  }
  const native = m.default_side_px * m.default_side_px;
  const factor = (w * h) / native;
  hint.textContent =
    `${m.id} draws ${m.default_side_px}×${m.default_side_px} px natively` +
    (factor > 1.01 ? `; ${w}×${h} is ${factor.toFixed(factor < 10 ? 1 : 0)}× its pixels, so each step takes about that much longer (more on a CPU).` : ".");
}

async function pollCluster() {
  try {
    const r = await api("GET", "/v1/cluster");
    if (r.ok) renderCluster(r.body);
    else $("#cluster-summary").textContent = "Cluster unavailable: " + (errorMessage(r.body) || r.status);
  } catch (e) {
    $("#cluster-summary").textContent = "This node does not answer (" + e.message + ")";
  }
  setTimeout(pollCluster, CLUSTER_POLL_MS);
}

// ---- Submitting ----

const NUMBER_FIELDS = ["width", "height", "steps", "guidance", "seed"];
const TEXT_FIELDS = ["negative_prompt", "sampler", "model"];

function clearErrors() {
  for (const span of document.querySelectorAll("#submit-form .error")) span.textContent = "";
  for (const input of document.querySelectorAll("#submit-form [aria-invalid]")) input.removeAttribute("aria-invalid");
}

function showError(field, message) {
  const span = document.querySelector(`#submit-form .error[data-field="${CSS.escape(field || "")}"]`);
  if (span && field) {
    span.textContent = message;
    const input = document.getElementById("f-" + field);
    if (input) input.setAttribute("aria-invalid", "true");
  } else {
    $("#e-form").textContent = (field ? field + ": " : "") + message;
  }
}

function formBody() {
  const form = $("#submit-form");
  const body = { prompt: form.elements.prompt.value };
  for (const name of TEXT_FIELDS) {
    const v = form.elements[name].value.trim();
    if (v) body[name] = v;
  }
  for (const name of NUMBER_FIELDS) {
    const input = form.elements[name];
    if (input.validity.badInput) throw { field: name, message: "must be a number" };
    if (input.value.trim() !== "") body[name] = Number(input.value);
  }
  return body;
}

async function submit(e) {
  e.preventDefault();
  clearErrors();
  let body;
  try {
    body = formBody();
  } catch (err) {
    showError(err.field, err.message);
    return;
  }
  const button = $("#submit-button");
  button.disabled = true;
  try {
    const r = await api("POST", "/v1/jobs", body);
    if (!r.ok) {
      const err = (r.body && r.body.error) || {};
      showError(err.field, err.message || "HTTP " + r.status);
      return;
    }
    remember(r.body.id);
    showJob(r.body);
    track(r.body.id);
  } catch (err) {
    showError("", "the node did not answer: " + err.message);
  } finally {
    button.disabled = false;
  }
}

// ---- Your jobs ----

function mine() {
  try {
    const ids = JSON.parse(localStorage.getItem(JOBS_STORE) || "[]");
    return Array.isArray(ids) ? ids.filter((i) => typeof i === "string") : [];
  } catch (_) {
    return [];
  }
}

function remember(id) {
  const ids = [id, ...mine().filter((i) => i !== id)].slice(0, MAX_MINE);
  localStorage.setItem(JOBS_STORE, JSON.stringify(ids));
}

function forget(id) {
  localStorage.setItem(JOBS_STORE, JSON.stringify(mine().filter((i) => i !== id)));
}

/** The job's list entry, made on first sight. */
function jobItem(job) {
  let li = document.querySelector(`#jobs li[data-job-id="${CSS.escape(job.id)}"]`);
  if (!li) {
    const bar = el("progress", { max: 1, value: 0, "aria-label": "progress of job " + job.id });
    li = el(
      "li",
      { "data-job-id": job.id },
      el("span", { class: "prompt" }, job.request.prompt),
      el("span", { class: "state" }),
      bar,
      el("span", { class: "step" }),
      el("span", { class: "error" }),
    );
    const list = $("#jobs");
    list.prepend(li);
    while (list.children.length > MAX_LISTED) list.lastElementChild.remove();
    $("#jobs-empty").hidden = true;
  }
  return li;
}

/** Shows a job's view (a full `GET /v1/jobs/{id}` answer). */
function showJob(job) {
  const li = jobItem(job);
  setState(job.id, job.state, job.node);
  setProgress(job.id, job.progress.step, job.progress.steps || job.request.steps);
  if (job.error) li.querySelector(".error").textContent = job.error;
  if (job.state === "succeeded") {
    setProgress(job.id, job.request.steps, job.request.steps);
    addToGallery(job);
  }
}

function setState(id, state, node) {
  const li = document.querySelector(`#jobs li[data-job-id="${CSS.escape(id)}"]`);
  if (!li) return;
  li.dataset.state = state;
  if (state === "running" && !runningSeen.has(id)) runningSeen.set(id, [performance.now(), 0]);
  if (TERMINAL.has(state)) runningSeen.delete(id);
  li.querySelector(".state").textContent = state + (node != null ? " on node " + node : "");
}

/** When this page first saw each job running: [time (ms), step]. */
const runningSeen = new Map();

/** "about 2 min left", from the steps done since this page saw the job run. */
function etaText(id, step, steps) {
  const seen = runningSeen.get(id);
  if (!seen || step >= steps || step <= seen[1]) return "";
  const msPerStep = (performance.now() - seen[0]) / (step - seen[1]);
  const left = Math.ceil((msPerStep * (steps - step)) / 1000);
  return left < 90 ? `about ${left} s left` : `about ${Math.round(left / 60)} min left`;
}

function setProgress(id, step, steps) {
  const li = document.querySelector(`#jobs li[data-job-id="${CSS.escape(id)}"]`);
  if (!li || !steps) return;
  const bar = li.querySelector("progress");
  bar.max = steps;
  bar.value = Math.min(step, steps);
  const eta = li.dataset.state === "running" ? etaText(id, step, steps) : "";
  if (eta) li.dataset.etaShown = "1";
  li.querySelector(".step").textContent = `step ${step}/${steps}` + (eta ? ` · ${eta}` : "");
}

const trackers = new Map();

/** Follows a job until it ends: SSE without a key, polling with one
 *  (EventSource cannot send an Authorization header). */
function track(id) {
  if (trackers.has(id)) return;
  if (apiKey() || typeof EventSource === "undefined") {
    poll(id);
    return;
  }
  const es = new EventSource(`/v1/jobs/${encodeURIComponent(id)}/events`);
  trackers.set(id, { close: () => es.close() });
  es.addEventListener("state", (e) => {
    const d = JSON.parse(e.data);
    if (d.job) showJob(d.job);
    else setState(id, d.state, d.node);
  });
  es.addEventListener("progress", (e) => {
    const d = JSON.parse(e.data);
    setProgress(id, d.step, d.steps);
  });
  es.addEventListener("done", (e) => {
    es.close();
    trackers.delete(id);
    showJob(JSON.parse(e.data).job);
  });
  es.addEventListener("error", (e) => {
    if (e.data) {
      // The server's own `error` event: the job is gone.
      es.close();
      trackers.delete(id);
      const li = document.querySelector(`#jobs li[data-job-id="${CSS.escape(id)}"]`);
      if (li) li.querySelector(".error").textContent = errorMessage(JSON.parse(e.data)) || "error";
    } else if (es.readyState === EventSource.CLOSED) {
      // Refused (e.g. too many streams): poll instead.
      trackers.delete(id);
      poll(id);
    }
  });
}

function poll(id) {
  let stopped = false;
  trackers.set(id, { close: () => (stopped = true) });
  const step = async () => {
    if (stopped) return;
    try {
      const r = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`);
      if (r.status === 404) {
        forget(id);
        trackers.delete(id);
        return;
      }
      if (r.ok) {
        showJob(r.body);
        if (TERMINAL.has(r.body.state)) {
          trackers.delete(id);
          return;
        }
      }
    } catch (_) {
      // The node is away: try again.
    }
    setTimeout(step, JOB_POLL_MS);
  };
  step();
}

async function loadMine() {
  for (const id of mine().slice(0, MAX_LISTED).reverse()) {
    try {
      const r = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`);
      if (r.status === 404) forget(id);
      if (!r.ok) continue;
      showJob(r.body);
      if (!TERMINAL.has(r.body.state)) track(id);
    } catch (_) {
      // Shown on the next load.
    }
  }
}

// ---- Gallery ----

const objectUrls = new Map();

function fmtTime(ms) {
  return ms == null ? "" : new Date(ms).toLocaleString();
}

function addToGallery(job) {
  if (document.querySelector(`#gallery figure[data-job-id="${CSS.escape(job.id)}"]`)) return;
  const r = job.request;
  const secs = job.started_at_ms != null && job.finished_at_ms != null ? (job.finished_at_ms - job.started_at_ms) / 1000 : null;
  const params = [
    ["model", r.model],
    ["size", `${r.width}×${r.height}`],
    ["steps", r.steps],
    ["guidance", r.guidance],
    ["sampler", r.sampler || "default"],
    ["seed", job.seed],
    ["node", job.node],
    ["finished", fmtTime(job.finished_at_ms) + (secs != null ? ` (${secs.toFixed(1)} s)` : "")],
  ];
  if (r.negative_prompt) params.splice(1, 0, ["negative", r.negative_prompt]);
  const dl = el("dl", {});
  for (const [k, v] of params) dl.append(el("dt", {}, k), el("dd", {}, v == null ? "" : String(v)));
  const yours = mine().includes(job.id);
  const figure = el(
    "figure",
    { "data-job-id": job.id, "data-state": job.state, "data-finished": String(job.finished_at_ms || 0), class: yours ? "yours" : "" },
  );
  if (job.result && !job.result.evicted) {
    const img = el("img", { alt: r.prompt, width: r.width, height: r.height });
    figure.append(img);
    loadImage(img, job);
  } else {
    figure.append(el("p", { class: "muted" }, "image dropped by the retention limit"));
  }
  figure.append(el("figcaption", {}, el("p", { class: "prompt" }, (yours ? "★ " : "") + r.prompt), dl));
  // Newest first.
  const gallery = $("#gallery");
  const before = [...gallery.children].find((f) => Number(f.dataset.finished) < (job.finished_at_ms || 0));
  gallery.insertBefore(figure, before || null);
  while (gallery.children.length > MAX_LISTED) {
    const old = gallery.lastElementChild;
    const url = objectUrls.get(old.dataset.jobId);
    if (url) URL.revokeObjectURL(url);
    objectUrls.delete(old.dataset.jobId);
    old.remove();
  }
}

/** An <img> cannot send a header: with a key, the image is fetched and shown from a blob. */
async function loadImage(img, job) {
  const path = `/v1/jobs/${encodeURIComponent(job.id)}/image`;
  if (!apiKey()) {
    img.src = path;
    return;
  }
  try {
    const resp = await fetch(path, { headers: { Authorization: "Bearer " + apiKey() } });
    if (!resp.ok) return;
    const url = URL.createObjectURL(await resp.blob());
    objectUrls.set(job.id, url);
    img.src = url;
  } catch (_) {
    // The card stays without its image.
  }
}

async function pollGallery() {
  try {
    const r = await api("GET", `/v1/jobs?state=succeeded&limit=${MAX_LISTED}`);
    if (r.ok) for (const job of r.body.jobs) addToGallery(job);
  } catch (_) {
    // Next time.
  }
  setTimeout(pollGallery, GALLERY_POLL_MS);
}

// ---- Start ----

/** After a key change: forget what was shown and load it all again. */
function restart() {
  for (const t of trackers.values()) t.close();
  trackers.clear();
  for (const url of objectUrls.values()) URL.revokeObjectURL(url);
  objectUrls.clear();
  $("#jobs").replaceChildren();
  $("#gallery").replaceChildren();
  $("#jobs-empty").hidden = false;
  loadMine();
}

document.addEventListener("DOMContentLoaded", () => {
  setupKey();
  $("#submit-form").addEventListener("submit", submit);
  for (const name of ["width", "height"]) {
    const input = $("#f-" + name);
    input.addEventListener("input", () => {
      input.dataset.userSet = "1";
      sizeHint();
    });
  }
  $("#f-model").addEventListener("change", applyModelDefaults);
  pollCluster();
  loadMine();
  pollGallery();
});
