// One VM's page: its state and actions, a real terminal (xterm.js + fit on the shell WebSocket),
// its app log (followed), its events and its metrics. xterm.js is loaded only when a VM page opens.
import {api} from "./api.js";
import {act, ago, el, mib, onEvent, report, vms} from "./app.js";

const METRICS_EVERY_MS = 2000;
const LOG_KEEP_CHARS = 200000;

async function terminal(vmId, box) {
  const [{Terminal}, {FitAddon}] = await Promise.all([import("./vendor/xterm.mjs"), import("./vendor/addon-fit.mjs")]);
  if (!document.querySelector("link[data-xterm]")) {
    document.head.append(el("link", {rel: "stylesheet", href: "/console/vendor/xterm.css", "data-xterm": ""}));
  }
  const term = new Terminal({cursorBlink: true, fontSize: 14, scrollback: 5000,
                             fontFamily: "ui-monospace, 'DejaVu Sans Mono', monospace"});
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  window.mvmTerm = term;  // the browser test reads the screen from here
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(`${scheme}${location.host}/v1/vms/${vmId}/shell?cols=${term.cols}&rows=${term.rows}`);
  ws.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") { term.write(new Uint8Array(e.data)); return; }
    const end = JSON.parse(e.data);
    term.write(`\r\n[${"exit_code" in end ? `exited ${end.exit_code}` : `error: ${end.error}`}]\r\n`);
  };
  ws.onclose = () => term.write("\r\n[disconnected]\r\n");
  const data = term.onData((d) => ws.readyState === WebSocket.OPEN && ws.send(encoder.encode(d)));
  const resized = term.onResize(({cols, rows}) => ws.readyState === WebSocket.OPEN &&
                                                  ws.send(JSON.stringify({resize: [cols, rows]})));
  const observer = new ResizeObserver(() => fit.fit());
  observer.observe(box);
  term.focus();
  return () => { observer.disconnect(); data.dispose(); resized.dispose(); ws.close(); term.dispose(); };
}

function followLog(vmId, pre) {
  const abort = new AbortController();
  (async () => {
    const r = await fetch(`/v1/vms/${vmId}/logs?follow=1&tail=65536`, {signal: abort.signal, credentials: "same-origin"});
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = (pre.textContent + value).slice(-LOG_KEEP_CHARS);
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
  })().catch((e) => { if (e.name !== "AbortError") pre.textContent += `\n[log: ${e.message}]`; });
  return () => abort.abort();
}

function eventLine(ev) {
  const time = new Date(ev.time).toLocaleTimeString();
  return el("li", {"data-type": ev.type}, `${time} ${ev.type}${ev.reason ? ` (${ev.reason})` : ""}`);
}

async function showEvents(vmId, list) {
  try {
    const past = await api("GET", `/v1/events?follow=0&vm=${vmId}`);
    list.replaceChildren(...past.events.map(eventLine));
  } catch (e) {
    list.replaceChildren(el("li", {class: "muted"}, `no event history: ${e.message}`));
  }
  return onEvent((ev) => { if (ev.vm === vmId) list.append(eventLine(ev)); });
}

function metricsTable(u) {
  const rows = [["CPU", `${u.cpu_percent.toFixed(1)} % (${u.cpu_seconds.toFixed(1)} s in all)`],
                ["memory", `${mib(u.memory_bytes)} (peak ${mib(u.memory_peak_bytes)}, limit ${mib(u.memory_limit_bytes) || "none"})`],
                ["disk", mib(u.disk_bytes)], ["network", `rx ${mib(u.net_rx_bytes)}, tx ${mib(u.net_tx_bytes)}`]];
  return el("table", {}, el("tbody", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))));
}

export async function showVm(vmId) {
  const vm = await api("GET", `/v1/vms/${vmId}`);
  vms.set(vm.id, vm);
  const state = el("span", {class: `state ${vm.state}`, id: "vm-state", "data-state": vm.state}, vm.state);
  const termBox = el("div", {class: "term", id: "terminal"});
  const log = el("pre", {class: "log", id: "app-log"});
  const events = el("ol", {class: "events", id: "vm-events"});
  const metrics = el("div", {id: "vm-metrics"}, el("p", {class: "muted"}, "metrics appear while the VM runs"));
  const setState = (value) => {
    state.textContent = value;
    state.className = `state ${value}`;
    state.dataset.state = value;
  };
  const button = (name, label) => el("button", {
    onclick: () => act(vmId, name).then(() => setState(vms.get(vmId)?.state ?? state.textContent)).catch(report),
  }, label);
  document.getElementById("main").replaceChildren(
    el("h1", {}, el("a", {href: "#/"}, "VMs"), ` / ${vmId} `, state),
    el("div", {class: "toolbar"}, `template ${vm.template}, made ${ago(vm.created_at)} ago`,
       button("suspend", "Suspend"), button("resume", "Resume"), button("token", "Token"),
       el("button", {onclick: () => termBox.requestFullscreen()}, "Full screen")),
    el("div", {class: "grid"},
       el("section", {}, el("h2", {}, "Terminal"), termBox, el("h2", {}, "App log"), log),
       el("section", {}, el("h2", {}, "Metrics"), metrics, el("h2", {}, "Events"), events)),
  );
  const updateState = onEvent((ev) => { if (ev.vm === vmId && ev.state) setState(ev.state); });
  const refresh = async () => {
    if (vms.get(vmId)?.state !== "running") return;
    metrics.replaceChildren(metricsTable(await api("GET", `/v1/vms/${vmId}/metrics`)));
  };
  refresh().catch(report);
  const timer = setInterval(() => refresh().catch(() => {}), METRICS_EVERY_MS);
  const stopLog = followLog(vmId, log);
  const stopEvents = await showEvents(vmId, events);
  const stopTerm = await terminal(vmId, termBox);
  return () => { clearInterval(timer); updateState(); stopLog(); stopEvents(); stopTerm(); };
}
