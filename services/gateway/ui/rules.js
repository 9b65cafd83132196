// Rules: what each one watches and its last run; create and edit one (a form for the common
// trigger, "a device's attribute above / below / equal to a value for N seconds → command a
// device", and the JSON the API takes for everything else); enable or disable it; dry-run it
// over recorded history; list its runs; delete it (after a confirm step).

import { confirmButton, el, emptyRow, notify, pill, report } from "./dom.js";
import { clearErrors, onSubmit, showRefusal } from "./forms.js";
import { Refused, call, pages } from "./session.js";

const HOUR_MS = 3600 * 1000;
const VIEW_ONLY = ["version", "created_at", "updated_at"];  // answered, never written

let canManage = false;
let editing = null;  // the stored rule being edited (its spec), or null for a new one

function describeTrigger(trigger) {
  const where = trigger.device_id ?? (trigger.selector ? JSON.stringify(trigger.selector) : "");
  switch (trigger.type) {
    case "threshold": {
      const parts = [["above", ">"], ["below", "<"], ["equals", "="]]
        .filter(([key]) => trigger[key] !== undefined && trigger[key] !== null)
        .map(([key, sign]) => `${sign} ${trigger[key]}`);
      const held = trigger.for ? ` for ${trigger.for}s` : "";
      return `${where} ${trigger.attribute} ${parts.join(" and ")}${held}`;
    }
    case "event": return `event on ${trigger.subject}`;
    case "state": return `${where} state${trigger.to ? ` → ${trigger.to}` : ""}`;
    case "schedule": return `at ${trigger.cron}`;
    default: return trigger.type ?? "";
  }
}

function specOf(rule) {
  const spec = { ...rule };
  for (const key of VIEW_ONLY) delete spec[key];
  return spec;
}

// The last run each rule's live `fired` fact told of: shown at once. The runs the API lists are
// the recorder's record of those facts, written when it gets to them (under `smarthome up` it
// yields the CPU to the live path: on a busy machine, seconds later).
const liveRuns = new Map();

/** A fact of the live feed: a rule's run, if it is one. */
export function noteRuleFact(subject, data) {
  const ruleId = /^system\.rule\.([^.]+)\.fired$/.exec(subject)?.[1];
  if (!ruleId) return;
  try {
    const { kind, time, reason } = JSON.parse(data);
    if (kind && time) liveRuns.set(ruleId, { kind, time, reason });
  } catch { /* not a run: nothing to show */ }
}

function newer(a, b) {
  if (!a || !b) return a ?? b ?? null;
  return Date.parse(b.time) > Date.parse(a.time) ? b : a;
}

async function lastRun(ruleId) {
  const runs = await pages(`/rules/${encodeURIComponent(ruleId)}/runs`);
  return newer(runs.length ? runs[runs.length - 1] : null, liveRuns.get(ruleId));
}

function button(label, attrs, action) {
  const node = el("button", { type: "button", ...attrs }, label);
  node.addEventListener("click", () => action().catch(report));
  return node;
}

/** Redraw the rules table. */
export async function refreshRules() {
  const rules = await pages("/rules");
  const last = await Promise.all(rules.map((r) => lastRun(r.id).catch(() => null)));
  const body = document.getElementById("rules");
  body.replaceChildren(...rules.map((rule, i) => {
    const run = last[i];
    const controls = [];
    if (canManage) {
      controls.push(
        button(rule.enabled ? "disable" : "enable", { "data-toggle": rule.id,
          "aria-label": `${rule.enabled ? "disable" : "enable"} rule ${rule.name}` },
        () => setEnabled(rule, !rule.enabled)),
        button("edit", { "data-edit": rule.id, "aria-label": `edit rule ${rule.name}` },
          async () => edit(await call("GET", `/rules/${encodeURIComponent(rule.id)}`))),
        confirmButton(`rule:${rule.id}`, "delete", `delete rule ${rule.name}`,
          `delete rule ${rule.name}? It stops at once.`, () => remove(rule)));
    }
    controls.push(
      button("dry run", { "data-test": rule.id, "aria-label": `dry-run rule ${rule.name}` },
        () => dryRun(rule)),
      button("runs", { "data-runs": rule.id, "aria-label": `runs of rule ${rule.name}` },
        () => showRuns(rule)));
    return el("tr", { "data-rule": rule.id },
      el("td", {}, rule.name, " ", rule.enabled ? "" : pill("disabled")),
      el("td", { class: "mono" }, describeTrigger(rule.trigger)),
      el("td", { "data-field": "last-run" }, run
        ? el("span", { title: run.reason }, pill(run.kind, run.kind === "fired" ? "triggered" : run.kind),
            " ", el("span", { class: "meta" }, new Date(run.time).toLocaleTimeString()))
        : el("span", { class: "meta" }, "never")),
      el("td", {}, ...controls));
  }));
  if (!rules.length) emptyRow(body, 4, "no rules");
}

