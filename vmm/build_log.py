"""Following `buildah build`'s output: the user's steps, each one's output and time, why it failed.

The build may run a copy of the Dockerfile with an ARG added after each FROM (vmm/build_trust.py):
those steps are hidden and the others numbered as in the user's Dockerfile, so that progress and
errors name the step the user wrote. A failure becomes one line naming the step and its cause;
when the cause is the network it names the registry host, the proxy used and a hint.
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field

from .build_trust import TRUST_DIR, HostTrust, redact
from .buildtools import Progress

_STEP = re.compile(r"^(\[\d+/\d+\] )?STEP (\d+)/(\d+): (.*)$")
_URL_HOST = re.compile(r"https?://(?:[^/\s@'\"]+@)?([A-Za-z0-9.-]+)")
_POOL_HOST = re.compile(r"host='([A-Za-z0-9.-]+)'|resolve host: ([A-Za-z0-9.-]+)")
_NO_DISTRIBUTION = re.compile(r"No matching distribution found for (\S+)")
_NPM_404 = re.compile(r"404 Not Found - GET (\S+)")
_EXIT_STATUS = re.compile(r"^Error: building at STEP .*: exit status (\d+)$", re.M)
_BUILDAH_TRAILER = ("subprocess exited with status", "Error: building at STEP")

# (phrases, what they mean): checked in this order, the first phrase found in the step's output wins
_NETWORK = (
    (("CERTIFICATE_VERIFY_FAILED", "SELF_SIGNED_CERT_IN_CHAIN", "UNABLE_TO_GET_ISSUER_CERT",
      "certificate verify failed", "unable to get local issuer certificate", "self-signed certificate",
      "self signed certificate"), "tls"),
    (("ProxyError", "Cannot connect to proxy", "tunneling socket could not be established"), "proxy"),
    (("Temporary failure in name resolution", "Name or service not known", "NameResolutionError", "ENOTFOUND",
      "EAI_AGAIN", "Could not resolve"), "dns"),
    (("Connection refused", "Network is unreachable", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "Connection timed out",
      "Read timed out", "NewConnectionError"), "connect"),
)  # fmt: skip


@dataclass
class Step:
    """One step of the user's Dockerfile as the build ran it."""

    number: int
    total: int
    text: str
    started: float
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=400))
    cached: bool = False
    seconds: float = 0.0

    @property
    def name(self) -> str:
        text = self.text if len(self.text) <= 90 else self.text[:87] + "..."
        return f"STEP {self.number}/{self.total} `{text}`"


