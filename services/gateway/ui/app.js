// The web UI: no build step; modules served from /ui/ (the CSP allows no inline script).
//
// Where the credentials live, and why:
// - The access token (15 minutes) is kept in a variable (session.js) and sent as
//   `Authorization: Bearer` on every call. No cookie: the browser holds no ambient authority
//   that a foreign page could borrow, so there is no CSRF to defend against.
// - The refresh token is kept in sessionStorage: it survives a reload of this tab and is gone
//   when the tab closes (never localStorage, shared by every tab and kept for good). It renews
//   the access token a minute before it expires, and once after a 401. A script running on
//   this origin could read it: the CSP (scripts from this origin only, nothing inline) and a
//   page built with textContent, never innerHTML, keep such scripts out.
// - The live feed is read with fetch, not EventSource, so it sends the same header: no
//   credential (not even a single-use stream ticket) ever goes into a URL.
// - "sign out" revokes the sign-in (`/auth/logout`), forgets both tokens and reloads the page.

import { el, notify, pill, report, setStatus } from "./dom.js";
import {
  API, SignedOut, call, endedBecause, pages, problemText, resume, send, signIn, signOut,
} from "./session.js";
import { startAdmin } from "./admin.js";
import { editControl, knownDevices, lifecycleControls, startDevices } from "./devices.js";
import { startLocations } from "./locations.js";
import { showNotifications, startNotifications } from "./notifications.js";
import { noteRuleFact, queueRulesRefresh, refreshRules, startRules } from "./rules.js";
import { startStatus } from "./status.js";

const FEED_MAX = 100;
const AUDIT_MAX = 50;

// --- signing in and out -----------------------------------------------------------------------

let me = null;  // GET /me: who is signed in, and what its role permits

function can(permission) {
  return me !== null && me.permissions.includes(permission);
}

function showLogin(message = "") {
  document.getElementById("app").hidden = true;
  document.getElementById("status-page").hidden = true;
  const notifications = document.getElementById("notifications-page");
  if (notifications) notifications.hidden = true;
  document.getElementById("views").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message;
  setStatus("");
  document.getElementById("username").focus();
}

async function submitLogin(event) {
  event.preventDefault();
  const form = event.target;
  const button = document.getElementById("sign-in");
  const error = document.getElementById("login-error");
  button.disabled = true;  // and Enter with it: one attempt at a time
  error.textContent = "";
  try {
    const refused = await signIn(form.elements.username.value, form.elements.password.value);
    if (refused) {
      error.textContent = refused;
      form.elements.password.select();
      return;
    }
    form.elements.password.value = "";
    await start();
  } catch (failure) {
    error.textContent = `cannot sign in: ${failure.message}`;
  } finally {
    button.disabled = false;
  }
}

// `/schema` wants an administrator's token, which a plain link cannot send: fetched, then saved.
async function downloadSchema() {
  const response = await send("/schema/openapi.json");
  if (!response.ok) throw new Error(`API reference: ${await problemText(response)}`);
  const href = URL.createObjectURL(await response.blob());
  el("a", { href, download: "openapi.json" }).click();
  setTimeout(() => URL.revokeObjectURL(href));  // after the download took the blob
}

async function start() {
  me = await call("GET", "/me");
  const homes = me.homes === null ? "every home" : me.homes.join(", ") || "no home";
  const who = document.getElementById("who");
  who.textContent = `${me.id} · ${me.role} · ${homes}`;
  who.title = `signed in as ${me.actor}`;
  who.hidden = false;
  document.getElementById("sign-out").hidden = false;
  document.getElementById("api-reference").hidden = !can("administer");
  document.getElementById("login").hidden = true;
  document.getElementById("app").hidden = false;
  const hooks = can("manage_subscriptions");
  if (hooks) startNotifications(can("administer"));
  // The views: `#status` shows the status page instead, `#notifications` webhooks and channels.
  startStatus(can("administer"), hooks ? showNotifications : null);
  startRules(can("manage_rules"));
  startDevices(can("manage_devices"), refreshDevices);
  startLocations(can("manage_locations")).catch(report);
  if (can("administer")) startAdmin(me.id).catch(report);
  setStatus("connecting…");
  refreshDevices().catch((error) => setStatus(String(error.message)));
  refreshAudit().catch(console.warn);
  refreshRules().catch(console.warn);
  setInterval(() => historyOf && showHistory(historyOf, false).catch(console.warn), 5000);
  setInterval(() => refreshDevices().catch(console.warn), 5000);
  setInterval(() => refreshRules().catch(console.warn), 10000);
  setInterval(() => refreshAudit().catch(console.warn), 3000);
  follow();
}

