// Notification channels (e-mail over SMTP, Slack-compatible webhooks, ntfy): list, add, delete
// (after a confirm step), and the notifications that needed a retry, a failed one sent again
// from its row. A channel's secret (SMTP password, webhook URL, ntfy token) goes to the API
// once, from a password field that is emptied after: the API answers only `secret_set`.

import { confirmButton, el, emptyRow, notify, pill, report } from "./dom.js";
import { closeDeliveries, openDeliveries } from "./deliveries.js";
import { onSubmit } from "./forms.js";
import { call, pages } from "./session.js";

const $ = (id) => document.getElementById(id);
const pathOf = (id) => `/channels/${encodeURIComponent(id)}`;

/** Where a channel sends, as far as the API says (never its secret). */
function destination(c) {
  const config = c.config;
  switch (c.kind) {
    case "email":
      return `${config.username ? `${config.username}@` : ""}${config.host}:${config.port} `
        + `(${config.security}) from ${config.from} to ${config.to.join(", ")}`;
    case "slack": return `webhook on ${config.host}`;
    case "ntfy": return `${config.server.replace(/\/+$/, "")}/${config.topic}`;
    default: return JSON.stringify(config);
  }
}

function row(c) {
  const deliveries = el("button", { type: "button", "data-deliveries": c.id,
    "aria-label": `deliveries of channel ${c.name}` }, "deliveries");
  deliveries.addEventListener("click", () => showDeliveries(c).catch(report));
  return el("tr", { "data-channel": c.id },
    el("td", {}, c.name, " ", el("span", { class: "mono meta" }, c.id), " ",
      c.enabled ? "" : pill("disabled")),
    el("td", {}, c.kind),
    el("td", { class: "mono" }, destination(c)),
    el("td", { "data-field": "secret" }, c.secret_set ? pill("set", "active") : el("span", { class: "meta" }, "none")),
    el("td", { class: "mono" }, c.home ?? "every home"),
    el("td", { "data-field": "delivered" }, c.delivered),
    el("td", {}, deliveries, confirmButton(`channel:${c.id}`, "delete", `delete channel ${c.name}`,
      `delete channel ${c.name} and its delivery records? Rules that notify it will be refused.`,
      () => remove(c))));
}

/** Redraw the channels table. */
export async function refreshChannels() {
  const items = await pages("/channels");
  const body = $("channels");
  body.replaceChildren(...items.map(row));
  if (!items.length) emptyRow(body, 7, "no notification channels");
}

async function remove(c) {
  await call("DELETE", pathOf(c.id));
  notify(`channel ${c.name}: deleted`, true);
  const box = $("channel-deliveries");
  if (box.dataset.of === c.id) closeDeliveries(box);
  await refreshChannels();
}

function showDeliveries(c) {
  const box = $("channel-deliveries");
  box.dataset.of = c.id;
  return openDeliveries(box, {
    title: `deliveries of channel ${c.name}`,
    load: () => pages(`${pathOf(c.id)}/deliveries`),
    redriveOne: async (d) => {
      await call("POST", `${pathOf(c.id)}/deliveries/${d.id}/redrive`);
      notify(`channel ${c.name}: delivery ${d.id} sent again`, true);
    },
  });
}

// --- the form: one fieldset per kind, only the chosen one shown (and checked by the API) ----

function kindChanged() {
  const kind = $("channel-kind").value;
  for (const set of $("channel-form").querySelectorAll("fieldset[data-kind]")) {
    set.hidden = set.dataset.kind !== kind;
  }
}

function text(form, id) {
  return form.elements[id].value.trim();
}

/** The `config` the form describes; empty optional fields are left out (the API's defaults). */
function configOf(form) {
  const kind = form.elements["channel-kind"].value;
  const optional = (config, key, value) => { if (value !== "") config[key] = value; return config; };
  if (kind === "slack") return { kind, url: text(form, "slack-url") };
  if (kind === "ntfy") {
    const config = { kind, topic: text(form, "ntfy-topic") };
    optional(config, "server", text(form, "ntfy-server"));
    return optional(config, "token", form.elements["ntfy-token"].value);
  }
  const config = { kind, host: text(form, "email-host"), from: text(form, "email-from"),
    to: text(form, "email-to").split(",").map((a) => a.trim()).filter(Boolean),
    security: form.elements["email-security"].value };
  const port = text(form, "email-port");
  if (port !== "") config.port = Number(port);
  optional(config, "username", text(form, "email-username"));
  return optional(config, "password", form.elements["email-password"].value);
}

async function add(form) {
  const body = { name: form.elements["channel-name"].value, config: configOf(form) };
  const home = form.elements["channel-home"].value;
  if (home) body.home = home;
  const created = await call("POST", "/channels", body);
  form.reset();  // the secret leaves the page with it
  kindChanged();
  notify(`channel ${created.name}: added${created.secret_set ? " (its secret is kept, never shown again)" : ""}`, true);
  await refreshChannels();
}

/** After the sign-in, for those who may manage notification channels. */
export function startChannels() {
  const form = $("channel-form");
  $("channel-kind").addEventListener("change", kindChanged);
  kindChanged();
  onSubmit(form, () => add(form));
}
