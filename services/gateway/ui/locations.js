// Locations as a tree (home → floor → room), and a form to add one under another.

import { el } from "./dom.js";
import { onSubmit, options } from "./forms.js";
import { call, pages } from "./session.js";

const listeners = [];
let latest = null;

/** Call `listener(locations)` now (when known) and after every change. */
export function onLocations(listener) {
  listeners.push(listener);
  if (latest) listener(latest);
}

// Nested lists, not an ARIA tree: a reader walks them as they are, with no keys to learn.
function node(location, children) {
  const item = el("li", { "data-location": location.id, "data-path": location.path },
    el("span", { class: "name" }, location.name), " ",
    el("span", { class: "meta" }, `${location.kind} · `),
    el("span", { class: "mono meta" }, location.path));
  const kids = children.get(location.id) ?? [];
  if (kids.length) item.append(el("ul", {}, ...kids.map((kid) => node(kid, children))));
  return item;
}

/** Redraw the tree (and what offers locations: the forms' selects). */
export async function refreshLocations() {
  const locations = await pages("/locations");
  latest = locations;
  const children = new Map();
  const ids = new Set(locations.map((l) => l.id));
  const roots = [];
  for (const location of locations) {
    if (location.parent_id && ids.has(location.parent_id)) {
      if (!children.has(location.parent_id)) children.set(location.parent_id, []);
      children.get(location.parent_id).push(location);
    } else {
      roots.push(location);
    }
  }
  const tree = document.getElementById("locations");
  tree.replaceChildren(...roots.map((root) => node(root, children)));
  if (!roots.length) tree.replaceChildren(el("li", { class: "empty" }, "no locations defined"));
  for (const listener of listeners) listener(locations);
}

function parentChanged() {
  // A home goes at the top; under a home, a floor or a room; on a floor, a room.
  const parent = latest?.find((l) => l.id === document.getElementById("location-parent").value);
  const kind = document.getElementById("location-kind");
  const allowed = !parent ? ["home"] : parent.kind === "home" ? ["room", "floor"] : ["room"];
  if (!allowed.includes(kind.value)) kind.value = allowed[0];
}

async function add(form) {
  const body = { name: form.elements["location-name"].value, kind: form.elements["location-kind"].value };
  const parent = form.elements["location-parent"].value;
  const id = form.elements["location-id"].value.trim();
  if (parent) body.parent_id = parent;
  if (id) body.id = id;
  const created = await call("POST", "/locations", body);
  form.elements["location-name"].value = "";
  form.elements["location-id"].value = "";
  await refreshLocations();
  document.querySelector(`#locations [data-location="${CSS.escape(created.id)}"]`)
    ?.scrollIntoView({ block: "nearest" });
}

/** After the sign-in: the tree, and the add form for those who may manage locations. */
export function startLocations(manage) {
  document.getElementById("location-add").hidden = !manage;
  if (manage) {
    const form = document.getElementById("location-form");
    onSubmit(form, () => add(form));
    const parent = document.getElementById("location-parent");
    parent.addEventListener("change", parentChanged);
    onLocations((locations) => {
      const home = locations.find((l) => l.kind === "home")?.id ?? "";
      options(parent, [["", "— nothing (a new home) —"],
        ...locations.filter((l) => l.kind !== "room").map((l) => [l.id, `${l.path} (${l.kind})`])],
      parent.options.length ? parent.value : home);
      parentChanged();
    });
  }
  return refreshLocations();
}