// --- devices: the registry, each device's state, and its commands ---------------------------

const paramValues = new Map();  // what was typed into a param box survives a refresh

function commandControls(device) {
  if (!can("command")) return [];
  return (device.actions ?? []).map((action) => {
    const inputs = action.params.map((param) => {
      const key = `${device.id}/${action.name}/${param.name}`;
      const input = el("input", { class: "param", type: "number", title: param.expected,
        placeholder: param.name, "aria-label": `${action.name} ${param.name}`,
        "data-param": param.name });
      if (param.low !== null) input.min = param.low;
      if (param.high !== null) input.max = param.high;
      if (param.integer) input.step = 1;
      input.value = paramValues.get(key) ?? "";
      input.addEventListener("input", () => paramValues.set(key, input.value));
      return input;
    });
    const button = el("button", { type: "button", "data-action": action.name },
      action.name.replaceAll("_", " "));
    button.addEventListener("click", () => {
      const params = {};
      for (const input of inputs) params[input.dataset.param] = input.valueAsNumber;
      sendCommand(device.id, action.name, params).catch(report);
    });
    return el("span", {}, ...inputs, button);
  });
}

function actionControls(device) {
  if (device.lifecycle === "pending") return lifecycleControls(device);
  const controls = commandControls(device);
  if (can("manage_devices")) {
    const admin = device.enabled
      ? el("button", { type: "button", class: "danger", "data-admin": "disconnect",
          title: "detach the device from the platform (its events and commands stop)" }, "disconnect")
      : el("button", { type: "button", "data-admin": "connect" }, "connect");
    admin.addEventListener("click", () => {
      call("POST", `/devices/${encodeURIComponent(device.id)}/${admin.dataset.admin}`)
        .then(() => { notify(`${device.id}: ${admin.dataset.admin}ed`, true); return refreshDevices(); })
        .catch(report);
    });
    controls.push(admin, editControl(device), ...lifecycleControls(device));
  }
  const history = el("button", { type: "button", "data-history": device.id }, "history");
  history.addEventListener("click", () => showHistory(device.id).catch(report));
  controls.push(history);
  return controls;
}

// --- history: the last hour as recorded, and the hourly statistics of the last week -------

const HOUR_MS = 3600 * 1000;

function numericSeries(items, timeOf, valuesOf) {
  const series = new Map();  // attribute → [[time, value], ...]
  for (const item of items) {
    for (const [key, value] of Object.entries(valuesOf(item))) {
      if (typeof value !== "number") continue;
      if (!series.has(key)) series.set(key, []);
      series.get(key).push([Date.parse(timeOf(item)), value]);
    }
  }
  return series;
}

// Drawn with presentation by class (app.css), never a style attribute: the CSP refuses those.
function chart(title, points, band = null) {
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]).concat(band ? band.flatMap((b) => [b[1], b[2]]) : []);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const x = (t) => (x1 > x0 ? ((t - x0) / (x1 - x0)) * 300 : 150);
  const y = (v) => (y1 > y0 ? 95 - ((v - y0) / (y1 - y0)) * 90 : 50);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 300 100");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${title}: ${points.length} points from ${y0} to ${y1}`);
  if (band) {
    const area = document.createElementNS(svg.namespaceURI, "polygon");
    const top = band.map((b) => `${x(b[0])},${y(b[2])}`);
    const bottom = band.map((b) => `${x(b[0])},${y(b[1])}`).reverse();
    area.setAttribute("points", top.concat(bottom).join(" "));
    area.setAttribute("class", "band");
    svg.append(area);
  }
  const line = document.createElementNS(svg.namespaceURI, "polyline");
  line.setAttribute("points", points.map((p) => `${x(p[0])},${y(p[1])}`).join(" "));
  svg.append(line);
  const last = points[points.length - 1][1];
  return el("div", { class: "chart", "data-chart": title },
    el("div", {}, el("span", { class: "subject mono" }, title), " ",
      el("span", { class: "meta" }, `last ${last} · min ${y0} · max ${y1}`)),
    svg);
}

let historyOf = null;  // the device whose history is open: redrawn every few seconds

