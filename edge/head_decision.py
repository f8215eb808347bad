"""An HTTP/1.1 request's fate from its head alone: the connection's limits on heads first, then
admission (`edge.admission`: route, token, port), then whether HTTP/1.1 can reach that port at all.
The connection core (`edge.connection_core`) calls it once per request head; nothing here does I/O."""

from __future__ import annotations

from vmm.jsonlog import log

from .admission import Admitter, Refusal
from .exchange import Exchange
from .proxy_context import ProxySettings
from .reqhead import RequestHead


def decide(
    ex: Exchange, admitter: Admitter, settings: ProxySettings, target: bytes, version: str, head: RequestHead
) -> bool:
    """Admit or refuse `ex`, whose head is `target` and `head`. False when the head broke a limit:
    the request stream is not read further after it (the request is answered, then the connection
    closes)."""
    if len(target) + head.size > settings.max_head_size:
        ex.keep_alive = False
        ex.refuse(Refusal(431, "the request head is too large"))
        return False
    if head.fields > settings.max_headers:
        ex.keep_alive = False
        ex.refuse(Refusal(431, f"the request head has more than {settings.max_headers} header fields"))
        return False
    try:
        verdict = admitter.admit(ex.method, target, version, head, ex.upgrade)
    except Exception as exc:  # a bug in admission must still answer, never leave the client hanging
        log.event("edge.admission_error", level="error", error=repr(exc))
        ex.keep_alive = False
        verdict = Refusal(400, "the request could not be admitted")
    if isinstance(verdict, Refusal):
        ex.refuse(verdict)
    elif verdict.h2c:
        ex.refuse(Refusal(502, f"port {verdict.port} of VM {verdict.vm_id} speaks HTTP/2 only (h2c): "
                          "send the request over HTTP/2 (ALPN h2, or h2c where the edge listens for it)"))  # fmt: skip
    else:
        ex.admit(verdict)
    return True
