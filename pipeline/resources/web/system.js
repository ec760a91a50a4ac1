// System panel: the stage table (GET /api/status every 1.5 s), 15-minute charts drawn as inline SVG from the
// polls kept in this tab, active alerts (GET /api/alerts) and GPU use (GET /api/gpu).
import { api, banner, el, num, Poller } from "./app.js";

const POLL_MS = 1500;
const WINDOW_MS = 15 * 60 * 1000;
const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
const METRICS = [
  ["rate_fps", "rate", "items/s"],
  ["latency_p99_ms", "p99 latency", "ms"],
  ["queue_depth", "queue depth", "items"],
  ["cpu_percent", "CPU", "% of a core"],
  ["rss_mb", "memory (RSS)", "MiB"],
];
const SVG = "http://www.w3.org/2000/svg";

const samples = []; // {t: ms, stages: {name: {metric: value}}}
const stageOrder = [];
let polls = 0;
let visible = false;

function colour(stage) {
  if (!stageOrder.includes(stage)) stageOrder.push(stage);
  return COLOURS[stageOrder.indexOf(stage) % COLOURS.length];
}

function fmtUptime(s) {
  if (s < 120) return `${s.toFixed(1)} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function renderTable(doc) {
  const table = document.getElementById("status-table");
  const rows = doc.stages.map((s) => el("tr", { dataset: { stage: s.stage } },
    el("td", {}, el("span", { class: "swatch", style: `color:${colour(s.stage)}` }, "■ "), s.stage),
    el("td", { class: `state-${s.state}` }, s.state),
    el("td", { class: "num" }, String(s.processes)),
    el("td", { class: "num" }, num(s.rate_fps)),
    el("td", { class: "num" }, String(s.queue_depth)),
    el("td", { class: "num", title: Object.entries(s.drops).map(([k, v]) => `${k}: ${v}`).join(", ") }, String(s.dropped)),
    el("td", { class: "num" }, num(s.latency_p50_ms)),
    el("td", { class: "num" }, num(s.latency_p99_ms)),
    el("td", { class: "num" }, num(s.cpu_percent, 0)),
    el("td", { class: "num" }, num(s.rss_mb, 0)),
    el("td", { class: "num" }, String(s.restarts)),
    el("td", { class: "wrap error small" }, s.last_error || "")));
  table.tBodies[0].replaceChildren(...rows);
  polls += 1;
  table.dataset.polls = String(polls);
  document.getElementById("status-caption").textContent =
    `run ${doc.run_id} · up ${fmtUptime(doc.uptime_s)} · updated ${new Date().toLocaleTimeString()}`;
  document.getElementById("run-info").textContent = `run ${doc.run_id} · up ${fmtUptime(doc.uptime_s)}`;
}

function keep(doc) {
  const now = Date.now();
  const stages = {};
  for (const s of doc.stages) {
    stages[s.stage] = Object.fromEntries(METRICS.map(([key]) => [key, s[key]]));
  }
  samples.push({ t: now, stages });
  while (samples.length && samples[0].t < now - WINDOW_MS) samples.shift();
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((m) => m >= v);
}

function span(ms) {
  return ms >= 60000 ? `−${+(ms / 60000).toFixed(1)} min` : `−${Math.round(ms / 1000)} s`;
}

/** One chart: a polyline per stage of ``metric`` over the last 15 minutes (or since the page opened, at least
 * one minute), in a 400 x 150 viewBox. */
function chart(metric, title, unit) {
  const W = 400, H = 150, L = 40, R = 6, T = 8, B = 18;
  const now = Date.now();
  const win = Math.min(WINDOW_MS, Math.max(60000, samples.length ? now - samples[0].t : 0));
  const stages = [...new Set(samples.flatMap((s) => Object.keys(s.stages)))];
  const top = niceMax(Math.max(0, ...samples.flatMap((s) => Object.values(s.stages).map((v) => v[metric] || 0))));
  const x = (t) => L + ((t - (now - win)) / win) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
    "aria-label": `${title} per stage, last ${span(win).slice(1)}` });
  for (const f of [0, 0.5, 1]) {
    root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(top * f), y2: y(top * f) }));
    root.append(svg("text", { x: L - 4, y: y(top * f) + 3, "text-anchor": "end" }, num(top * f, top * f < 10 && f ? 1 : 0)));
  }
  root.append(svg("text", { x: L, y: H - 4 }, span(win)));
  root.append(svg("text", { x: (L + W) / 2, y: H - 4, "text-anchor": "middle" }, span(win / 2)));
  root.append(svg("text", { x: W - R, y: H - 4, "text-anchor": "end" }, "now"));
  for (const stage of stages) {
    const pts = samples.filter((s) => s.stages[stage] && typeof s.stages[stage][metric] === "number")
      .map((s) => `${x(s.t).toFixed(1)},${y(s.stages[stage][metric]).toFixed(1)}`);
    if (pts.length) root.append(svg("polyline", { points: pts.join(" "), stroke: colour(stage) }));
  }
  return el("div", { class: "chart", dataset: { metric } }, el("h3", {}, `${title} `, el("span", { class: "muted" }, `(${unit})`)), root);
}

function renderCharts() {
  if (!visible) return;
  document.getElementById("charts").replaceChildren(...METRICS.map(([m, title, unit]) => chart(m, title, unit)));
  const names = [...new Set(samples.flatMap((s) => Object.keys(s.stages)))];
  document.getElementById("legend").replaceChildren(...names.map((n) => el("span", { style: `--c:${colour(n)}` }, n)));
}

async function pollStatus() {
  try {
    const doc = await api("/api/status");
    banner("");
    renderTable(doc);
    keep(doc);
    renderCharts();
  } catch (err) {
    banner(err.status === 503 ? `No pipeline status: ${err.message}` : `Status failed: ${err.message}`, err.status !== 503);
    document.getElementById("run-info").textContent = "no pipeline";
  }
}

async function pollAlerts() {
  const list = document.getElementById("alerts");
  try {
    const doc = await api("/api/alerts");
    list.replaceChildren(...(doc.alerts.length
      ? doc.alerts.map((a) => el("li", { class: "alert" }, `${a.alert.replace("_", " ")} on ${a.stage}`))
      : [el("li", { class: "okay" }, "no active alerts")]),
    el("li", { class: "muted small" }, `thresholds: rate < ${doc.min_rate_fps}/s, backlog > ${doc.backlog_frames}, ` +
      `RSS > ${doc.max_rss_mb} MiB`));
  } catch (err) {
    list.replaceChildren(el("li", { class: "muted" }, err.message));
  }
}

async function pollGpu() {
  const box = document.getElementById("gpu");
  try {
    const doc = await api("/api/gpu");
    if (!doc.available) {
      box.replaceChildren(el("span", { class: "muted" }, "no GPU"), el("div", { class: "small muted" }, doc.reason || ""));
      return;
    }
    box.replaceChildren(...doc.gpus.map((g) => el("div", { class: "small" },
      el("strong", {}, `GPU ${g.index} ${g.name}`), el("br"),
      `use ${num(g.utilization_percent, 0)} % · memory ${num(g.memory_used_mb, 0)} / ${num(g.memory_total_mb, 0)} MiB`,
      g.temperature_c !== null ? ` · ${num(g.temperature_c, 0)} °C` : "")));
  } catch (err) {
    box.textContent = err.message;
  }
}

const statusPoller = new Poller(pollStatus, POLL_MS);
const alertPoller = new Poller(pollAlerts, 3000);
const gpuPoller = new Poller(pollGpu, 5000);

export function startBackground() { statusPoller.start(); }

export const panel = {
  show() { visible = true; renderCharts(); alertPoller.start(); gpuPoller.start(); },
  hide() { visible = false; alertPoller.stop(); gpuPoller.stop(); },
};
