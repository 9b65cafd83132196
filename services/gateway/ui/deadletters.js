// Dead letters (administrators): what the workers gave up on, each with a Redrive button that
// sends it back to the subject it was on. A refused redrive keeps its row, with the API's
// reason in place, until dismissed.

import { el, emptyRow, notify } from "./dom.js";
import { API, call, problemText, send } from "./session.js";

export const COUNTED = 1000;  // listed (and counted) at most; more shows as "1000+"
const PAGE = 200;  // the route's largest page

const refused = new Map();  // seq → { letter, text }: a refusal stays shown until dismissed

/** The dead letters, oldest first, up to COUNTED: { items, more }. */
export async function deadLetters() {
  const items = [];
  let cursor = null;
  do {
    const page = await call("GET", `/deadletters?limit=${PAGE}` +
      (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < COUNTED);
  return { items: items.slice(0, COUNTED), more: cursor !== null || items.length > COUNTED };
}

async function redrive(letter, changed) {
  const response = await send(`${API}/deadletters/${letter.seq}/redrive`, { method: "POST" });
  if (response.ok) {
    const copy = await response.json();
    refused.delete(letter.seq);
    notify(`dead letter ${letter.seq} sent back to ${copy.subject} (${copy.stream} #${copy.new_seq})`, true);
  } else {
    refused.set(letter.seq, { letter, text: await problemText(response) });
  }
  await changed();
}

function row(letter, problem, changed) {
  const controls = [];
  if (problem === undefined || letter.listed) {
    const button = el("button", { type: "button", "data-redrive": letter.seq,
      "aria-label": `redrive dead letter ${letter.seq} to ${letter.original_subject}` }, "Redrive");
    button.addEventListener("click", () => {
      button.disabled = true;
      redrive(letter, changed).catch((error) => {
        refused.set(letter.seq, { letter, text: error.message });
        return changed();
      }).finally(() => { button.disabled = false; });
    });
    controls.push(button);
  }
  if (problem !== undefined) {
    const dismiss = el("button", { type: "button", "data-dismiss": letter.seq,
      "aria-label": `dismiss the refusal of dead letter ${letter.seq}` }, "dismiss");
    dismiss.addEventListener("click", () => { refused.delete(letter.seq); changed(); });
    controls.push(dismiss);
  }
  const preview = letter.preview + (letter.truncated ? `… (${letter.size} bytes)` : "");
  return el("tr", { "data-deadletter": letter.seq },
    el("td", { class: "mono" }, letter.seq),
    el("td", { class: "mono", title: letter.subject }, letter.original_subject),
    el("td", { "data-field": "reason" }, letter.reason),
    el("td", { class: "mono" }, letter.consumer),
    el("td", { class: "meta", title: letter.time }, new Date(letter.time).toLocaleString()),
    el("td", {}, el("code", { class: "preview" }, preview)),
    el("td", {}, ...controls,
      problem === undefined ? "" : el("p", { class: "error", role: "alert", "data-field": "problem" },
        problem)));
}

/** Draw `items` into the dead letters table; `changed` redraws the page after an action. */
export function showDeadLetters(items, changed) {
  const body = document.getElementById("deadletters");
  const listed = new Set(items.map((d) => d.seq));
  const shown = items.map((d) => ({ ...d, listed: true }));
  for (const [seq, { letter }] of refused) {
    if (!listed.has(seq)) shown.push({ ...letter, listed: false });  // gone, yet explained
  }
  shown.sort((a, b) => a.seq - b.seq);
  body.replaceChildren(...shown.map((d) => row(d, refused.get(d.seq)?.text, changed)));
  if (!shown.length) emptyRow(body, 7, "no dead letters");
}
