// What every view of the page builds with: elements made with textContent (never innerHTML:
// see the top of app.js), pills, and the notice line under the header.

import { SignedOut } from "./session.js";

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

export function pill(text, kind = text) {
  return el("span", { class: `pill ${kind}` }, text);
}

export function setStatus(text) {
  document.getElementById("status").textContent = text;
}

export function notify(text, ok = false) {
  const notice = document.getElementById("notice");
  notice.textContent = text;
  notice.className = `notice show${ok ? " ok" : ""}`;
}

export function report(error) {
  if (error instanceof SignedOut) return;  // the page is on its way to the sign-in form
  notify(error.message);
}

/** A table body showing one line instead of rows (loading, nothing, or why not). */
export function emptyRow(body, columns, text) {
  body.replaceChildren(el("tr", {}, el("td", { colspan: columns, class: "empty" }, text)));
}

// Which confirm steps are open, by key: a table redrawn meanwhile (every few seconds) keeps
// the question open rather than dropping it under the user's pointer.
const asking = new Set();

/** A button whose action asks first: a click puts "question [yes, label] [cancel]" in its
 * place, the yes button focused; cancel or Escape puts the button back. `key` names the thing
 * (one open question per thing, kept across redraws). */
export function confirmButton(key, label, aria, question, action) {
  const button = el("button", { type: "button", class: "danger", "aria-label": aria }, label);
  const yes = el("button", { type: "button", class: "danger", "data-confirm": key,
    "aria-label": `yes, ${aria}` }, `yes, ${label}`);
  const no = el("button", { type: "button", "aria-label": `cancel: do not ${aria}` }, "cancel");
  const ask = el("span", { class: "confirm", role: "group", "aria-label": question },
    el("span", {}, question), " ", yes, no);
  const back = () => { asking.delete(key); ask.replaceWith(button); button.focus(); };
  button.addEventListener("click", () => { asking.add(key); button.replaceWith(ask); yes.focus(); });
  no.addEventListener("click", back);
  ask.addEventListener("keydown", (event) => { if (event.key === "Escape") back(); });
  yes.addEventListener("click", () => {
    yes.disabled = true;
    Promise.resolve().then(action)
      .then(() => asking.delete(key))
      .catch((error) => { report(error); back(); })
      .finally(() => { yes.disabled = false; });
  });
  return asking.has(key) ? ask : button;
}
