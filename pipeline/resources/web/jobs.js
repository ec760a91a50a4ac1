// Jobs panel, against the jobs API (pipeline/api_jobs.py): a clip is uploaded with POST /api/uploads
// (multipart field "file"; answers {upload, ...}), then queued with POST /api/jobs {"type": "analyze", "upload": id}
// (answers {id, state}); GET /api/jobs ({"jobs": [...]}), GET /api/jobs/{id} (state queued/running/done/failed/
// cancelled, progress 0-1, frames done of total, result or error), POST /api/jobs/{id}/cancel, DELETE /api/jobs/{id}
// (a finished job; its events stay). Job states live on
// the server, so a reload shows them as they are; the ids this tab created are also remembered in localStorage in
// case the list is paged. GET /api/jobs answering 404: this server has no jobs; the panel says so.
import { api, el, Poller, showTab, when } from "./app.js";

const KNOWN_KEY = "facepro.jobs";
const FINAL = new Set(["done", "failed", "cancelled"]);
const jobs = new Map(); // id -> last document
let available = null;

function known() {
  try { return JSON.parse(localStorage.getItem(KNOWN_KEY) || "[]"); } catch (_) { return []; }
}

function remember(id) {
  const ids = [id, ...known().filter((x) => x !== id)].slice(0, 50);
  localStorage.setItem(KNOWN_KEY, JSON.stringify(ids));
}

function pct(job) {
  const p = typeof job.progress === "number" ? job.progress : job.state === "done" ? 1 : 0;
  return Math.max(0, Math.min(100, Math.round(p * 100)));
}

function frames(job) {
  const done = job.frames_done ?? job.frames?.done;
  const total = job.frames_total ?? job.frames?.total;
  return done === undefined ? "–" : `${done} / ${total ?? "?"}`;
}

function outcome(job) {
  if (job.error) return el("span", { class: "error" }, job.error);
  if (job.result === undefined || job.result === null) return "";
  const text = typeof job.result === "string" ? job.result : JSON.stringify(job.result);
  return el("span", { class: "small", title: text }, text.length > 80 ? `${text.slice(0, 77)}…` : text);
}

function row(job) {
  const p = pct(job);
  const active = !FINAL.has(job.state);
  return el("tr", { dataset: { job: job.id, state: job.state } },
    el("td", { title: job.id }, String(job.id).slice(0, 8)), el("td", {}, job.type || "–"),
    el("td", { class: `state-${job.state}` }, job.state),
    el("td", {}, el("span", { class: `progress${job.state === "done" ? " done" : ""}` },
      el("span", { class: "bar" }, el("div", { style: `width:${p}%` })), el("span", { class: "pct" }, `${p} %`))),
    el("td", { class: "num" }, frames(job)), el("td", {}, when(job.created_at)), el("td", { class: "wrap" }, outcome(job)),
    el("td", { class: "actions" }, ...(active ? [el("button", { class: "danger", onclick: () => cancel(job.id) }, "Cancel")]
      : [job.state === "done" && job.type === "analyze" ? el("button", { onclick: () => openEvents(job) }, "Events") : "",
        el("button", { class: "danger", dataset: { action: "delete" }, onclick: () => remove(job) }, "Delete")])));
}

function render() {
  const list = [...jobs.values()].sort((a, b) => String(b.created_at || "").localeCompare(String(a.created_at || "")));
  document.querySelector("#jobs-table tbody").replaceChildren(...(list.length ? list.map(row)
    : [el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no jobs yet"))]));
}

async function refresh() {
  if (available === false) return;
  let doc;
  try {
    doc = await api("/api/jobs");
  } catch (err) {
    if (err.status === 404) return unavailable();
    throw err;
  }
  available = true;
  document.getElementById("jobs-unavailable").hidden = true;
  document.getElementById("jobs-body").hidden = false;
  for (const job of Array.isArray(doc) ? doc : doc.jobs || []) jobs.set(job.id, job);
  const missing = known().filter((id) => !jobs.has(id) || !FINAL.has(jobs.get(id).state));
  await Promise.all(missing.map(async (id) => {
    try { jobs.set(id, await api(`/api/jobs/${encodeURIComponent(id)}`)); } catch (err) { if (err.status === 404) jobs.delete(id); }
  }));
  render();
}

function unavailable() {
  available = false;
  poller.stop();
  const box = document.getElementById("jobs-unavailable");
  box.hidden = false;
  box.textContent = "Jobs not available: this FacePro has no analysis jobs (GET /api/jobs answered 404).";
  document.getElementById("jobs-body").hidden = true;
}

async function cancel(id) {
  try { await api(`/api/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" }); } catch (err) { alert(err.message); }
  refresh();
}

async function remove(job) {
  const events = job.type === "analyze" ? " Its events stay in the Events panel." : "";
  if (!confirm(`Delete job ${String(job.id).slice(0, 8)} (its record and files)?${events}`)) return;
  try {
    await api(`/api/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
  } catch (err) {
    if (err.status !== 404) { alert(err.message); return; }
  }
  jobs.delete(job.id);
  localStorage.setItem(KNOWN_KEY, JSON.stringify(known().filter((x) => x !== job.id)));
  render();
}

function openEvents(job) {
  const camera = job.result?.camera || job.camera;
  showTab("events");
  if (camera) {
    const form = document.getElementById("event-filters");
    const select = form.elements.camera;
    if (![...select.options].some((o) => o.value === camera)) select.append(el("option", {}, camera));
    select.value = camera;
    form.requestSubmit();
  }
}

function setup() {
  const form = document.getElementById("job-form");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = document.getElementById("job-result");
    const file = form.elements.file.files[0];
    const data = new FormData();
    data.append("file", file, file.name);
    out.className = "small muted";
    out.textContent = `uploading ${file.name}…`;
    try {
      const upload = await api("/api/uploads", { method: "POST", body: data });
      const doc = await api("/api/jobs", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ type: "analyze", upload: upload.upload }),
      });
      remember(doc.id);
      jobs.set(doc.id, { type: "analyze", created_at: new Date().toISOString(), ...doc });
      out.className = "small okay";
      out.textContent = `job ${String(doc.id).slice(0, 8)} ${doc.state}`;
      form.reset();
      render();
      poller.start();
    } catch (err) {
      out.className = "small error";
      out.textContent = err.message;
    }
  });
}

const poller = new Poller(refresh, 1000);
setup();

export const panel = {
  show() { if (available !== false) poller.start(); },
  hide() { poller.stop(); },
};