async function showHistory(deviceId, scroll = true) {
  const id = encodeURIComponent(deviceId);
  const since = new Date(Date.now() - HOUR_MS).toISOString();
  const weekAgo = new Date(Date.now() - 7 * 24 * HOUR_MS).toISOString();
  const [recent, hourly] = await Promise.all([
    call("GET", `/devices/${id}/history?limit=1000&since=${encodeURIComponent(since)}`),
    call("GET", `/devices/${id}/statistics?limit=1000&since=${encodeURIComponent(weekAgo)}`),
  ]);
  const charts = [];
  for (const [key, points] of numericSeries(recent.items, (i) => i.time, (i) => i.data)) {
    if (points.length > 1) charts.push(chart(`${key} (last hour)`, points));
  }
  const byAttribute = new Map();
  for (const s of hourly.items) {
    if (!byAttribute.has(s.attribute)) byAttribute.set(s.attribute, []);
    byAttribute.get(s.attribute).push(s);
  }
  for (const [key, rows] of byAttribute) {
    if (rows.length < 2) continue;
    const points = rows.map((r) => [Date.parse(r.hour), r.mean]);
    charts.push(chart(`${key} (hourly mean, 7 days)`, points,
      rows.map((r) => [Date.parse(r.hour), r.min, r.max])));
  }
  document.getElementById("history-device").textContent = deviceId;
  document.getElementById("history-note").textContent = charts.length
    ? `${recent.items.length} readings in the last hour${recent.next_cursor ? " (the first 1,000)" : ""}; ${hourly.items.length} hourly statistics`
    : "nothing numeric recorded in the last hour or week";
  document.getElementById("history-charts").replaceChildren(...charts);
  const section = document.getElementById("history");
  section.hidden = false;
  historyOf = deviceId;
  if (scroll) section.scrollIntoView({ behavior: "smooth", block: "nearest" });
}

async function refreshDevices() {
  const rows = await pages("/devices");
  knownDevices(rows);
  const body = document.getElementById("devices");
  body.replaceChildren(...rows.map((d) => el("tr", { "data-device": d.id },
    el("td", { class: "mono" }, d.id, " ", d.enabled ? "" : pill("disabled"),
      d.lifecycle === "active" ? "" : pill(d.lifecycle, d.lifecycle === "pending" ? "triggered" : "offline")),
    el("td", {}, d.kind),
    el("td", { class: "mono" }, d.location ?? ""),
    el("td", { "data-field": "state" }, pill(d.state)),
    el("td", { "data-field": "connection" }, pill(d.connection)),
    el("td", { class: "mono", "data-field": "attributes" }, Object.entries(d.attributes)
      .map(([key, value]) => `${key}=${JSON.stringify(value)}`).join("  ")),
    el("td", { class: "mono" }, d.version),
    el("td", {}, ...actionControls(d)),
  )));
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "empty" }, "no devices registered")));
  }
}

const FINAL = new Set(["done", "failed", "expired"]);

async function sendCommand(deviceId, action, params) {
  const path = `/devices/${encodeURIComponent(deviceId)}/commands`;
  let command = await call("POST", path, { action, params });
  const list = document.getElementById("commands");
  if (list.firstElementChild?.classList.contains("empty")) list.replaceChildren();
  const status = el("span", {}, pill(command.status));
  const detail = el("span", { class: "meta" });
  list.prepend(el("li", { "data-command": command.id },
    el("span", { class: "subject" }, action), " ", el("span", { class: "mono" }, deviceId), " ",
    status, " ", detail));
  // Followed until the device says how it went, or the command expires.
  for (let wait = 200; !FINAL.has(command.status); wait = Math.min(wait * 1.5, 2000)) {
    await new Promise((resolve) => setTimeout(resolve, wait));
    command = await call("GET", `${path}/${encodeURIComponent(command.id)}`);
    status.replaceChildren(pill(command.status, command.status === "done" ? "active" : command.status));
  }
  if (command.status !== "done") status.replaceChildren(pill(command.status, "offline"));
  detail.textContent = command.detail ?? "";
}

let refreshQueued = false;
function queueDeviceRefresh() {
  if (refreshQueued) return;
  refreshQueued = true;
  setTimeout(() => { refreshQueued = false; refreshDevices().catch(console.warn); }, 250);
}

