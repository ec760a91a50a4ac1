// FacePro's page: the shared helpers (API calls with the bearer token, elements, formatting) and the tabs.
// Plain ES modules, no library: every panel is a module with show()/hide() (see system.js, panels.js, jobs.js).

const TOKEN_KEY = "facepro.token";

export const state = { token: sessionStorage.getItem(TOKEN_KEY) || "" };

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

let asking = null; // one token prompt at a time

function askToken(wrong) {
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const form = document.getElementById("token-form");
  document.getElementById("token-error").textContent = wrong ? "That token was refused." : "";
  asking = new Promise((resolve) => {
    form.onsubmit = () => {
      state.token = form.elements.token.value.trim();
      sessionStorage.setItem(TOKEN_KEY, state.token);
      asking = null;
      resolve();
    };
  });
  if (!dialog.open) dialog.showModal();
  return asking;
}

/** fetch() an API path with the token; JSON answers are parsed; errors throw ApiError(status, message). */
export async function api(path, options = {}, raw = false) {
  for (let attempt = 0; ; attempt++) {
    const headers = new Headers(options.headers || {});
    if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
    let res;
    try {
      res = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new ApiError(0, `cannot reach FacePro (${err.message})`);
    }
    if (res.status === 401 && attempt < 3) {
      await askToken(Boolean(state.token));
      continue;
    }
    if (!res.ok) {
      let message = `${res.status} ${res.statusText}`;
      try { message = (await res.json()).error || message; } catch (_) { /* not JSON */ }
      throw new ApiError(res.status, message);
    }
    if (raw) return res;
    return (res.headers.get("content-type") || "").includes("json") ? res.json() : res.text();
  }
}

/** ``url`` with ``?token=`` when a token is set: only for an <img> of the live stream or a snapshot. */
export function withToken(url) {
  if (!state.token) return url;
  return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(state.token)}`;
}

/** Download an API path through fetch (so the token header goes with it) and save it as ``name``. */
export async function download(path, name) {
  const res = await api(path, {}, true);
  const url = URL.createObjectURL(await res.blob());
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** A new element: ``el("td", {class: "num"}, "12")``; attributes starting with "on" are listeners. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

export function num(v, digits = 1) {
  return typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "–";
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

export function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function banner(text, bad = false) {
  const b = document.getElementById("banner");
  b.hidden = !text;
  b.textContent = text || "";
  b.classList.toggle("bad", bad);
}

/** Calls ``fn`` now and every ``ms`` while started; never two calls at once. */
export class Poller {
  constructor(fn, ms) { this.fn = fn; this.ms = ms; this.timer = null; this.running = false; }
  start() {
    if (this.running) return;
    this.running = true;
    const tick = async () => {
      try { await this.fn(); } catch (err) { console.warn(err); }
      if (this.running) this.timer = setTimeout(tick, this.ms);
    };
    tick();
  }
  stop() { this.running = false; clearTimeout(this.timer); }
}

// ------------------------------------------------------------------ tabs
const panels = {};

export function register(name, panel) { panels[name] = panel; }

let current = null;

export function showTab(name) {
  if (!panels[name]) name = "system";
  if (current === name) return;
  if (current) {
    document.getElementById(`panel-${current}`).hidden = true;
    panels[current].hide?.();
  }
  current = name;
  document.getElementById(`panel-${name}`).hidden = false;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  panels[name].show?.();
}

async function start() {
  const [system, others, jobs] = await Promise.all([import("./system.js"), import("./panels.js"), import("./jobs.js")]);
  register("system", system.panel);
  for (const [name, panel] of Object.entries(others.panels)) register(name, panel);
  register("jobs", jobs.panel);
  system.startBackground(); // the charts keep their 15 minutes whatever tab is shown
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  showTab(location.hash.slice(1) || "system");
}

start();