class BuildLog:
    """Fed buildah's lines one by one; passes the user's ones to `progress`, remembers the steps."""

    def __init__(self, progress: Progress, trust: HostTrust | None, added_per_stage: int) -> None:
        self.progress = progress
        self.trust = trust
        self.added_per_stage = added_per_stage
        self.steps: list[Step] = []
        self._hidden = 0  # added steps seen in the current stage
        self._in_hidden = False

    def __call__(self, line: str) -> None:
        match = _STEP.match(line)
        now = time.monotonic()
        if match:
            self._close(now)
            stage, number, total, text = match.group(1) or "", int(match.group(2)), int(match.group(3)), match.group(4)
            if number == 1:
                self._hidden = 0
            if text.startswith("ARG ") and f"={TRUST_DIR}/" in text:
                self._hidden += 1
                self._in_hidden = True
                return
            self._in_hidden = False
            step = Step(number - self._hidden, total - self.added_per_stage, text, now)
            self.steps.append(step)
            self.progress(f"      {stage}STEP {step.number}/{step.total}: {text}")
            return
        if self._in_hidden:
            return
        if line.startswith("COMMIT"):
            self._close(now)
        elif self.steps and self.steps[-1].seconds == 0.0:
            self.steps[-1].lines.append(line)
            if line.startswith("--> Using cache"):
                self.steps[-1].cached = True
        self.progress(f"      {line}")

    def _close(self, now: float) -> None:
        if self.steps and self.steps[-1].seconds == 0.0:
            self.steps[-1].seconds = max(now - self.steps[-1].started, 1e-6)

    def finish(self) -> None:
        self._close(time.monotonic())

    def summary(self) -> str:
        """One line: each step's time, or that it came from the cache."""
        parts = [f"{s.number}/{s.total} {'cached' if s.cached else f'{s.seconds:.1f} s'}" for s in self.steps]
        return "step times: " + ", ".join(parts)

    def explain(self, error: str) -> str:
        """One line: the failing step and its cause (for the network: registry host, proxy, hint)."""
        self.finish()
        if not self.steps:
            return f"image build: {error}"
        step = self.steps[-1]
        lines = [line for line in step.lines if line.strip() and not line.startswith("-->")]
        text = "\n".join(lines)
        for phrases, kind in _NETWORK:
            found = next((p for p in phrases if p in text), None)
            if found:
                return f"image build: {step.name} failed: {self._network(kind, found, step, lines)}"
        missing = _NO_DISTRIBUTION.search(text)
        if missing:
            return (f"image build: {step.name} failed: the registry {self._host(step, lines)} has no distribution of "
                    f"{missing.group(1)} (pip: no matching distribution)")  # fmt: skip
        npm_404 = _NPM_404.search(text)
        if npm_404:
            return f"image build: {step.name} failed: the registry answered 404 Not Found for {npm_404.group(1)}"
        status = _EXIT_STATUS.search(text)
        own = [line for line in lines if not line.startswith(_BUILDAH_TRAILER)]
        return f"image build: {step.name} failed{f' (exit {status.group(1)})' if status else ''}: {_cause(own)}"

    def _network(self, kind: str, phrase: str, step: Step, lines: list[str]) -> str:
        host = self._host(step, lines)
        proxy = self.trust.https_proxy if self.trust is not None else ""
        via = f"through proxy {redact(proxy)}" if proxy else "with no proxy"
        if self.trust is None:
            via += " (--no-host-trust)"
        if kind == "tls":
            hint = ("the host trusts it: build without --no-host-trust" if self.trust is None
                    else "add the CA that signs it to build.ca_files in the config")  # fmt: skip
            return f"could not reach {host} {via}: its TLS certificate is not trusted ({phrase}); {hint}"
        if kind == "proxy":
            return f"could not reach {host} {via}: the proxy cannot be reached ({phrase}); check HTTPS_PROXY"
        what = "its name does not resolve" if kind == "dns" else "no connection"
        hint = f"does this host reach it? (curl -I https://{host}/)" if "." in host else "does this host reach it?"
        return f"could not reach {host} {via}: {what} ({phrase}); {hint}"

    def _host(self, step: Step, lines: list[str]) -> str:
        """The registry host the step talked to: from its output's URLs, else from the tool it runs."""
        proxy_hosts = {m.group(1) for v in (self.trust.proxies.values() if self.trust else ()) for m in
                       _URL_HOST.finditer(v)}  # fmt: skip
        for line in [*lines, step.text]:
            for pattern in (_POOL_HOST, _URL_HOST):
                for match in pattern.finditer(line):
                    host = next(group for group in match.groups() if group)
                    if host not in proxy_hosts and "." in host:
                        return host
        index = self.trust.pip_index.get("index-url", "") if self.trust else ""
        registry = self.trust.npm_registry if self.trust else ""
        if "pip" in step.text:
            return next((m.group(1) for m in _URL_HOST.finditer(index)), "pypi.org")
        if "npm" in step.text:
            return next((m.group(1) for m in _URL_HOST.finditer(registry)), "registry.npmjs.org")
        return "the registry"


def _cause(lines: list[str]) -> str:
    """The tool's own error: npm's first message, pip's or apt's last ERROR/E: line, else the last lines."""
    npm = [line.removeprefix("npm ERR!").strip() for line in lines if line.startswith("npm ERR!")]
    if npm:
        message: list[str] = []
        for part in npm:
            if part.startswith("code ") and not message:
                continue
            if not part:
                if message:
                    break
                continue
            message.append(part)
        return "npm: " + " ".join(message)
    errors = [line.strip() for line in lines if line.lstrip().startswith(("ERROR:", "E: ", "error:", "Error:"))]
    if errors:
        return errors[-1]
    return " | ".join(line.strip() for line in lines[-10:]) or "no output"