// --- live feed: Server-Sent Events read with fetch ---------------------------------------
// Read with fetch rather than EventSource: it sends the bearer header (see the top), it
// delivers every event although each is named after its subject (EventSource delivers only
// the names it listens for), and it resumes with the Last-Event-ID header after a disconnect.

let lastEventId = null;

function showFact(id, subject, data) {
  if (/^system\.device\.[^.]+\.transition$/.test(subject)) return;  // its state fact shows it
  const feed = document.getElementById("feed");
  if (feed.firstElementChild?.classList.contains("empty")) feed.replaceChildren();
  let pretty = data;
  try { pretty = JSON.stringify(JSON.parse(data)); } catch { /* not JSON: show as is */ }
  feed.prepend(el("li", {},
    el("div", {}, el("span", { class: "subject mono" }, subject), " ",
      el("span", { class: "meta" }, `#${id} ${new Date().toLocaleTimeString()}`)),
    el("pre", { class: "mono" }, pretty)));
  while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  if (subject.startsWith("system.device.")) queueDeviceRefresh();
  if (subject.startsWith("system.rule.")) {
    noteRuleFact(subject, data);
    queueRulesRefresh();
  }
}

function dispatch(frame) {
  let id = null, event = "message";
  const data = [];
  for (const line of frame.split(/\r\n|\r|\n/)) {
    if (!line || line.startsWith(":")) continue;  // comments: heartbeats
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (id !== null) lastEventId = id;
  if (event === "error") { setStatus("live feed: server ended the stream, resuming…"); return; }
  if (data.length) showFact(id, event, data.join("\n"));
}

async function follow() {
  let delay = 500;
  for (;;) {
    try {
      const headers = lastEventId ? { "Last-Event-ID": lastEventId } : {};
      const response = await send(`${API}/events/stream?subject=${encodeURIComponent("system.>")}`,
        { headers });
      if (!response.ok) throw new Error(await problemText(response));
      setStatus("live");
      delay = 500;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        const frames = buffer.split(/\r\n\r\n|\n\n|\r\r/);
        buffer = frames.pop();
        frames.forEach(dispatch);
      }
    } catch (error) {
      if (error instanceof SignedOut) return;
      console.warn("live feed", error);
    }
    setStatus("reconnecting…");
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

// --- audit tail -----------------------------------------------------------------------------

const auditSeen = new Map();
let auditSince = new Date(Date.now() - HOUR_MS).toISOString();

function resultKind(result) {  // green for success, red for failure, grey for a fact
  if (["ok", "done", "hello"].includes(result)) return "active";
  if (/fail|expired|error|refused/.test(result)) return "offline";
  return "";
}

async function refreshAudit() {
  const page = await call("GET", `/audit?limit=1000&since=${encodeURIComponent(auditSince)}`);
  for (const entry of page.items) auditSeen.set(entry.id, entry);
  if (page.items.length) auditSince = page.items[page.items.length - 1].time;
  const newest = [...auditSeen.values()].sort((a, b) => (a.time < b.time ? 1 : -1)).slice(0, AUDIT_MAX);
  for (const key of [...auditSeen.keys()]) if (!newest.some((e) => e.id === key)) auditSeen.delete(key);
  const list = document.getElementById("audit");
  if (!newest.length) { list.replaceChildren(el("li", { class: "empty" }, "nothing in the last hour")); return; }
  list.replaceChildren(...newest.map((e) => el("li", {},
    el("div", {}, el("span", { class: "subject" }, e.action), " ",
      el("span", { class: "mono" }, e.device_id ?? ""), " ", pill(e.result, resultKind(e.result))),
    el("div", { class: "meta" }, `${new Date(e.time).toLocaleTimeString()} · ${e.actor} · ${e.correlation_id ?? ""}`))));
}

// --- the page: resume this tab's sign-in, or ask for one ---------------------------------------

document.getElementById("login-form").addEventListener("submit", submitLogin);
document.getElementById("sign-out").addEventListener("click", () => signOut());
document.getElementById("api-reference").addEventListener("click",
  () => downloadSchema().catch(report));
document.getElementById("history-close").addEventListener("click", () => {
  document.getElementById("history").hidden = true;
  historyOf = null;
});

const because = endedBecause();
setStatus("resuming the sign-in…");
try {
  if (await resume()) await start();
  else showLogin(because);
} catch (error) {
  showLogin(error instanceof SignedOut ? error.message : `cannot resume the sign-in: ${error.message}`);
}
