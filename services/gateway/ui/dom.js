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
