"""A stand-in for one process of an `mvm serve` set, driven line by line over stdin/stdout.

Started with the set's environment (MVM_RUN_DIR, PROMETHEUS_MULTIPROC_DIR), it joins the
connection table the way a worker does (`fleet.run_dir.join_table`) and keeps its own counts
the way `ProxyContext` does. Each command gets one line back, so the test knows it is done.
"""

from __future__ import annotations

import os
import sys

import orjson

from edge.metrics import Metrics
from fleet.run_dir import join_table


def main() -> None:
    table = join_table(os.getpid())
    metrics = Metrics(lambda: {"running": 1})
    mine: dict[bytes, int] = {}
    print(orjson.dumps({"joined": table is not None, "shared_metrics": metrics.shared is not None}).decode(),
          flush=True)  # fmt: skip
    for line in sys.stdin:
        cmd, *args = line.split()
        answer: object = "ok"
        if cmd == "open":
            client, limit = args[0].encode(), int(args[1])
            n = mine.get(client, 0)
            assert table is not None
            answer = table.opened(client, n, limit, lambda _: False)
            if answer:
                mine[client] = n + 1
        elif cmd == "close":
            client = args[0].encode()
            mine[client] -= 1
            assert table is not None
            table.closed(client, mine[client])
        elif cmd == "count":  # a Metrics method and its arguments, e.g. "count request 200"
            getattr(metrics, args[0])(*(int(a) if a.isdigit() else a for a in args[1:]))
        elif cmd == "render":
            answer = metrics.render()[0].decode()
        print(orjson.dumps(answer).decode(), flush=True)


if __name__ == "__main__":
    main()
