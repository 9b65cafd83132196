// Forms that write through the API: one submission at a time, and a refusal shown where it
// belongs. Each control names the body field it fills (`data-field="$.trigger.attribute"`,
// the path the API's problem details use); an error is shown right after the control it
// names (or the nearest one: `$.actions[0].params.level` under `$.actions[0].params`), marked
// `aria-invalid` and read out as the control's description. What names no control is shown
// in the form's own error line, with its field.

import { el } from "./dom.js";
import { Refused, SignedOut } from "./session.js";

/** Remove what a former refusal showed in the form. */
export function clearErrors(form) {
  for (const old of form.querySelectorAll(".field-error")) old.remove();
  for (const control of form.querySelectorAll("[aria-invalid]")) {
    control.removeAttribute("aria-invalid");
    control.removeAttribute("aria-describedby");
  }
  const summary = form.querySelector("[data-form-error]");
  if (summary) summary.textContent = "";
}

/** The visible control a field path belongs to, or null. */
function controlFor(form, field) {
  const controls = [...form.querySelectorAll("[data-field]")]
    .filter((c) => !c.disabled && !c.closest("[hidden]"));
  const exact = controls.find((c) => c.dataset.field === field);
  if (exact) return exact;
  const within = (path, outer) => path.startsWith(outer) && /^[.[]/.test(path.slice(outer.length));
  const enclosing = controls.filter((c) => within(field, c.dataset.field))
    .sort((a, b) => b.dataset.field.length - a.dataset.field.length);
  if (enclosing.length) return enclosing[0];
  return controls.find((c) => within(c.dataset.field, field)) ?? null;
}

/** Show a refusal's field errors in place; the rest in the form's error line. */
export function showRefusal(form, error) {
  clearErrors(form);
  const problem = error instanceof Refused ? error.problem : {};
  const errors = Array.isArray(problem.errors) ? problem.errors : [];
  const unplaced = [];
  let first = null;
  for (const { field, message } of errors) {
    const control = field ? controlFor(form, field) : null;
    if (!control) { unplaced.push(field ? `${field}: ${message}` : message); continue; }
    const id = `${control.id}-error`;
    const text = `${field}: ${message}`;
    const shown = document.getElementById(id);
    if (shown) { shown.textContent += `; ${text}`; continue; }
    control.setAttribute("aria-invalid", "true");
    control.setAttribute("aria-describedby", id);
    control.after(el("span", { class: "field-error", id, "data-error-for": field }, text));
    first ??= control;
  }
  const summary = form.querySelector("[data-form-error]");
  // The detail repeats a field's message: said once, at the field, when every one is placed.
  const lead = first && !unplaced.length
    ? `refused: see the marked field${errors.length > 1 ? "s" : ""}`
    : (problem.detail ?? error.message);
  if (summary) summary.textContent = [lead, ...unplaced].join(" · ");
  (first ?? summary)?.focus?.();
}

/** On submit: run `write` (which calls the API) with the submit button disabled; a refusal is
 * shown in the form. Resolves to what `write` answered, or null when refused. */
export function onSubmit(form, write) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const buttons = form.querySelectorAll("button[type=submit]");
    for (const button of buttons) button.disabled = true;
    clearErrors(form);
    Promise.resolve()
      .then(() => write(event.submitter))
      .catch((error) => { if (!(error instanceof SignedOut)) showRefusal(form, error); })
      .finally(() => { for (const button of buttons) button.disabled = false; });
  });
}

/** A labelled control: `<label for=id>` and the control itself, in one wrapper. */
export function labelled(text, control, hint = "") {
  return el("div", { class: "control" }, el("label", { for: control.id }, text), control,
    hint ? el("span", { class: "meta" }, hint) : "");
}

/** A select of `[value, text]` options. */
export function options(select, items, selected = null) {
  select.replaceChildren(...items.map(([value, text]) => {
    const option = el("option", { value }, text);
    if (value === selected) option.selected = true;
    return option;
  }));
  return select;
}
