// Devices' registry: register one (its bus credentials shown once), approve or reject one that
// said hello unregistered, decommission one. The table itself is drawn by app.js.

import { el, notify, report } from "./dom.js";
import { onSubmit, options } from "./forms.js";
import { onLocations } from "./locations.js";
import { call } from "./session.js";

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

/** After the sign-in: the register form for those who may manage devices. */
export function startDevices(manage, refresh) {
  canManage = manage;
  changed = refresh;
  const details = document.getElementById("device-register");
  details.hidden = !manage;
  if (!manage) return;
  const form = document.getElementById("device-form");
  onSubmit(form, () => register(form));
  onLocations((locations) => {
    const select = document.getElementById("device-location");
    options(select, [["", "— none —"], ...locations.map((l) => [l.path, l.path])], select.value);
  });
}