async function setEnabled(rule, enabled) {
  await call("PUT", `/rules/${encodeURIComponent(rule.id)}`, { ...specOf(rule), enabled });
  notify(`rule ${rule.name}: ${enabled ? "enabled" : "disabled"}`, true);
  await refreshRules();
}

async function remove(rule) {
  await call("DELETE", `/rules/${encodeURIComponent(rule.id)}`);
  notify(`rule ${rule.name}: deleted`, true);
  if (editing?.id === rule.id) closeEditor();
  await refreshRules();
}

let queued = false;
/** A refresh soon, however many facts ask for one meanwhile. */
export function queueRulesRefresh() {
  if (queued) return;
  queued = true;
  setTimeout(() => { queued = false; refreshRules().catch(console.warn); }, 250);
}

// --- the editor ---------------------------------------------------------------------------

const COMPARISONS = ["above", "below", "equals"];
const $ = (id) => document.getElementById(id);

/** Whether the form can show this rule without losing anything of it. */
function fitsTheForm(spec) {
  const t = spec.trigger ?? {};
  const set = COMPARISONS.filter((key) => t[key] !== undefined && t[key] !== null);
  const actions = spec.actions ?? [];
  return t.type === "threshold" && t.device_id && !t.selector && !t.between && !t.hysteresis
    && set.length === 1 && actions.length === 1 && actions[0].type === "command"
    && !(spec.conditions ?? []).length;
}

function valueOf(text) {  // an `equals` value: a number, true/false, or text
  if (text.trim() === "") return undefined;
  try { return JSON.parse(text); } catch { return text; }
}

function fieldRefusal(field, message) {
  return new Refused(`${field}: ${message}`, { detail: "not sent", errors: [{ field, message }] });
}

/** The rule the form describes, on top of the one being edited. */
function specFromForm() {
  const base = editing ?? {};
  const comparison = $("rule-comparison").value;
  const trigger = { ...(base.trigger ?? {}), type: "threshold",
    device_id: $("rule-trigger-device").value.trim(), attribute: $("rule-attribute").value.trim() };
  for (const key of COMPARISONS) delete trigger[key];
  const raw = $("rule-value").value;
  if (raw.trim() !== "") trigger[comparison] = comparison === "equals" ? valueOf(raw) : Number(raw);
  delete trigger.for;
  if ($("rule-for").value !== "") trigger.for = $("rule-for").valueAsNumber;
  let params = {};
  if ($("rule-params").value.trim()) {
    try { params = JSON.parse($("rule-params").value); } catch (error) {
      throw fieldRefusal("$.actions[0].params", `not JSON: ${error.message}`);
    }
  }
  const action = { ...(base.actions?.[0] ?? {}), type: "command",
    device_id: $("rule-action-device").value.trim(), action: $("rule-action").value.trim(), params };
  return { ...base, name: $("rule-name").value, trigger, actions: [action],
    enabled: $("rule-enabled").checked };
}

