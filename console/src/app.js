// The console's VM list: a table kept live by the event feed (GET /v1/events, Server-Sent Events),
// the actions on each VM, and the templates and images. The VM page is in vm.js.
import {api, ApiError, onSignedOut, session, signIn, signOut} from "./api.js";
import {showVm} from "./vm.js";

const TYPES = ["created", "running", "paused", "suspended", "restored", "failed", "terminated", "moved",
               "checkpoint_created", "checkpoint_deleted", "rewound", "forked"];
const METRICS_EVERY_MS = 5000;
const POLL_EVERY_MS = 3000;  // only when the edge has no event feed

export const vms = new Map();        // id -> VM record (GET /v1/vms), updated by events
const usage = new Map();             // id -> GET /v1/vms/{id}/metrics of a running VM
const listeners = new Set();         // the VM page's handlers for live events
let feed = null, poller = null, metricsTimer = null, leaveView = () => {};

const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

export function ago(seconds) {
  if (!seconds) return "";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

const since = (seconds) => (seconds ? `${ago(seconds)} ago` : "");

export const mib = (bytes) => (bytes >= 0 ? `${(bytes / 1048576).toFixed(1)} MiB` : "");

export function onEvent(handler) { listeners.add(handler); return () => listeners.delete(handler); }

export function report(error) {
  if (error instanceof ApiError && error.status === 401) return;
  let box = $("main").querySelector(".error.action");
  if (!box) {
    box = el("p", {class: "error action"});
    $("main").prepend(box);
  }
  box.textContent = String(error.message || error);
}

async function reloadVms() {
  const list = (await api("GET", "/v1/vms")).vms;
  vms.clear();
  for (const vm of list) vms.set(vm.id, vm);
  render();
}

// A VM the table does not know yet (new, or named by the feed's backlog) reloads the list once
// per burst, rather than one GET per event.
let reloadSoon = null;
function scheduleReload() {
  clearTimeout(reloadSoon);
  reloadSoon = setTimeout(() => reloadVms().catch(report), 300);
}

function applyEvent(ev) {
  if (ev.type === "terminated") vms.delete(ev.vm);
  else if (vms.has(ev.vm)) {
    const vm = vms.get(ev.vm);
    if (ev.state) vm.state = ev.state;
    vm.last_event = ev.type;
  } else scheduleReload();
  for (const handler of listeners) handler(ev);
  render();
}

function startFeed() {
  feed = new EventSource("/v1/events");
  let opened = false;
  feed.onopen = () => { opened = true; $("feed").textContent = "live"; reloadVms().catch(report); };
  for (const type of TYPES) feed.addEventListener(type, (e) => applyEvent(JSON.parse(e.data)));
  feed.onerror = () => {
    if (feed.readyState !== EventSource.CLOSED) { $("feed").textContent = "reconnecting"; return; }
    if (!opened && !poller) {  // no feed on this edge: poll the list instead
      $("feed").textContent = "polling";
      poller = setInterval(() => reloadVms().catch(report), POLL_EVERY_MS);
    }
  };
}

async function refreshUsage() {
  for (const vm of vms.values()) {
    if (vm.state !== "running") { usage.delete(vm.id); continue; }
    try { usage.set(vm.id, await api("GET", `/v1/vms/${vm.id}/metrics`)); } catch (e) { usage.delete(vm.id); }
  }
  render();
}

export async function act(vmId, action) {
  if (action === "delete") {
    if (!confirm(`Delete ${vmId}? Its memory and disk are removed.`)) return;
    await api("DELETE", `/v1/vms/${vmId}`);
    vms.delete(vmId);
  } else if (action === "token") {
    showToken(await api("POST", `/v1/vms/${vmId}/tokens`, {}));
  } else {
    vms.set(vmId, await api("POST", `/v1/vms/${vmId}/${action}`));
  }
  render();
}

function showToken(t) {
  $("token-vm").textContent = t.vm;
  $("token-value").value = t.token;
  $("token-expiry").textContent = new Date(t.expires_at * 1000).toLocaleString();
  $("token-url").textContent = t.url;
  $("token-url").href = t.url;
  $("token-dialog").showModal();
}

function actions(vm) {
  const button = (name, label) => el("button", {"data-action": name, onclick: () => act(vm.id, name).catch(report)},
                                    label);
  const list = [];
  if (vm.state === "running" || vm.state === "paused") list.push(button("suspend", "Suspend"));
  if (vm.state === "suspended" || vm.state === "paused") list.push(button("resume", "Resume"));
  list.push(button("token", "Token"), button("delete", "Delete"));
  return el("td", {}, ...list);
}

function row(vm) {
  const u = vm.state === "running" ? usage.get(vm.id) : undefined;
  return el("tr", {"data-vm": vm.id},
    el("td", {}, el("a", {href: `#/vm/${vm.id}`}, vm.id)),
    el("td", {}, el("span", {class: `state ${vm.state}`, "data-state": vm.state}, vm.state)),
    el("td", {}, vm.template),
    el("td", {class: "num"}, ago(vm.created_at)),
    el("td", {class: "num"}, since(vm.last_activity)),
    el("td", {class: "num"}, u ? `${u.cpu_percent.toFixed(1)} %` : ""),
    el("td", {class: "num"}, u ? mib(u.memory_bytes) : ""),
    actions(vm));
}

function render() {
  const body = document.querySelector("#vm-table tbody");
  if (!body) return;
  const rows = [...vms.values()].sort((a, b) => b.created_at - a.created_at).map(row);
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", {colspan: 8, class: "muted"}, "no VMs"))]));
}

async function showList() {
  const [templates, images] = await Promise.all([api("GET", "/v1/templates"), api("GET", "/v1/images")]);
  const choice = el("select", {id: "create-template"},
                    ...templates.templates.map((t) => el("option", {value: t.name}, t.name)));
  const policy = el("input", {id: "create-policy", size: 40, placeholder: 'policy, e.g. {"idle_suspend_after": 60}'});
  const create = async () => {
    const body = {template: choice.value};
    if (policy.value.trim()) body.policy = JSON.parse(policy.value);
    const vm = await api("POST", "/v1/vms", body);
    vms.set(vm.id, vm);
    render();
  };
  const head = (...names) => el("thead", {}, el("tr", {}, ...names.map((n) => el("th", {}, n))));
  $("main").replaceChildren(
    el("h1", {}, "Virtual machines"),
    el("div", {class: "toolbar"}, "Template", choice, policy,
       el("button", {id: "create", onclick: () => create().catch(report)}, "Create VM")),
    el("table", {id: "vm-table"},
       head("VM", "state", "template", "age", "last activity", "CPU", "memory", ""), el("tbody")),
    el("h2", {}, "Templates"),
    el("table", {id: "templates"}, head("name", "image", "memory", "vCPUs", "created"),
       el("tbody", {}, ...templates.templates.map((t) => el("tr", {},
         el("td", {}, t.name), el("td", {}, t.image), el("td", {class: "num"}, `${t.memory_mb} MiB`),
         el("td", {class: "num"}, t.vcpus), el("td", {class: "num"}, since(t.created_at)))))),
    el("h2", {}, "Images"),
    el("table", {id: "images"}, head("name", "kind", "source", "port", "created"),
       el("tbody", {}, ...images.images.map((i) => el("tr", {},
         el("td", {}, i.name), el("td", {}, i.kind), el("td", {}, i.source), el("td", {class: "num"}, i.app_port),
         el("td", {class: "num"}, since(i.created_at)))))),
  );
  render();
  refreshUsage().catch(report);
  metricsTimer = setInterval(() => refreshUsage().catch(report), METRICS_EVERY_MS);
  return () => clearInterval(metricsTimer);
}

async function route() {
  leaveView();
  leaveView = () => {};
  const match = location.hash.match(/^#\/vm\/([A-Za-z0-9_-]+)$/);
  try {
    leaveView = match ? await showVm(match[1]) : await showList();
  } catch (e) { report(e); }
}

function showSignIn(message = "") {
  leaveView();
  leaveView = () => {};
  feed?.close();
  clearInterval(poller);
  clearInterval(metricsTimer);
  feed = poller = null;
  $("main").replaceChildren();
  $("sign-out").hidden = true;
  $("feed").textContent = "";
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message;
  $("key").focus();
}

async function start() {
  $("sign-in").hidden = true;
  $("sign-out").hidden = false;
  await reloadVms();
  startFeed();
  await route();
}

onSignedOut(() => showSignIn("signed out: sign in again"));
$("sign-in").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    await signIn($("key").value);
    $("key").value = "";
    await start();
  } catch (err) { $("sign-in-error").textContent = err.message; }
});
$("sign-out").addEventListener("click", () => signOut().finally(() => showSignIn()));
$("token-copy").addEventListener("click", async () => {
  $("token-value").select();
  await navigator.clipboard.writeText($("token-value").value).catch(() => document.execCommand("copy"));
  $("token-copy").textContent = "Copied";
  setTimeout(() => { $("token-copy").textContent = "Copy"; }, 1500);
});
window.addEventListener("hashchange", () => route());
// Interactive: the sign-in form or the VM table is shown (bench/console_bench.py waits for this mark).
const ready = () => performance.mark("mvm-interactive");
session().then((s) => (s.signed_in ? start() : showSignIn())).catch((e) => showSignIn(e.message)).finally(ready);
