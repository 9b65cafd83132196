// Users and API keys (administrators): list, add, remove. An API key's secret is shown once,
// when it is created: the platform keeps only its hash. The platform's own keys (made by the
// launcher or `smarthome migrate`: the demo devices', Prometheus') are listed too, and revoked
// after a confirm step, since what uses them stops working. The section is built from an inert
// <template> for administrators only, so that nobody else's page holds its forms.

import { confirmButton, el, emptyRow, notify, pill, report } from "./dom.js";
import { onSubmit } from "./forms.js";
import { call, pages } from "./session.js";

const $ = (id) => document.getElementById(id);

function homesOf(text) {
  return text.split(",").map((h) => h.trim()).filter(Boolean);
}

function removeButton(label, aria, action) {
  const button = el("button", { type: "button", class: "danger", "aria-label": aria }, label);
  button.addEventListener("click", () => {
    button.disabled = true;
    action().catch(report).finally(() => { button.disabled = false; });
  });
  return button;
}

async function refreshUsers(self) {
  const users = await pages("/users");
  const body = $("users");
  body.replaceChildren(...users.map((user) => el("tr", { "data-user": user.username },
    el("td", { class: "mono" }, user.username),
    el("td", {}, user.role),
    el("td", { class: "mono" }, user.homes.join(", ") || (user.role === "admin" ? "every home" : "")),
    el("td", {}, user.id === self || user.username === self ? el("span", { class: "meta" }, "you")
      : removeButton("remove", `remove user ${user.username}`, async () => {
        await call("DELETE", `/users/${encodeURIComponent(user.id)}`);
        notify(`user ${user.username}: removed`, true);
        await refreshUsers(self);
      })))));
  if (!users.length) emptyRow(body, 4, "no users");
}

const PLATFORM = "platform:";  // `created_by` of the keys the platform made for itself

function revokeControl(key) {
  const revoke = async () => {
    await call("DELETE", `/api-keys/${encodeURIComponent(key.id)}`);
    notify(`API key ${key.name}: revoked`, true);
    await refreshKeys();
  };
  if (!key.created_by.startsWith(PLATFORM)) {
    return removeButton("revoke", `revoke API key ${key.name}`, revoke);
  }
  const remade = key.created_by === "platform:launcher"
    ? "smarthome up makes a new one at its next start" : "set a new one in its Secret";
  return confirmButton(`key:${key.id}`, "revoke", `revoke API key ${key.name}`,
    `revoke the platform's key ${key.name}? What uses it stops working (${remade}).`, revoke);
}

async function refreshKeys() {
  const keys = (await pages("/api-keys")).filter((key) => !key.revoked_at);
  const body = $("api-keys");
  body.replaceChildren(...keys.map((key) => el("tr", { "data-key": key.id },
    el("td", {}, key.name, " ", el("span", { class: "mono meta" }, key.id)),
    el("td", {}, key.role),
    el("td", { class: "mono" }, key.homes.join(", ")),
    el("td", { class: "meta" }, key.expires_at ? new Date(key.expires_at).toLocaleString() : "never"),
    el("td", { class: "mono", "data-field": "created-by" }, key.created_by, " ",
      key.created_by.startsWith(PLATFORM) ? pill("platform", "triggered") : ""),
    el("td", {}, revokeControl(key)))));
  if (!keys.length) emptyRow(body, 6, "no API keys");
}

function showSecret(created) {
  const box = $("key-secret");
  const hide = el("button", { type: "button" }, "I have copied it: hide");
  hide.addEventListener("click", () => { box.hidden = true; box.replaceChildren(); });
  box.replaceChildren(
    el("p", {}, `API key ${created.name}: its secret, shown this once (the platform keeps only a hash). `
      + "Send it as `Authorization: Bearer <key>`."),
    el("code", { class: "mono secret", "data-secret": "key" }, created.key), " ", hide);
  box.hidden = false;
  hide.focus();
}

/** After the sign-in: build and fill the section, for an administrator only. */
export async function startAdmin(self) {
  const section = $("admin-template").content.firstElementChild.cloneNode(true);
  document.getElementById("app").append(section);
  const users = $("user-form");
  onSubmit(users, async () => {
    const body = { username: users.elements["user-username"].value,
      password: users.elements["user-secret"].value, role: users.elements["user-role"].value,
      homes: homesOf(users.elements["user-homes"].value) };
    const created = await call("POST", "/users", body);
    users.reset();
    notify(`user ${created.username}: added`, true);
    await refreshUsers(self);
  });
  const keys = $("key-form");
  onSubmit(keys, async () => {
    const body = { name: keys.elements["key-name"].value, role: keys.elements["key-role"].value,
      homes: homesOf(keys.elements["key-homes"].value) };
    const created = await call("POST", "/api-keys", body);
    keys.reset();
    showSecret(created);
    await refreshKeys();
  });
  await Promise.all([refreshUsers(self), refreshKeys()]);
}