function fillForm(spec) {
  const t = spec.trigger ?? {};
  const comparison = COMPARISONS.find((key) => t[key] !== undefined && t[key] !== null) ?? "above";
  const action = spec.actions?.[0] ?? {};
  $("rule-name").value = spec.name ?? "";
  $("rule-trigger-device").value = t.device_id ?? "";
  $("rule-attribute").value = t.attribute ?? "";
  $("rule-comparison").value = comparison;
  $("rule-value").value = t[comparison] === undefined || t[comparison] === null
    ? "" : (typeof t[comparison] === "string" ? t[comparison] : JSON.stringify(t[comparison]));
  $("rule-for").value = t.for ?? "";
  $("rule-action-device").value = action.device_id ?? "";
  $("rule-action").value = action.action ?? "";
  $("rule-params").value = action.params && Object.keys(action.params).length
    ? JSON.stringify(action.params) : "";
  $("rule-enabled").checked = spec.enabled ?? true;
  comparisonChanged();
}

function comparisonChanged() {
  $("rule-value").dataset.field = `$.trigger.${$("rule-comparison").value}`;
  $("rule-value").type = $("rule-comparison").value === "equals" ? "text" : "number";
}

function jsonMode() {
  return $("rule-mode-json").checked;
}

function setMode(json) {
  $("rule-mode-json").checked = json;
  $("rule-mode-form").checked = !json;
  $("rule-simple").hidden = json;
  $("rule-json-box").hidden = !json;
}

/** The radio buttons: the form's rule goes into the JSON, or the JSON's into the form (when
 * it fits: else the JSON stays, and the form says why). */
function modeChanged() {
  const form = $("rule-form");
  try {
    if (jsonMode()) {
      $("rule-json").value = JSON.stringify(specFromForm(), null, 2);
      setMode(true);
    } else {
      const spec = specFromJson();
      if (!fitsTheForm(spec)) {
        setMode(true);
        throw fieldRefusal("$", "this rule needs the JSON editor (the form has one threshold " +
          "trigger on a device and one command)");
      }
      editing = { ...(editing ?? {}), ...spec };
      fillForm(spec);
      setMode(false);
    }
  } catch (error) {
    setMode(jsonMode());
    showRefusal(form, error);
  }
}

function specFromJson() {
  try {
    return JSON.parse($("rule-json").value);
  } catch (error) {
    throw fieldRefusal("$", `not JSON: ${error.message}`);
  }
}

function currentSpec() {
  return jsonMode() ? specFromJson() : specFromForm();
}

/** Open the editor on a stored rule (or an empty one when `rule` is null). */
function edit(rule) {
  editing = rule ? specOf(rule) : null;
  const details = $("rule-editor");
  $("rule-editor-title").textContent = rule ? `edit rule ${rule.name}` : "new rule";
  $("rule-save").textContent = rule ? "save changes" : "save rule";
  const spec = editing ?? { enabled: true };
  fillForm(spec);
  $("rule-json").value = JSON.stringify(spec, null, 2);
  setMode(rule !== null && !fitsTheForm(spec));
  clearErrors($("rule-form"));
  details.open = true;
  details.scrollIntoView({ block: "nearest" });
  (jsonMode() ? $("rule-json") : $("rule-name")).focus();
}

function closeEditor() {
  editing = null;
  clearErrors($("rule-form"));
  $("rule-editor").open = false;
  fillForm({ enabled: true });
  $("rule-json").value = "";
  setMode(false);
  $("rule-editor-title").textContent = "new rule";
  $("rule-save").textContent = "save rule";
  $("rule-editor").querySelector("summary").focus();
}

async function save() {
  const spec = currentSpec();
  const stored = editing?.id
    ? await call("PUT", `/rules/${encodeURIComponent(editing.id)}`, spec)
    : await call("POST", "/rules", spec);
  notify(`rule ${stored.name}: saved (version ${stored.version})`, true);
  closeEditor();
  await refreshRules();
}

// --- dry runs and runs ----------------------------------------------------------------------

function windowNow() {
  const hours = Number($("rule-window").value);
  const until = new Date();
  return { since: new Date(until - hours * HOUR_MS).toISOString(), until: until.toISOString(),
    label: $("rule-window").selectedOptions[0].textContent };
}

