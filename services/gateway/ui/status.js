// The status page (administrators): is the platform healthy right now? The processes and
// their readiness (`/system/services`), each consumer's lag as its `/metrics` shows it, the
// dead letters, and the devices online / offline / stale. Also the audit log's verify button,
// and which view the address shows (home, `#status`, `#notifications`).

import { COUNTED, deadLetters, showDeadLetters } from "./deadletters.js";
import { el, emptyRow, pill, report } from "./dom.js";
import { call, pages } from "./session.js";

const EVERY_MS = 5000;

let admin = false;
let timer = null;

const STATE_KIND = { ready: "active", starting: "triggered", not_ready: "offline", gone: "offline" };

function uptime(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function tile(key, label, value, kind = "") {
  return el("div", { class: `tile ${kind}`, "data-tile": key },
    el("dt", {}, label), el("dd", {}, value));
}

function showServices(items) {
  const body = document.getElementById("services");
  body.replaceChildren(...items.map((s) => el("tr", { "data-service": s.name },
    el("td", {}, s.name),
    el("td", { class: "mono" }, s.instance),
    el("td", { "data-field": "state" }, pill(s.state, STATE_KIND[s.state] ?? "")),
    el("td", { "data-field": "why" }, s.why_not_ready ?? ""),
    el("td", { "data-field": "restarts" }, s.restarts),
    el("td", {}, uptime(s.uptime_s)),
    el("td", { class: "mono" }, s.version),
    el("td", {}, s.metrics_url
      ? el("a", { href: s.metrics_url, class: "mono", rel: "noopener",
          title: s.name === "gateway" ? "asks for an administrator's token" : "Prometheus text" },
        "metrics")
      : ""))));
  if (!items.length) emptyRow(body, 8, "no process has reported");
}

function showLag(items) {
  const rows = items.flatMap((s) => (s.consumers ?? []).map((c) => el("tr",
    { "data-consumer": c.consumer, "data-stream": c.stream },
    el("td", {}, s.name),
    el("td", { class: "mono" }, c.stream),
    el("td", { class: "mono" }, c.consumer),
    el("td", { "data-field": "pending" }, c.pending),
    el("td", { "data-field": "ack-pending" }, c.ack_pending ?? "—"))));
  const body = document.getElementById("lag");
  body.replaceChildren(...rows);
  if (!rows.length) emptyRow(body, 5, "no consumer reported");
}

// As the gauge `smarthome_devices{connection}` counts them: every registered device by its
// presence (online, offline, or stale: online with an attribute overdue).
function presenceOf(device) {
  return device.presence ?? device.connection;
}

/** Read everything the page shows, then draw it: one part failing says so in its place. */
export async function refreshStatus() {
  const [services, letters, devices] = await Promise.allSettled([
    call("GET", "/system/services"), deadLetters(), pages("/devices"),
  ]);
  const tiles = [];
  const problems = [];
  if (services.status === "fulfilled") {
    const items = services.value.items;
    const ready = items.filter((s) => s.ready).length;
    tiles.push(tile("services", "services ready", `${ready} / ${items.length}`,
      ready === items.length ? "good" : "bad"));
    const pending = items.flatMap((s) => s.consumers ?? []).reduce((n, c) => n + c.pending, 0);
    tiles.push(tile("lag", "messages pending", pending, pending ? "warn" : "good"));
    showServices(items);
    showLag(items);
  } else {
    problems.push(services.reason);
    emptyRow(document.getElementById("services"), 8, services.reason.message);
  }
  if (letters.status === "fulfilled") {
    const { items, more } = letters.value;
    tiles.push(tile("deadletters", "dead letters", more ? `${COUNTED}+` : items.length,
      items.length ? "bad" : "good"));
    showDeadLetters(items, () => refreshStatus().catch(report));
  } else {
    problems.push(letters.reason);
    emptyRow(document.getElementById("deadletters"), 7, letters.reason.message);
  }
  if (devices.status === "fulfilled") {
    const counts = { online: 0, offline: 0, stale: 0 };
    for (const d of devices.value) counts[presenceOf(d)] = (counts[presenceOf(d)] ?? 0) + 1;
    tiles.push(tile("online", "devices online", counts.online, "good"),
      tile("offline", "devices offline", counts.offline, counts.offline ? "warn" : ""),
      tile("stale", "devices stale", counts.stale, counts.stale ? "warn" : ""));
  } else {
    problems.push(devices.reason);
  }
  document.getElementById("status-tiles").replaceChildren(...tiles);
  const note = problems.map((p) => p.message).join("; ");
  document.getElementById("status-note").textContent =
    note || `as of ${new Date().toLocaleTimeString()}`;
  for (const problem of problems) report(problem);  // a SignedOut is not reported
}

function autoRefresh(on) {
  clearInterval(timer);
  timer = on ? setInterval(() => refreshStatus().catch(console.warn), EVERY_MS) : null;
}

// The views besides the home view: the address's hash → the element shown, when permitted.
const VIEWS = { "#status": "status-page", "#notifications": "notifications-page" };
const LINKS = { "": "view-home", "#status": "view-status", "#notifications": "view-notifications" };
let allowed = new Set([""]);
let notificationsShown = () => {};

/** Show the view the address names (`#status`, `#notifications`), when permitted; else the
 * home view. */
export function showView(event) {
  const view = allowed.has(location.hash) ? location.hash : "";
  document.getElementById("app").hidden = view !== "";
  for (const [hash, id] of Object.entries(VIEWS)) {
    const page = document.getElementById(id);  // absent when not permitted
    if (page) page.hidden = hash !== view;
  }
  for (const [hash, id] of Object.entries(LINKS)) {
    const link = document.getElementById(id);
    if (hash === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const status = view === "#status";
  autoRefresh(status && document.getElementById("status-auto").checked);
  if (view === "#notifications") notificationsShown(Boolean(event));
  if (!status) return;
  refreshStatus().catch(report);
  if (event) document.getElementById("status-title").focus();  // followed a link: go there
}

/** After the sign-in: the views' links, and what only an administrator is shown;
 * `onNotifications(followed)` (null: not permitted) fills the webhooks and channels view. */
export function startStatus(isAdmin, onNotifications = null) {
  admin = isAdmin;
  allowed = new Set(["", ...(admin ? ["#status"] : []), ...(onNotifications ? ["#notifications"] : [])]);
  if (onNotifications) notificationsShown = onNotifications;
  document.getElementById("views").hidden = false;
  document.getElementById("view-status").hidden = !admin;
  document.getElementById("view-notifications").hidden = !onNotifications;
  document.getElementById("audit-verify").hidden = !admin;
  window.addEventListener("hashchange", showView);
  document.getElementById("status-refresh").addEventListener("click",
    () => refreshStatus().catch(report));
  const auto = document.getElementById("status-auto");
  auto.addEventListener("change", () => autoRefresh(auto.checked));
  document.getElementById("audit-verify").addEventListener("click",
    () => verifyAudit().catch(report));
  showView();
}

/** `GET /audit/verify`: whether the audit log's hash chain holds, or its first bad row. */
export async function verifyAudit() {
  const button = document.getElementById("audit-verify");
  const out = document.getElementById("audit-verdict");
  button.disabled = true;
  out.hidden = false;
  out.className = "verdict";
  out.textContent = "verifying the chain…";
  try {
    const verdict = await call("GET", "/audit/verify");
    if (verdict.ok) {
      out.className = "verdict ok";
      out.textContent = `ok: ${verdict.checked} rows checked, none edited, inserted or missing`;
    } else {
      const bad = verdict.first_bad;
      out.className = "verdict bad";
      out.textContent = `not ok: row ${bad?.id} ${bad?.reason ?? ""} (${verdict.checked} rows checked)`;
    }
  } catch (error) {
    out.className = "verdict bad";
    out.textContent = `cannot verify: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}
