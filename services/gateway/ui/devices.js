// Devices' registry: register one (its bus credentials shown once), approve or reject one that
// said hello unregistered, edit one (what PATCH changes: name, kind, location, report
// intervals, metadata), decommission one. The table itself is drawn by app.js.

import { el, notify, report } from "./dom.js";
import { clearErrors, onSubmit, options } from "./forms.js";
import { onLocations } from "./locations.js";
import { Refused, call } from "./session.js";

let canManage = false;
let changed = async () => {};  // redraws the devices table

function patchLifecycle(device, lifecycle, done) {
  return call("PATCH", `/devices/${encodeURIComponent(device.id)}`, { lifecycle })
    .then(() => { notify(`${device.id}: ${done}`, true); return changed(); });
}

function lifecycleButton(device, label, lifecycle, done, danger = false) {
  const button = el("button", { type: "button", "data-lifecycle": lifecycle,
    "aria-label": `${label} ${device.id}`, ...(danger ? { class: "danger" } : {}) }, label);
  button.addEventListener("click", () => {
    button.disabled = true;
    patchLifecycle(device, lifecycle, done).catch(report).finally(() => { button.disabled = false; });
  });
  return button;
}

/** Approve / reject a pending device; decommission any other that is not already. */
export function lifecycleControls(device) {
  if (!canManage) return [];
  if (device.lifecycle === "pending") {
    return [lifecycleButton(device, "approve", "active", "approved"),
      lifecycleButton(device, "reject", "rejected", "rejected")];
  }
  if (device.lifecycle === "decommissioned") return [];
  return [lifecycleButton(device, "decommission", "decommissioned", "decommissioned", true)];
}

/** The ids the rule editor offers (a datalist). */
export function knownDevices(devices) {
  document.getElementById("device-ids").replaceChildren(
    ...devices.map((d) => el("option", { value: d.id }, d.name)));
}

function showCredentials(device) {
  const box = document.getElementById("device-credentials");
  const credentials = device.credentials;
  const hide = el("button", { type: "button" }, "I have copied them: hide");
  hide.addEventListener("click", () => { box.hidden = true; box.replaceChildren(); });
  box.replaceChildren(
    el("p", {}, `${device.id} is registered. `, credentials
      ? "Its bus credentials, shown this once (the platform keeps only a hash):"
      : "It speaks through its bridge: no credentials of its own."),
    credentials
      ? el("dl", { class: "secret" },
          ...Object.entries(credentials).flatMap(([key, value]) => [
            el("dt", {}, key),
            el("dd", { class: "mono", "data-secret": key }, typeof value === "string" ? value : JSON.stringify(value))]))
      : "",
    hide);
  box.hidden = false;
  hide.focus();
}

async function register(form) {
  const body = { name: form.elements["device-name"].value, kind: form.elements["device-kind"].value.trim() };
  const id = form.elements["device-id"].value.trim();
  const location = form.elements["device-location"].value;
  if (id) body.id = id;
  if (location) body.location = location;
  const device = await call("POST", "/devices", body);
  form.reset();
  showCredentials(device);
  notify(`${device.id}: registered`, true);
  await changed();
}

// --- editing one ------------------------------------------------------------------------------

let editing = null;  // the device being edited, as listed when its edit button was pressed
const $ = (id) => document.getElementById(id);

function jsonText(value) {
  return value && Object.keys(value).length ? JSON.stringify(value) : "";
}

/** The edit button of a device's row: opens the edit form on it. */
export function editControl(device) {
  const button = el("button", { type: "button", "data-edit-device": device.id,
    "aria-label": `edit device ${device.id}` }, "edit");
  button.addEventListener("click", () => openEditor(device));
  return button;
}

function openEditor(device) {
  editing = device;
  const form = $("device-edit");
  clearErrors(form);
  $("device-edit-title").textContent = `edit device ${device.id}`;
  $("edit-name").value = device.name;
  $("edit-kind").value = device.kind;
  const where = $("edit-location");
  if (device.location && ![...where.options].some((o) => o.value === device.location)) {
    where.append(el("option", { value: device.location }, device.location));  // not (yet) defined
  }
  where.value = device.location ?? "";
  $("edit-intervals").value = jsonText(device.report_intervals);
  $("edit-metadata").value = jsonText(device.metadata);
  form.hidden = false;
  form.scrollIntoView({ block: "nearest" });
  $("edit-name").focus();
}

function closeEditor() {
  const id = editing?.id;
  editing = null;
  $("device-edit").hidden = true;
  if (id) document.querySelector(`button[data-edit-device="${CSS.escape(id)}"]`)?.focus();
}

/** A JSON object typed into a field, or a refusal naming that field. */
function objectIn(id, field) {
  const text = $(id).value.trim();
  if (!text) return {};
  let value;
  try { value = JSON.parse(text); } catch (error) {
    throw fieldRefusal(field, `not JSON: ${error.message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw fieldRefusal(field, "a JSON object ({...}) is expected");
  }
  return value;
}

function fieldRefusal(field, message) {
  return new Refused(`${field}: ${message}`, { detail: "not sent", errors: [{ field, message }] });
}

async function save() {
  const body = { name: $("edit-name").value, kind: $("edit-kind").value.trim(),
    location: $("edit-location").value || null,
    report_intervals: objectIn("edit-intervals", "$.report_intervals"),
    metadata: objectIn("edit-metadata", "$.metadata") };
  const device = await call("PATCH", `/devices/${encodeURIComponent(editing.id)}`, body);
  notify(`${device.id}: saved`, true);
  closeEditor();
  await changed();
}

/** After the sign-in: the register form for those who may manage devices. */
export function startDevices(manage, refresh) {
  canManage = manage;
  changed = refresh;
  const details = document.getElementById("device-register");
  details.hidden = !manage;
  if (!manage) return;
  const form = document.getElementById("device-form");
  onSubmit(form, () => register(form));
  onSubmit($("device-edit"), save);
  $("device-edit-cancel").addEventListener("click", closeEditor);
  $("device-edit").addEventListener("keydown", (event) => { if (event.key === "Escape") closeEditor(); });
  onLocations((locations) => {
    for (const id of ["device-location", "edit-location"]) {
      const select = document.getElementById(id);
      options(select, [["", "— none —"], ...locations.map((l) => [l.path, l.path])], select.value);
    }
  });
}