function detail(title, ...children) {
  const box = $("rule-detail");
  const close = el("button", { type: "button", "aria-label": "close the rule results" }, "close");
  close.addEventListener("click", () => { box.hidden = true; box.replaceChildren(); });
  const heading = el("h3", { tabindex: "-1" }, title, " ", close);
  box.replaceChildren(heading, ...children);
  box.hidden = false;
  heading.focus();
}

function wouldSend(send) {
  const what = {
    command: () => `command ${send.action} → ${send.device_id} ${JSON.stringify(send.params)}`,
    set_state: () => `mark ${send.device_id} ${send.state}`,
    notify: () => `notify (${send.severity}): ${send.message}`,
    publish: () => `publish ${send.event_type} as ${send.device_id}`,
    delay: () => `wait ${send.seconds} s`,
  }[send.type]?.() ?? send.type;
  return el("li", {}, what, send.skipped ? el("span", { class: "meta" }, ` (skipped: ${send.skipped})`) : "");
}

function showDryRun(name, label, result) {
  const firings = result.firings ?? [];
  const summary = el("p", { "data-field": "dry-run-summary" },
    `${firings.length}${result.truncated ? "+" : ""} firing${firings.length === 1 ? "" : "s"} over ` +
    `${result.evaluated_rows} history rows; nothing was sent.`);
  const list = el("ol", { class: "firings" }, ...firings.map((f) => el("li", {},
    el("span", { class: "meta" }, new Date(f.at).toLocaleString()), " ",
    el("span", { class: "mono" }, f.device_id), " ", f.reason,
    el("ul", {}, ...f.would_send.map(wouldSend)))));
  detail(`Dry run of ${name} over ${label}`, summary, list);
}

async function dryRun(rule) {
  const { since, until, label } = windowNow();
  const result = await call("POST", `/rules/${encodeURIComponent(rule.id)}/test`, { since, until });
  showDryRun(rule.name, label, result);
}

async function dryRunEditor() {
  const rule = currentSpec();
  const { since, until, label } = windowNow();
  try {
    showDryRun(rule.name ?? "the rule", label, await call("POST", "/rules/test", { rule, since, until }));
  } catch (error) {
    // The body is `{rule, since, until}`: its field paths name `$.rule...`; the form's, `$...`.
    if (error instanceof Refused && Array.isArray(error.problem.errors)) {
      error.problem.errors = error.problem.errors.map((e) =>
        ({ ...e, field: e.field?.replace(/^\$\.rule(?=$|[.[])/, "$") }));
    }
    throw error;
  }
}

async function showRuns(rule) {
  const runs = await pages(`/rules/${encodeURIComponent(rule.id)}/runs`);
  const items = runs.slice(-100).reverse().map((run) => el("li", { "data-run": run.id },
    pill(run.kind, run.kind === "fired" ? "triggered" : run.kind), " ",
    el("span", { class: "meta" }, new Date(run.time).toLocaleString()), " ",
    el("span", { class: "mono" }, run.device_id), " ", run.reason,
    run.outcomes.length
      ? el("div", { class: "mono meta" }, run.outcomes.map((o) => JSON.stringify(o)).join("  "))
      : ""));
  detail(`Runs of ${rule.name} (newest first)`, items.length
    ? el("ul", { class: "feed" }, ...items)
    : el("p", { class: "empty" }, "this rule has not run yet"));
}

/** After the sign-in: the editor for those who may manage rules. */
export function startRules(manage) {
  canManage = manage;
  $("rule-editor").hidden = !manage;
  if (!manage) return;
  $("rule-comparison").addEventListener("change", comparisonChanged);
  for (const id of ["rule-mode-form", "rule-mode-json"]) $(id).addEventListener("change", modeChanged);
  $("rule-cancel").addEventListener("click", closeEditor);
  $("rule-editor").addEventListener("toggle", () => {
    if ($("rule-editor").open && editing === null && !$("rule-name").value) $("rule-name").focus();
  });
  onSubmit($("rule-form"), (submitter) => (submitter?.value === "test" ? dryRunEditor() : save()));
}
