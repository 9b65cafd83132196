// The "webhooks and channels" view: webhook subscriptions (hooks.js) and notification
// channels (channels.js). Built from an inert <template> for those who may manage them only
// (nobody else's page holds the forms); read when the view is shown.

import { refreshChannels, startChannels } from "./channels.js";
import { report } from "./dom.js";
import { options } from "./forms.js";
import { refreshSubscriptions, startSubscriptions } from "./hooks.js";
import { onLocations } from "./locations.js";

/** Both forms' home select: the homes the caller sees; none for a resident means its only one,
 * for an administrator every home. */
function homeSelects(admin) {
  onLocations((locations) => {
    const homes = locations.filter((l) => l.kind === "home").map((l) => [l.id, l.name]);
    for (const id of ["subscription-home", "channel-home"]) {
      const select = document.getElementById(id);
      options(select, [["", admin ? "— none: every home —" : "— my home —"], ...homes], select.value);
    }
  });
}

/** After the sign-in: build the view, for those who may manage webhooks and channels. */
export function startNotifications(admin) {
  const view = document.getElementById("notifications-template").content.firstElementChild;
  document.getElementById("status-page").before(view.cloneNode(true));
  startSubscriptions();
  startChannels();
  homeSelects(admin);
}

/** The view was shown (`followed`: from a link, so the focus goes to its title). */
export function showNotifications(followed) {
  Promise.all([refreshSubscriptions(), refreshChannels()]).catch(report);
  if (followed) document.getElementById("subscriptions-title").focus();
}
