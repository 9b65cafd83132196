// The sign-in of this tab and every call to the API made with it (why the tokens live where
// they do: see the top of app.js).
//
// A refresh token works once, and presenting a used one signs the whole sign-in out: so one
// refresh runs at a time, every call waiting on it shares it, and its new token is stored
// before anything else happens.

export const API = "/api/v1";
const REFRESH_KEY = "smarthome.refresh_token";
const SIGNED_OUT_KEY = "smarthome.signed_out_because";  // shown by the form after the reload

/** The sign-in is over (revoked, expired, or signed out): the page goes back to the form. */
export class SignedOut extends Error {}

const auth = { access: null, refreshing: null, timer: null, ended: false };

function keep(pair) {
  auth.access = pair.access_token;
  sessionStorage.setItem(REFRESH_KEY, pair.refresh_token);
  clearTimeout(auth.timer);
  // A minute early (or halfway, for a short lifetime): a call never waits for a refresh.
  const ahead = Math.max(pair.expires_in * 1000 - 60_000, pair.expires_in * 500);
  auth.timer = setTimeout(() => refresh().catch(renewLater), ahead);
}

function renewLater(error) {
  if (error instanceof SignedOut) { endSession(error.message); return; }
  console.warn("token refresh", error);  // the gateway is away: try again (a 401 would too)
  auth.timer = setTimeout(() => refresh().catch(renewLater), 10_000);
}

/** What a refused request's problem details (RFC 9457) say, with when to try again. */
export async function problemText(response) {
  const problem = (await response.json().catch(() => null)) ?? {};
  let text = problem.detail ?? problem.title ?? `HTTP ${response.status}`;
  const after = response.headers.get("retry-after");
  if (response.status === 429 && after && !text.includes(`${after} s`)) {
    text += ` (try again in ${after} s)`;
  }
  return text;
}

function refresh() {
  if (!auth.refreshing) {
    auth.refreshing = (async () => {
      const token = sessionStorage.getItem(REFRESH_KEY);
      if (!token) throw new SignedOut("signed out");
      const response = await fetch(`${API}/auth/refresh`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ refresh_token: token }),
      });
      if (response.status === 401) {
        throw new SignedOut(`signed out: ${await problemText(response)}`);
      }
      if (!response.ok) throw new Error(`refresh: ${await problemText(response)}`);
      keep(await response.json());
    })().finally(() => { auth.refreshing = null; });
  }
  return auth.refreshing;
}

/** A request with the bearer header; after a 401, once more with a renewed token. */
export async function send(url, init = {}) {
  const attempt = () => fetch(url,
    { ...init, headers: { ...init.headers, authorization: `Bearer ${auth.access}` } });
  const used = auth.access;
  let response = await attempt();
  if (response.status === 401) {
    try {
      if (auth.access === used) await refresh();  // else another call renewed it meanwhile
    } catch (error) {
      if (error instanceof SignedOut) endSession(error.message);
      throw error;
    }
    response = await attempt();
    if (response.status === 401) {
      const reason = `signed out: ${await problemText(response)}`;
      endSession(reason);
      throw new SignedOut(reason);
    }
  }
  return response;
}

/** What the API refused: `problem` is its problem details, `errors` naming the fields. */
export class Refused extends Error {
  constructor(message, problem) {
    super(message);
    this.problem = problem;
  }
}

/** A call to the API: its JSON answer, or a Refused that says what the API refused. */
export async function call(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await send(API + path, init);
  if (!response.ok) {
    const problem = await response.clone().json().catch(() => ({}));
    throw new Refused(`${method} ${path}: ${await problemText(response)}`, problem ?? {});
  }
  return response.status === 204 ? null : response.json();
}

/** Every item of a paged list. */
export async function pages(path) {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await call("GET", path + sep + "limit=500" +
      (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

/** The OAuth2 password grant: null once signed in, else the API's reason. */
export async function signIn(username, password) {
  const response = await fetch(`${API}/auth/token`, {
    method: "POST",
    body: new URLSearchParams({ username, password, grant_type: "password" }),
  });
  if (!response.ok) return problemText(response);
  keep(await response.json());
  return null;
}

/** After a reload: signs in again with the tab's refresh token; false when it has none.
 * Throws SignedOut (and forgets the token) when that sign-in has ended. */
export async function resume() {
  if (!sessionStorage.getItem(REFRESH_KEY)) return false;
  try {
    await refresh();
  } catch (error) {
    if (error instanceof SignedOut) sessionStorage.removeItem(REFRESH_KEY);
    throw error;
  }
  return true;
}

/** Why the last sign-in of this tab ended, once (the form shows it after the reload). */
export function endedBecause() {
  const reason = sessionStorage.getItem(SIGNED_OUT_KEY) ?? "";
  sessionStorage.removeItem(SIGNED_OUT_KEY);
  return reason;
}

/** Forget both tokens and reload: nothing of the session (timers, streams, what the page
 * showed) outlives it. */
export function endSession(reason) {
  if (auth.ended) return;
  auth.ended = true;
  auth.access = null;
  clearTimeout(auth.timer);
  sessionStorage.removeItem(REFRESH_KEY);
  sessionStorage.setItem(SIGNED_OUT_KEY, reason);
  location.reload();
}

/** Revoke the sign-in on the gateway, then end it here. */
export async function signOut() {
  const token = sessionStorage.getItem(REFRESH_KEY);
  try {
    if (token) await call("POST", "/auth/logout", { refresh_token: token });
  } catch (error) {
    if (!(error instanceof SignedOut)) console.warn("logout", error);
  }
  endSession("signed out");
}
