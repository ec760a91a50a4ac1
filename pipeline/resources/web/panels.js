// Cameras (live MJPEG view), Events (filters, snapshots, CSV), Identities (list, enroll, delete), Backups.
import { api, bytes, download, el, num, Poller, state, when, withToken } from "./app.js";

// ---------------------------------------------------------------- cameras
const cameraInfo = new Poller(refreshCameraInfo, 3000);

function streamUrl(name) { return withToken(`/api/cameras/${encodeURIComponent(name)}/stream.mjpeg`); }

function attachStream(img, name) {
  img.onerror = () => { // no frame yet (503), or the stream ended: try again a little later
    img.removeAttribute("src");
    img.dataset.retry = setTimeout(() => { if (img.isConnected && img.dataset.on === "1") img.src = streamUrl(name); }, 3000);
  };
  img.dataset.on = "1";
  img.src = streamUrl(name);
}

function stopStreams() {
  for (const img of document.querySelectorAll("#camera-grid img")) {
    img.dataset.on = "0";
    clearTimeout(Number(img.dataset.retry));
    img.removeAttribute("src"); // closes the connection
  }
}

function cameraLine(c) {
  const size = c.width ? `${c.width}×${c.height}` : "no frame";
  const age = typeof c.age_s === "number" ? ` · frame ${c.frame_index}, ${num(c.age_s)} s old` : "";
  return `${c.source_kind} source · ${c.mode} mode · ${size}${age}`;
}

async function showCameras() {
  const grid = document.getElementById("camera-grid");
  let doc;
  try { doc = await api("/api/cameras"); } catch (err) { grid.replaceChildren(el("p", { class: "error" }, err.message)); return; }
  grid.replaceChildren(...doc.cameras.map((c) => {
    const img = el("img", { alt: `live view of ${c.name}`, dataset: { camera: c.name } });
    const card = el("div", { class: "card camera", dataset: { camera: c.name } },
      el("h2", {}, c.name, el("span", { class: `small ${c.live ? "okay" : "muted"}` }, c.live ? "live" : "no frame")),
      img, el("p", { class: "small muted info" }, cameraLine(c)));
    attachStream(img, c.name);
    return card;
  }));
  cameraInfo.start();
}

async function refreshCameraInfo() {
  const doc = await api("/api/cameras");
  for (const c of doc.cameras) {
    const info = document.querySelector(`#camera-grid .card[data-camera="${CSS.escape(c.name)}"] .info`);
    if (info) info.textContent = cameraLine(c);
  }
}

// ----------------------------------------------------------------- events
let eventsCursor = null;
let eventsShown = 0;

function eventFilters() {
  const form = document.getElementById("event-filters");
  const q = new URLSearchParams();
  for (const name of ["camera", "identity", "label", "method"]) {
    const v = form.elements[name].value.trim();
    if (v) q.set(name, v);
  }
  for (const name of ["since", "until"]) {
    const v = form.elements[name].value;
    if (v) q.set(name, new Date(v).toISOString()); // local time in the form, UTC on the wire
  }
  return q;
}

function eventRow(e) {
  const snap = e.has_snapshot
    ? el("a", { href: withToken(`/api/events/${e.event_id}/snapshot.jpg`), target: "_blank" },
      el("img", { class: "thumb", loading: "lazy", alt: `snapshot of ${e.label} ${e.track_id}`,
        src: withToken(`/api/events/${e.event_id}/snapshot.jpg`) }))
    : el("span", { class: "muted small" }, "none");
  const seconds = (new Date(e.ended_at) - new Date(e.started_at)) / 1000;
  return el("tr", { dataset: { event: e.event_id } }, el("td", {}, snap), el("td", {}, when(e.started_at)),
    el("td", {}, e.camera), el("td", { class: "num" }, String(e.track_id)), el("td", {}, e.label),
    el("td", {}, e.identity ? el("strong", {}, e.identity) : el("span", { class: "muted" }, "unknown")),
    el("td", {}, e.method || "–"), el("td", { class: "num" }, e.identity ? num(e.identity_score, 2) : num(e.best_score, 2)),
    el("td", { class: "num" }, `${num(seconds)} s`), el("td", {}, e.ended ? "ended" : el("span", { class: "okay" }, "open")));
}

async function loadEvents(more = false) {
  const body = document.querySelector("#events-table tbody");
  const q = eventFilters();
  document.getElementById("events-csv").href = `/api/events?${new URLSearchParams([...q, ["format", "csv"], ["limit", "10000"]])}`;
  q.set("limit", "50");
  if (more && eventsCursor) q.set("cursor", eventsCursor);
  let doc;
  try { doc = await api(`/api/events?${q}`); } catch (err) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 10, class: "error" }, err.message)));
    return;
  }
  const rows = doc.events.map(eventRow);
  if (more) body.append(...rows); else body.replaceChildren(...rows);
  eventsShown = (more ? eventsShown : 0) + rows.length;
  if (!eventsShown) body.replaceChildren(el("tr", {}, el("td", { colspan: 10, class: "muted" }, "no events")));
  eventsCursor = doc.next;
  document.getElementById("events-more").hidden = !doc.next;
  document.getElementById("events-count").textContent = `${eventsShown} shown, newest first`;
}

