"""Python code run in a VM with a namespace that lives as long as the VM: `x = 41`, then `x + 1` is 42.

Any image with `python3` works, whatever its app serves: each call is one exec of `python3 -c DRIVER`
with the code on stdin. The first call starts a small interpreter server in the guest (its own
session, detached from the exec, so the exec's end does not kill it) on a root-only unix socket
under /run; every call hands its code to that server and prints the answer as one JSON line.
The server lives in the VM's memory, so a suspend and restore keep the namespace, and a VM
deleted takes it with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from .errors import ExecFailed

if TYPE_CHECKING:
    from .client import AsyncClient

DRIVER = r"""
import fcntl, json, os, socket, sys
DIR = "/run/mvm-repl"
SOCK = DIR + "/sock"

def run(ns, code):
    import ast, contextlib, io, traceback
    out, err, result, error = io.StringIO(), io.StringIO(), None, None
    try:
        tree = ast.parse(code, "<code>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exec(compile(tree, "<code>", "exec"), ns)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<code>", "eval"), ns)
                result = None if value is None else repr(value)
    except BaseException as exc:
        error = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
    return {"stdout": out.getvalue(), "stderr": err.getvalue(), "result": result, "error": error}

def serve(listener):
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    while True:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(json.dumps(run(ns, data.decode())).encode())

def connect():
    conn = socket.socket(socket.AF_UNIX)
    try:
        conn.connect(SOCK)
        return conn
    except OSError:
        conn.close()
        return None

def start():
    os.makedirs(DIR, mode=0o700, exist_ok=True)
    with open(DIR + "/lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if connect() is not None:
            return
        if os.path.exists(SOCK):
            os.unlink(SOCK)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(SOCK)
        listener.listen(8)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.close(lock.fileno())  # the flock goes with the starter, not with the server
                serve(listener)
            os._exit(0)
        listener.close()
        os.wait()

code = sys.stdin.buffer.read()
conn = connect()
if conn is None:
    start()
    conn = connect()
conn.sendall(code)
conn.shutdown(socket.SHUT_WR)
answer = b""
while chunk := conn.recv(65536):
    answer += chunk
sys.stdout.buffer.write(answer)
"""


@dataclass(frozen=True)
class CodeResult:
    stdout: str
    stderr: str
    result: str | None  # repr() of the value of a final expression, when it has one that is not None
    error: str | None  # the traceback of an exception the code raised (the namespace keeps what ran before it)


async def run_python(client: AsyncClient, vm_id: str, code: str, timeout: float = 300.0) -> CodeResult:
    """Run `code` in the VM's persistent namespace (started on first use); the exec wakes a suspended VM."""
    done = await client.run(vm_id, ["python3", "-c", DRIVER], stdin=code.encode(), timeout=timeout)
    if done.exit_code != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {done.exit_code}"]
        raise ExecFailed(200, "run_code_failed", f"python3 in VM {vm_id} could not run the code: {why[0]}")
    try:
        doc = orjson.loads(done.stdout)
    except orjson.JSONDecodeError:
        raise ExecFailed(200, "run_code_failed", f"the interpreter of VM {vm_id} gave no answer") from None
    return CodeResult(doc["stdout"], doc["stderr"], doc["result"], doc["error"])
