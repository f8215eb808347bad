// The control API from the page: same origin, the HttpOnly session cookie (never visible here),
// and the session's CSRF token on every request that changes something.
let csrf = "";
let signedOut = () => {};

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export function onSignedOut(handler) { signedOut = handler; }

async function answer(r) {
  if (r.status === 204) return null;
  const data = await r.json().catch(() => ({message: r.statusText}));
  if (r.status === 401) signedOut();
  if (!r.ok) throw new ApiError(r.status, data.message || r.statusText);
  return data;
}

export async function session() {
  const data = await answer(await fetch("/console/session", {credentials: "same-origin"}));
  csrf = data.csrf || "";
  return data;
}

export async function signIn(key) {
  const data = await answer(await fetch("/console/session", {
    method: "POST", credentials: "same-origin", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({key}),
  }));
  csrf = data.csrf;
  return data;
}

export async function signOut() {
  await answer(await fetch("/console/session", {method: "DELETE", credentials: "same-origin",
                                                headers: {"X-CSRF-Token": csrf}}));
  csrf = "";
}

export async function api(method, path, body) {
  const headers = {"X-CSRF-Token": csrf};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return answer(await fetch(path, {method, headers, credentials: "same-origin",
                                   body: body === undefined ? undefined : JSON.stringify(body)}));
}
