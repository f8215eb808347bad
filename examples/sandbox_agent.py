"""An agent runs code it did not write in its own microVM, through the Python SDK.

Each step is written to a file in the VM and run there; the VM's disk keeps what the steps
leave behind. Run it beside `mvm serve` (defaults match configs/dev.toml, from the repo root):
    .venv/bin/mvm template create sandbox --image python-sandbox
    .venv/bin/python examples/sandbox_agent.py
"""

from __future__ import annotations

import argparse

from microvm_edge import Client

STEPS = [
    "import math, platform; print(math.factorial(20), platform.node())",
    "open('/data/answer.txt', 'w').write(str(6 * 7))",
    "print(open('/data/answer.txt').read()); raise SystemExit(3)",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="https://127.0.0.1:8443")
    parser.add_argument("--admin-key", default="dev-admin-key-change-me")
    parser.add_argument("--cafile", default="var/tls/dev.crt")
    parser.add_argument("--control-host", default="api.mvm.localhost")
    parser.add_argument("--template", default="sandbox")
    args = parser.parse_args()
    with Client(args.url, args.admin_key, cafile=args.cafile, control_host=args.control_host) as mvm:
        vm = mvm.create(template=args.template)  # its own VM, from a snapshot: no boot
        try:
            for i, code in enumerate(STEPS):
                mvm.write_file(vm.id, f"/tmp/step{i}.py", code.encode())
                result = mvm.run(vm.id, ["python3", f"/tmp/step{i}.py"], timeout=60)
                print(f"step {i}: exit {result.exit_code}: {result.stdout.decode().strip()}")
            print("files:", [entry["name"] for entry in mvm.list_files(vm.id, "/data")])
        finally:
            mvm.delete(vm.id)


if __name__ == "__main__":
    main()
