// The deliveries of a webhook subscription or a notification channel that needed a retry:
// pending while retried, delivered once a retry worked, failed (with why, in our words) when
// the retry window ended; and a way to send the failed ones again. Shown in a box under the
// table, followed every 2 s while any is pending.

import { el, pill, report } from "./dom.js";

const KIND = { pending: "triggered", delivered: "active", failed: "offline" };
const FOLLOW_MS = 2000;
const timers = new WeakMap();  // box → the timer that redraws it
const current = new WeakMap();  // box → what it shows now: a late answer for another is dropped

function when(time) {
  return time ? new Date(time).toLocaleTimeString() : "";
}

function row(d, redriveOne, redraw) {
  const controls = [];
  if (redriveOne && d.status === "failed") {
    const button = el("button", { type: "button", "data-redrive": d.id,
      "aria-label": `redrive delivery ${d.id}` }, "redrive");
    button.addEventListener("click", () => {
      button.disabled = true;
      redriveOne(d).then(() => redraw(false)).catch(report)
        .finally(() => { button.disabled = false; });
    });
    controls.push(button);
  }
  const error = d.last_error ?? "";
  return el("tr", { "data-delivery": d.id, "data-status": d.status },
    el("td", { class: "mono" }, d.id),
    el("td", { class: "mono", title: d.event_id }, d.subject),
    el("td", { "data-field": "status" }, pill(d.status, KIND[d.status] ?? "")),
    el("td", {}, d.attempts),
    el("td", { "data-field": "error" }, error),
    el("td", { class: "meta" }, when(d.last_attempt_at)),
    el("td", { class: "meta" }, d.status === "pending" ? when(d.next_attempt_at) : ""),
    el("td", {}, ...controls));
}

/** Close the box (and stop following it). */
export function closeDeliveries(box) {
  clearTimeout(timers.get(box));
  current.delete(box);
  box.hidden = true;
  box.replaceChildren();
}

/** Show `load()`'s deliveries in `box` under `title`: `redriveAll()` sends every failed one
 * again (a button above the table), `redriveOne(d)` one (a button in its row). */
export async function openDeliveries(box, { title, load, redriveAll = null, redriveOne = null }) {
  const token = {};
  current.set(box, token);
  clearTimeout(timers.get(box));
  const draw = async (focus) => {
    const items = await load();
    if (current.get(box) !== token) return;  // closed, or showing another, meanwhile
    const counts = { pending: 0, delivered: 0, failed: 0 };
    for (const d of items) counts[d.status] += 1;
    const close = el("button", { type: "button", "aria-label": `close ${title}` }, "close");
    close.addEventListener("click", () => closeDeliveries(box));
    const refresh = el("button", { type: "button", "aria-label": `refresh ${title}` }, "refresh");
    refresh.addEventListener("click", () => draw(false).catch(report));
    const heading = el("h3", { tabindex: "-1" }, title, " ", refresh, close);
    const summary = el("p", { "data-field": "deliveries-summary" },
      `${counts.failed} failed · ${counts.pending} pending · ${counts.delivered} delivered on a retry`,
      el("span", { class: "meta" }, " (a delivery that worked the first time is only counted)"));
    const parts = [heading, summary];
    if (redriveAll && counts.failed) {
      const again = el("button", { type: "button", "data-redrive-all": "" },
        `redrive the ${counts.failed} failed`);
      again.addEventListener("click", () => {
        again.disabled = true;
        redriveAll().then(() => draw(false)).catch(report).finally(() => { again.disabled = false; });
      });
      parts.push(el("p", {}, again));
    }
    parts.push(items.length
      ? el("table", { "aria-label": title },
          el("thead", {}, el("tr", {}, ...["#", "subject", "status", "attempts", "last error",
            "last attempt", "next attempt", ""].map((h) => el("th", {}, h)))),
          el("tbody", {}, ...items.map((d) => row(d, redriveOne, draw))))
      : el("p", { class: "empty" }, "no delivery has needed a retry"));
    box.replaceChildren(...parts);
    box.hidden = false;
    if (focus) heading.focus();
    clearTimeout(timers.get(box));
    timers.set(box, counts.pending
      ? setTimeout(() => draw(false).catch(report), FOLLOW_MS) : null);
  };
  await draw(true);
}
