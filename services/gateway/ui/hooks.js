// Webhook subscriptions: list, subscribe (the signing secret shown once: the platform keeps it
// to sign with, and never answers it again), delete (after a confirm step), and the deliveries
// that needed a retry, the failed ones sent again with one button.

import { confirmButton, el, emptyRow, notify, pill, report } from "./dom.js";
import { closeDeliveries, openDeliveries } from "./deliveries.js";
import { onSubmit } from "./forms.js";
import { call, pages } from "./session.js";

const $ = (id) => document.getElementById(id);
const pathOf = (id) => `/subscriptions/${encodeURIComponent(id)}`;

function delivered(s) {
  const last = s.last_delivered_at
    ? el("span", { class: "meta" }, ` · last ${new Date(s.last_delivered_at).toLocaleString()}`) : "";
  return el("td", { "data-field": "delivered" }, s.delivered, last);
}

function row(s) {
  const deliveries = el("button", { type: "button", "data-deliveries": s.id,
    "aria-label": `deliveries of subscription ${s.id}` }, "deliveries");
  deliveries.addEventListener("click", () => showDeliveries(s).catch(report));
  return el("tr", { "data-subscription": s.id },
    el("td", { class: "mono" }, s.id, " ", s.enabled ? "" : pill("disabled")),
    el("td", { class: "mono" }, s.filter),
    el("td", { class: "mono" }, s.url),
    el("td", {}, s.mode === "batched" ? `batched (up to ${s.batch_size ?? 100})` : s.mode),
    el("td", { class: "mono" }, s.home ?? "every home"),
    delivered(s),
    el("td", {}, deliveries, confirmButton(`subscription:${s.id}`, "delete",
      `delete subscription ${s.id}`, `delete the webhook to ${s.url} and its delivery records?`,
      () => remove(s))));
}

/** Redraw the subscriptions table. */
export async function refreshSubscriptions() {
  const items = await pages("/subscriptions");
  const body = $("subscriptions");
  body.replaceChildren(...items.map(row));
  if (!items.length) emptyRow(body, 7, "no webhook subscriptions");
}

async function remove(s) {
  await call("DELETE", pathOf(s.id));
  notify(`subscription ${s.id}: deleted`, true);
  const box = $("subscription-deliveries");
  if (box.dataset.of === s.id) closeDeliveries(box);
  await refreshSubscriptions();
}

function showDeliveries(s) {
  const box = $("subscription-deliveries");
  box.dataset.of = s.id;
  return openDeliveries(box, {
    title: `deliveries of ${s.id} (${s.url})`,
    load: () => pages(`${pathOf(s.id)}/deliveries`),
    redriveAll: async () => {
      const { redelivered } = await call("POST", `${pathOf(s.id)}/redeliver`);
      notify(`subscription ${s.id}: ${redelivered} failed deliver${redelivered === 1 ? "y" : "ies"} sent again`, true);
    },
  });
}

function showSecret(created) {
  const box = $("subscription-secret");
  const hide = el("button", { type: "button" }, "I have copied it: hide");
  hide.addEventListener("click", () => { box.hidden = true; box.replaceChildren(); });
  box.replaceChildren(
    el("p", {}, `Subscription ${created.id}: its signing secret, shown this once. Receivers `
      + "verify the webhook-signature header with it (Standard Webhooks)."),
    el("code", { class: "mono secret", "data-secret": "secret" }, created.secret), " ", hide);
  box.hidden = false;
  hide.focus();
}

async function subscribe(form) {
  const body = { filter: form.elements["subscription-filter"].value.trim(),
    url: form.elements["subscription-url"].value.trim(),
    mode: form.elements["subscription-mode"].value };
  const batch = form.elements["subscription-batch"].value;
  const home = form.elements["subscription-home"].value;
  if (batch !== "") body.batch_size = Number(batch);
  if (home) body.home = home;
  const created = await call("POST", "/subscriptions", body);
  form.reset();
  showSecret(created);
  notify(`subscription ${created.id}: created`, true);
  await refreshSubscriptions();
}

/** After the sign-in, for those who may manage webhooks. */
export function startSubscriptions() {
  const form = $("subscription-form");
  onSubmit(form, () => subscribe(form));
}