async function fillCameraFilter() {
  const select = document.querySelector("#event-filters select[name=camera]");
  if (select.options.length > 1) return;
  try {
    const doc = await api("/api/cameras");
    select.append(...doc.cameras.map((c) => el("option", {}, c.name)));
  } catch (_) { /* no cameras listed: the filter stays "any" */ }
}

function setupEvents() {
  document.getElementById("event-filters").addEventListener("submit", (ev) => { ev.preventDefault(); loadEvents(); });
  document.getElementById("events-more").addEventListener("click", () => loadEvents(true));
  document.getElementById("events-csv").addEventListener("click", (ev) => {
    if (!state.token) return; // a plain link works without a token
    ev.preventDefault();
    download(ev.currentTarget.getAttribute("href"), "facepro-events.csv").catch((err) => alert(err.message));
  });
}

// ------------------------------------------------------------- identities
async function loadIdentities() {
  const body = document.querySelector("#identities-table tbody");
  let doc;
  try { doc = await api("/api/identities"); } catch (err) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 4, class: "error" }, err.message)));
    return;
  }
  body.replaceChildren(...(doc.identities.length ? doc.identities.map((i) => el("tr", { dataset: { identity: i.name } },
    el("td", {}, sampleFace(i)), el("td", {}, i.name), el("td", { class: "num" }, String(i.embeddings)),
    el("td", {}, el("button", { class: "danger", onclick: () => deleteIdentity(i.name) }, "Delete"))))
    : [el("tr", {}, el("td", { colspan: 4, class: "muted" }, "nobody enrolled yet"))]));
}

/** An identity's sample face (stored at enrollment), or "none" for identities enrolled before samples were kept. */
function sampleFace(i) {
  if (!i.face_url) return el("span", { class: "muted small", title: "enroll one more photo to add a sample" }, "none");
  return el("img", { class: "face", loading: "lazy", alt: `sample face of ${i.name}`, src: withToken(i.face_url) });
}

async function deleteIdentity(name) {
  if (!confirm(`Delete ${name} and all their face embeddings? Their events keep no name.`)) return;
  try { await api(`/api/identities/${encodeURIComponent(name)}`, { method: "DELETE" }); } catch (err) { alert(err.message); }
  loadIdentities();
}

function setupIdentities() {
  const form = document.getElementById("enroll-form");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = document.getElementById("enroll-result");
    const name = form.elements.name.value.trim();
    const data = new FormData();
    for (const f of form.elements.files.files) data.append("files", f, f.name);
    out.className = "small muted";
    out.textContent = "enrolling…";
    try {
      const doc = await api(`/api/identities/${encodeURIComponent(name)}/faces`, { method: "POST", body: data });
      out.className = "small okay";
      out.textContent = `${doc.name}: ${doc.added} photo(s) enrolled (${doc.model})`;
      form.reset();
    } catch (err) {
      out.className = "small error";
      out.textContent = err.message;
    }
    loadIdentities();
  });
}

// ---------------------------------------------------------------- backups
async function loadBackups() {
  const body = document.querySelector("#backups-table tbody");
  let doc;
  try { doc = await api("/api/backups"); } catch (err) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "error" }, err.message)));
    return;
  }
  body.replaceChildren(...(doc.backups.length ? doc.backups.map((b) => el("tr", { dataset: { backup: b.name } },
    el("td", {}, el("a", { href: `/api/backups/${b.name}`, download: b.name, onclick: (ev) => {
      if (!state.token) return;
      ev.preventDefault();
      download(`/api/backups/${b.name}`, b.name).catch((err) => alert(err.message));
    } }, b.name)),
    el("td", { class: "num" }, bytes(b.size)), el("td", {}, when(b.created_at)), el("td", {}, b.schema_revision || "–"),
    el("td", { class: "num" }, String(b.files)),
    el("td", { class: b.error ? "error wrap small" : "okay" }, b.error || "readable"),
    el("td", {}, el("button", { class: "danger", disabled: Boolean(b.error), onclick: () => restore(b.name) }, "Restore"))))
    : [el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no backups yet"))]));
}

async function restore(name) {
  if (!confirm(`Restore ${name}? The current database and face images are replaced (a copy of the database is kept).`)) return;
  const out = document.getElementById("backup-result");
  try {
    const doc = await api(`/api/backups/${name}/restore`, { method: "POST" });
    out.className = "small okay";
    out.textContent = `restored ${doc.restored}: schema ${doc.schema_revision || "?"} → ${doc.revision}, ${doc.faces} face image(s)` +
      (doc.previous ? `; previous database kept as ${doc.previous}` : "");
  } catch (err) {
    out.className = "small error";
    out.textContent = `restore refused: ${err.message}`;
  }
}

function setupBackups() {
  const button = document.getElementById("backup-create");
  button.addEventListener("click", async () => {
    const out = document.getElementById("backup-result");
    button.disabled = true;
    try {
      const doc = await api("/api/backups", { method: "POST" });
      out.className = "small okay";
      out.textContent = `created ${doc.name} (${bytes(doc.size)})`;
    } catch (err) {
      out.className = "small error";
      out.textContent = err.message;
    }
    button.disabled = false;
    loadBackups();
  });
}

setupEvents();
setupIdentities();
setupBackups();

export const panels = {
  cameras: { show: showCameras, hide() { cameraInfo.stop(); stopStreams(); } },
  events: { show() { fillCameraFilter(); loadEvents(); } },
  identities: { show: loadIdentities },
  backups: { show: loadBackups },
};
