"""`mvm`: serve the edge, build images, and drive the control API.

Commands that change VMs talk to a running `mvm serve` over its control API (it owns
the QEMU processes); `image build`, `dev-cert` and `cluster` work locally. Errors print one line,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import termios
import tty
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from edge.tls import TlsError, make_dev_cert
from microvm_edge import AsyncClient
from microvm_edge.errors import ApiError
from mvm import top
from mvm.config import Config, load_config
from vmm.errors import ConfigError, VmmError

DEFAULT_CONFIG = Path("configs/dev.toml")


class CliError(Exception):
    """A message for the user; the CLI prints it and exits 1."""


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, ConfigError, VmmError, TlsError) as exc:
        print(f"mvm: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the command (`mvm serve --config x.toml`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help=f"TOML config (default {DEFAULT_CONFIG})"
    )
    parser = argparse.ArgumentParser(
        prog="mvm", description="microvm-edge: microVMs behind a wake-on-request edge", parents=[common]
    )
    sub = _Subparsers(parser.add_subparsers(required=True, metavar="command"), common)

    serve = sub.add_parser("serve", "run the edge proxy, control API and VM manager (one machine)")
    serve.add_argument("--workers", type=_worker_count, default=None,
                       help="edge worker processes: a number or auto, one per core (default server.workers); "
                            "1 serves from this one process, more run one `mvm host` plus that many `mvm edge` "
                            "workers")  # fmt: skip
    serve.set_defaults(func=_serve)

    host = sub.add_parser("host", "run a VM host of a fleet (or, with an action, ask the edge about hosts)")
    host_actions = _Subparsers(host.add_subparsers(required=False, metavar="action"), common)
    host.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)  # from `mvm serve`: its lock
    host.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # written to once serving
    host.set_defaults(func=_host)
    host_actions.add_parser("ls", "list the fleet's hosts (up, capacity, VMs)").set_defaults(
        func=lambda a: _print(_api(a, "GET", "/v1/hosts"))
    )
    drain = host_actions.add_parser("drain", "move every VM of a host to other hosts (running ones are suspended)")
    drain.add_argument("host_id")
    drain.set_defaults(func=lambda a: _print(_api(a, "POST", f"/v1/hosts/{a.host_id}/drain")))

    edge = sub.add_parser("edge", "run edge workers of a fleet (stateless; they route by the catalog)")
    edge.add_argument("--workers", type=_worker_count, default=None,
                      help="processes: a number or auto, one per core (default server.workers)")  # fmt: skip
    edge.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one worker, in this process
    edge.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # written to once serving
    edge.set_defaults(func=_edge)

    cert = sub.add_parser("dev-cert", "make a self-signed wildcard certificate for the dev domain")
    cert.set_defaults(func=_dev_cert)

    cluster = sub.group("cluster", "the fleet's certificates (mutual TLS between hosts and edges)", "action")
    init = cluster.add_parser("init", "make a cluster CA, and a host and an edge certificate for this machine")
    init.add_argument("--dir", type=Path, default=None, help="where (default: the folder of cluster.ca_file)")
    init.set_defaults(func=_cluster_init)
    issue = cluster.add_parser("cert", "issue a host's or an edge's certificate from the cluster CA")
    issue.add_argument("--role", choices=("host", "edge"), required=True)
    issue.add_argument("--name", required=True, help="the host's id or the edge's name (the certificate's CN)")
    issue.add_argument("--address", action="append", default=[],
                       help="a host: an address edges reach it by (IP or DNS name; repeat; default loopback)")
    issue.add_argument("--dir", type=Path, default=None, help="the CA's folder (default: that of cluster.ca_file)")
    issue.add_argument("--out", type=Path, default=None, help="where to write <name>.crt/.key (default --dir)")
    issue.add_argument("--days", type=int, default=365, help="validity (default 365, never past the CA's)")
    issue.set_defaults(func=_cluster_cert)

    image = sub.group("image", "guest images", "action")
    build = image.add_parser("build", "build a guest image from a Dockerfile, or the demo from its image.toml")
    build.add_argument("spec", type=Path, nargs="?", default=None, help="image.toml (default images/demo/image.toml)")
    build.add_argument("--dockerfile", type=Path, default=None, help="build this Dockerfile with buildah instead")
    build.add_argument("--context", type=Path, default=None, help="build context (default: the Dockerfile's folder)")
    build.add_argument("--no-cache", action="store_true", help="run every step again (default: reuse cached layers)")
    build.add_argument("--no-host-trust", action="store_true",
                       help="RUN steps get neither the host's CA bundle nor its proxies and indexes")  # fmt: skip
    build.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="a Dockerfile ARG's value (repeatable; adds to build.args)")  # fmt: skip
    _image_options(build)
    build.set_defaults(func=_image_build)
    imp = image.add_parser("import", "make a guest image from an OCI archive or a docker-archive tarball")
    imp.add_argument("archive", type=Path)
    _image_options(imp)
    imp.set_defaults(func=_image_import)
    base = image.add_parser("base", "make the Debian base image for `FROM localhost/mvm/debian:bookworm` (mmdebstrap)")
    base.add_argument("--force", action="store_true", help="make it again even if it exists")
    base.set_defaults(func=_image_base)
    image.add_parser("ls", "list built images").set_defaults(func=_image_ls)
    image_rm = image.add_parser("rm", "remove an image no template uses")
    image_rm.add_argument("name")
    image_rm.set_defaults(func=_image_rm)

    tpl = sub.group("template", "templates (pre-initialised snapshots)", "action")
    tpl_create = tpl.add_parser("create", "boot an image once and snapshot it")
    tpl_create.add_argument("name")
    tpl_create.add_argument("--image", default="demo", help="image to boot (default demo)")
    tpl_create.add_argument("--host", default=None, help="in a fleet of several hosts: the host to make it on")
    tpl_create.set_defaults(
        func=lambda a: _print(_api(a, "POST", f"/v1/templates{_on_host(a)}", {"name": a.name, "image": a.image}))
    )
    tpl_ls = tpl.add_parser("ls", "list templates")
    tpl_ls.set_defaults(func=lambda a: _print(_api(a, "GET", "/v1/templates")))
    tpl_rm = tpl.add_parser("rm", "remove a template no VM uses")
    tpl_rm.add_argument("name")
    tpl_rm.add_argument("--host", default=None, help="in a fleet of several hosts: the host to remove it from")
    tpl_rm.set_defaults(func=lambda a: _print(_api(a, "DELETE", f"/v1/templates/{a.name}{_on_host(a)}")))

    vm = sub.group("vm", "VMs", "action")
    create = vm.add_parser("create", "launch a VM from a template")
    create.add_argument("--template", default=None, help="template to launch from (default vmm.default_template)")
    create.add_argument("--policy", default=None, help="JSON object, e.g. '{\"idle_suspend_after\": 60}'")
    create.add_argument("--run-payload", default=None, help="JSON given to the image's run hook (at most 16 KiB)")
    create.add_argument("--host", default=None, help="place it on this host of the fleet (default: the edge picks)")
    create.set_defaults(func=_vm_create)
    vm.add_parser("ls", "list VMs").set_defaults(func=_vm_ls)
    vm_top = vm.add_parser("top", "a live table of what running VMs use (CPU, memory, disk, network) until Ctrl-C")
    vm_top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    vm_top.add_argument("--once", action="store_true", help="print one table and stop")
    vm_top.set_defaults(func=_vm_top)
    for action, method, suffix, what in (
        ("get", "GET", "", "show one VM"),
        ("pause", "POST", "/pause", "pause a VM in memory"),
        ("suspend", "POST", "/suspend", "snapshot a VM to disk and end its QEMU"),
        ("resume", "POST", "/resume", "resume or restore a VM"),
        ("rm", "DELETE", "", "terminate a VM and remove everything it had"),
    ):
        cmd = vm.add_parser(action, what)
        cmd.add_argument("vm_id")
        cmd.set_defaults(func=lambda a, m=method, s=suffix: _print(_api(a, m, f"/v1/vms/{a.vm_id}{s}")))

    move = vm.add_parser("move", "move a VM (memory, disk, device state) to another host of the fleet")
    move.add_argument("vm_id")
    move.add_argument("--to", required=True, help="the host id (see `mvm host ls`)")
    move.set_defaults(func=lambda a: _print(_api(a, "POST", f"/v1/vms/{a.vm_id}/move", {"to": a.to})))

    fork = vm.add_parser("fork", "start N new VMs that continue from a VM's moment now (or from a checkpoint)")
    fork.add_argument("vm_id")
    fork.add_argument("-n", "--count", type=int, default=1, help="how many children, 1 to 32 (default 1)")
    fork.add_argument("--checkpoint", default=None, help="fork from this checkpoint instead of the moment now")
    fork.add_argument("--policy", default=None, help="JSON object over the parent's policy for every child")
    fork.set_defaults(func=_vm_fork)
    restore = vm.add_parser("restore", "rewind a VM (same id, URL, tokens) to one of its checkpoints")
    restore.add_argument("vm_id")
    restore.add_argument("--checkpoint", required=True, help="the checkpoint's name")
    restore.set_defaults(
        func=lambda a: _print(_api(a, "POST", f"/v1/vms/{a.vm_id}/restore", {"checkpoint": a.checkpoint}))
    )

    ckpt = sub.group("checkpoint", "checkpoints: named moments of a VM to rewind to or fork from", "action")
    ckpt_create = ckpt.add_parser("create", "checkpoint a VM now (a running VM is paused for the capture only)")
    ckpt_create.add_argument("vm_id")
    ckpt_create.add_argument("name")
    ckpt_create.set_defaults(
        func=lambda a: _print(_api(a, "POST", f"/v1/vms/{a.vm_id}/checkpoints", {"name": a.name}))
    )
    ckpt_ls = ckpt.add_parser("ls", "list a VM's checkpoints with their size and time")
    ckpt_ls.add_argument("vm_id")
    ckpt_ls.set_defaults(func=lambda a: _print(_api(a, "GET", f"/v1/vms/{a.vm_id}/checkpoints")))
    ckpt_rm = ckpt.add_parser("rm", "delete a checkpoint nothing reads through any more")
    ckpt_rm.add_argument("vm_id")
    ckpt_rm.add_argument("name")
    ckpt_rm.set_defaults(func=lambda a: _print(_api(a, "DELETE", f"/v1/vms/{a.vm_id}/checkpoints/{a.name}")))

    run = sub.add_parser("exec", "run a command in a VM: `mvm exec <id> -- cmd args...` (stdin is piped)")
    run.add_argument("vm_id")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="the command, after --")
    run.add_argument("--user", default="0", help="root, <uid> or <uid>:<gid> (default root)")
    run.add_argument("--cwd", default="/", help="working directory (default /)")
    run.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE", help="environment (repeat)")
    run.add_argument("--timeout", type=float, default=300.0, help="seconds before it is killed (default 300)")
    run.set_defaults(func=_exec)

    cp = sub.add_parser("cp", "copy a file into or out of a VM: `mvm cp LOCAL <id>:/path` or `mvm cp <id>:/path LOCAL`")
    cp.add_argument("source")
    cp.add_argument("dest")
    cp.set_defaults(func=_cp)

    shell = sub.add_parser("shell", "an interactive shell in a VM (Ctrl-D or exit ends it)")
    shell.add_argument("vm_id")
    shell.add_argument("--user", default="0", help="root, <uid> or <uid>:<gid> (default root)")
    shell.set_defaults(func=_shell)

    logs = sub.add_parser("logs", "print a VM's app output (stdout and stderr)")
    logs.add_argument("vm_id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output until Ctrl-C")
    logs.add_argument("--tail", type=int, default=65536, help="bytes of earlier output to start with (default 64 KiB)")
    logs.set_defaults(func=_logs)

    events = sub.add_parser("events", "print lifecycle events (created, suspended, ...), one JSON line each")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events until Ctrl-C")
    events.add_argument("--vm", action="append", default=None, metavar="ID", help="only this VM's (repeat)")
    events.add_argument("--type", action="append", default=None, metavar="T", help="only this type (repeat)")
    events.add_argument("--after", type=int, default=None, metavar="SEQ", help="only those after this seq")
    events.set_defaults(func=_events)
    mcp = sub.add_parser("mcp", "serve the MCP tools (sandboxes for AI agents) over stdio, on the control API")
    mcp.set_defaults(func=_mcp)

    token = sub.add_parser("token", "issue a short-lived token for one VM")
    token.add_argument("vm_id")
    token.add_argument("--ttl", type=float, default=None, help="seconds (default tokens.default_ttl)")
    token.add_argument("--scopes", default=None, help="comma list of http, exec, files (default http)")
    token.add_argument("--ports", default=None, help='"all" (default), one port, or a range like 8000-8100')
    token.set_defaults(func=_token)
    return parser


class _Subparsers:
    """add_subparsers() whose every parser (nested too) also takes the common options."""

    def __init__(self, action: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser):
        self.action, self.common = action, common

    def add_parser(self, name: str, help: str) -> argparse.ArgumentParser:
        return self.action.add_parser(name, help=help, parents=[self.common])

    def group(self, name: str, help: str, metavar: str) -> _Subparsers:
        sub = self.add_parser(name, help).add_subparsers(required=True, metavar=metavar)
        return _Subparsers(sub, self.common)


def _config(args: argparse.Namespace) -> Config:
    # Not set_defaults(config=None): subparsers share the --config action, and a default
    # there would overwrite a --config given before the command.
    path = getattr(args, "config", None) or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    return load_config(path)


def _serve(args: argparse.Namespace) -> None:
    cfg = _config(args)
    workers = _workers(args, cfg)
    from vmm import statelock

    # Before anything starts: a second `mvm serve` on this state directory stops here, with no port opened.
    lock_fd = statelock.take(cfg.vmm.state_dir)
    if workers == 1:
        from edge.app import serve

        serve(cfg, lock_fd)
        return
    from fleet.edge_node import worker_command
    from fleet.privilege import worker_identity
    from fleet.supervisor import DRAIN_MARGIN, Child, supervise
    from vmm import jsonlog
    from vmm.jail import join_host_group

    jsonlog.configure(cfg.log.level)
    join_host_group(cfg.vmm.jail)  # the edge workers and the host inherit its reserved CPU weight
    config = getattr(args, "config", None)
    host = Child("host", [*worker_command(config, "host"), "--lock-fd", str(lock_fd)], pass_fds=(lock_fd,))
    edges = [Child(f"edge-{i}", [*worker_command(config, "edge"), "--worker"]) for i in range(workers)]
    ready_wait = cfg.vmm.boot_timeout + 60  # the host may make the default template first
    drain_wait = cfg.server.drain_timeout + DRAIN_MARGIN
    identity = worker_identity(cfg.server.worker_user)
    sys.exit(supervise(host, edges, ready_wait, drain_wait, cfg.server.rlimit_nofile, identity, cfg.cluster))


def _host(args: argparse.Namespace) -> None:
    from fleet.host import serve

    serve(_config(args), args.lock_fd, args.ready_fd)


def _edge(args: argparse.Namespace) -> None:
    cfg = _config(args)
    from fleet.edge_node import serve_worker, worker_command
    from fleet.privilege import worker_identity
    from fleet.supervisor import DRAIN_MARGIN, Child, supervise
    from vmm import jsonlog

    workers = _workers(args, cfg)
    if args.worker or workers == 1:
        serve_worker(cfg, args.ready_fd)
        return
    jsonlog.configure(cfg.log.level)
    config = getattr(args, "config", None)
    edges = [Child(f"edge-{i}", [*worker_command(config, "edge"), "--worker"]) for i in range(workers)]
    drain_wait = cfg.server.drain_timeout + DRAIN_MARGIN
    identity = worker_identity(cfg.server.worker_user)
    sys.exit(
        supervise(None, edges, cfg.vmm.boot_timeout + 60, drain_wait, cfg.server.rlimit_nofile, identity, cfg.cluster)
    )


def _worker_count(text: str) -> int:
    """--workers N or auto (0: one per core)."""
    if text == "auto":
        return 0
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of processes or auto, got {text!r}")
    return int(text)


def _workers(args: argparse.Namespace, cfg: Config) -> int:
    wanted = args.workers if args.workers is not None else cfg.server.workers
    return wanted or os.cpu_count() or 1


def _dev_cert(args: argparse.Namespace) -> None:
    cfg = _config(args)
    cert, key = make_dev_cert(cfg.server.domain, cfg.server.tls_cert.parent, extra_hosts=[cfg.server.control_host])
    if (cert, key) != (cfg.server.tls_cert, cfg.server.tls_key):
        cert.rename(cfg.server.tls_cert)
        key.rename(cfg.server.tls_key)
    print(f"wrote {cfg.server.tls_cert} and {cfg.server.tls_key} for *.{cfg.server.domain}")


def _cluster_init(args: argparse.Namespace) -> None:
    from fleet import cluster_ca

    folder = args.dir or _config(args).cluster.ca_file.parent
    ca, _ = cluster_ca.init_ca(folder)
    name = socket.gethostname().split(".")[0].lower()
    host, _ = cluster_ca.issue(folder, "host", name, folder, cluster_ca.LOOPBACK, stem="host")
    edge, _ = cluster_ca.issue(folder, "edge", f"edge-{name}", folder, stem="edge")
    print(f"wrote {ca} (keep ca.key off the hosts and edges), {host} and {edge} with their keys;"
          " set cluster.tls = true, and see `mvm cluster cert` for other machines")  # fmt: skip


def _cluster_cert(args: argparse.Namespace) -> None:
    from fleet import cluster_ca

    folder = args.dir or _config(args).cluster.ca_file.parent
    addresses = args.address or (list(cluster_ca.LOOPBACK) if args.role == "host" else [])
    cert, key = cluster_ca.issue(folder, args.role, args.name, args.out or folder, addresses, args.days)
    print(f"wrote {cert} and {key}: cluster.{args.role}_cert and cluster.{args.role}_key of {args.name}")


def _image_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--name", default=None, help="image name (default: from the folder or file name)")
    cmd.add_argument("--port", type=int, default=None, help="app port (default: LABEL mvm.port, or the EXPOSEd one)")
    cmd.add_argument("--ready", default=None, help="'tcp' or 'http:/path' (default: LABEL mvm.ready, or tcp)")
    cmd.add_argument("--memory-mb", type=int, default=None, help="VM memory (default: LABEL mvm.memory_mb, or 512)")
    cmd.add_argument("--vcpus", type=int, default=None, help="VM vCPUs (default: LABEL mvm.vcpus, or 1)")
    cmd.add_argument("--disk-mb", type=int, default=None, help="root disk size (default: LABEL mvm.disk_mb, or 1024)")
    cmd.add_argument("--hooks", default=None, help="events with HTTP hooks, e.g. run,resume (default: LABEL mvm.hooks)")
    cmd.add_argument("--port-protocol", action="append", default=[], metavar="PORT=PROTO",
                     help="a port's protocol, http or h2c (default: LABEL mvm.port.<PORT>.protocol, or http)")


def _build_options(args: argparse.Namespace) -> Any:
    from vmm.disk_image import BuildOptions

    protocols: dict[int, str] = {}
    for item in args.port_protocol:
        port, sep, proto = item.partition("=")
        if not sep or not port.isdigit():
            raise CliError(f"--port-protocol {item!r}: must be PORT=PROTO, e.g. 50051=h2c")
        protocols[int(port)] = proto
    return BuildOptions(
        args.name, args.port, args.ready, args.memory_mb, args.vcpus, args.disk_mb, args.hooks,
        port_protocols=protocols,
    )  # fmt: skip


def _image_build(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if args.dockerfile is not None:
        if args.spec is not None:
            raise CliError("give either an image.toml or --dockerfile, not both")
        from vmm.disk_image import build_from_dockerfile

        build_args = dict(cfg.build.args)
        for item in args.build_arg:
            key, sep, value = item.partition("=")
            if not sep:
                raise CliError(f"--build-arg {item!r}: must be KEY=VALUE")
            build_args[key] = value
        trust = cfg.build.host_trust and not args.no_host_trust
        options = replace(_build_options(args), no_cache=args.no_cache, build_args=build_args, host_trust=trust,
                          ca_files=cfg.build.ca_files)  # fmt: skip
        image = build_from_dockerfile(
            args.dockerfile, args.context, options, cfg.vmm.images_dir, cfg.vmm.state_dir, print
        )
    else:
        from vmm.image_spec import build_spec_image

        spec = args.spec or Path("images/demo/image.toml")
        image = build_spec_image(spec, cfg.vmm.images_dir, cfg.vmm.cache_dir, print)
    print(f"image {image.name!r} is ready: `mvm template create <name> --image {image.name}`")


def _image_import(args: argparse.Namespace) -> None:
    from vmm.disk_image import build_from_archive

    cfg = _config(args)
    image = build_from_archive(args.archive, _build_options(args), cfg.vmm.images_dir, cfg.vmm.state_dir, print)
    print(f"image {image.name!r} is ready: `mvm template create <name> --image {image.name}`")


def _image_base(args: argparse.Namespace) -> None:
    from vmm import oci

    cfg = _config(args)
    ref = oci.ensure_base_image(oci.Store(cfg.vmm.containers_dir), print, force=args.force)
    print(f"base image {ref} is ready for `FROM {ref}`")


def _on_host(args: argparse.Namespace) -> str:
    return f"?host={args.host}" if args.host else ""


def _image_ls(args: argparse.Namespace) -> None:
    from vmm.image import list_images

    print(f"{'NAME':<24}{'KIND':<11}{'PORT':<7}{'MEMORY':<8}{'DISK':<8}SOURCE")
    for image in list_images(_config(args).vmm.images_dir):
        disk = f"{image.disk_mb}M" if image.disk_mb else "-"
        print(f"{image.name:<24}{image.kind:<11}{image.app_port:<7}{f'{image.memory_mb}M':<8}{disk:<8}{image.source}")


def _image_rm(args: argparse.Namespace) -> None:
    from vmm import template
    from vmm.image import remove_image

    cfg = _config(args)
    users = [t.name for t in template.list_all(cfg.vmm) if t.image == args.name]
    remove_image(cfg.vmm.images_dir, args.name, users)
    print(f"removed image {args.name!r}")


def _vm_create(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {}
    if args.template:
        body["template"] = args.template
    if args.policy:
        body["policy"] = _json_option("--policy", args.policy)
    if args.host:
        body["host"] = args.host
    if args.run_payload:
        body["run_payload"] = _json_option("--run-payload", args.run_payload)
    _print(_api(args, "POST", "/v1/vms", body))


def _vm_fork(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"count": args.count}
    if args.checkpoint:
        body["checkpoint"] = args.checkpoint
    if args.policy:
        body["policy"] = _json_option("--policy", args.policy)
    _print(_api(args, "POST", f"/v1/vms/{args.vm_id}/fork", body))


def _json_option(flag: str, text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise CliError(f"{flag} is not valid JSON: {exc}") from exc


def _vm_ls(args: argparse.Namespace) -> None:
    """Every VM, page after page of GET /v1/vms (each printed as it comes)."""
    print(f"{'ID':<14}{'STATE':<11}{'TEMPLATE':<10}URL")
    cursor: str | None = ""
    while cursor is not None:
        answer = _api(args, "GET", "/v1/vms" + (f"?{urllib.parse.urlencode({'cursor': cursor})}" if cursor else ""))
        for vm in answer["vms"]:
            reason = f"  ({vm['reason']})" if vm.get("reason") else ""
            print(f"{vm['id']:<14}{vm['state']:<11}{vm['template']:<10}{vm['url']}{reason}")
        cursor = answer.get("next")


def _vm_top(args: argparse.Namespace) -> None:
    if not args.interval > 0:
        raise CliError(f"--interval {args.interval}: must be a number of seconds above 0")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_top(_config(args), args.interval, args.once))


async def _top(cfg: Config, interval: float, once: bool) -> None:
    """Print the table, then (unless `once`) print it again every `interval` seconds over the last one."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() and not once else ""
    async with _client(cfg) as client:
        while True:
            try:
                rows = await top.sample(client)
            except ApiError as exc:
                raise _cli_error(client, "GET /v1/vms/{id}/metrics", exc) from None
            except aiohttp.ClientError as exc:
                raise CliError(f"control API call for VM metrics failed: {exc}") from exc
            print(f"{clear}{top.table(rows)}", flush=True)
            if once:
                return
            await asyncio.sleep(interval)


def _token(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"ttl": args.ttl} if args.ttl is not None else {}
    if args.scopes:
        body["scopes"] = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
    if args.ports:
        body["ports"] = args.ports
    _print(_api(args, "POST", f"/v1/vms/{args.vm_id}/tokens", body))


def _print(data: Any) -> None:
    if data is not None:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _api(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """Call the control API of the configured server (loopback address, control host name)."""
    return asyncio.run(_call(_config(args), method, path, body))


def _client(cfg: Config) -> AsyncClient:
    """The SDK's client for the configured server: its loopback address, control host name and admin key."""
    server = cfg.server
    host = "127.0.0.1" if server.listen_host in ("0.0.0.0", "::") else server.listen_host
    if server.tls and not server.tls_cert.exists():
        raise CliError(f"server.tls_cert {server.tls_cert} is missing: run `mvm dev-cert`")
    return AsyncClient(
        f"{'https' if server.tls else 'http'}://{host}:{server.listen_port}",
        server.admin_key,
        control_host=server.control_host,
        cafile=str(server.tls_cert) if server.tls else None,
    )


@contextlib.asynccontextmanager
async def _request(
    cfg: Config, method: str, path: str, body: Any, timeout: float | None = 300, data: Any = None
) -> AsyncIterator[aiohttp.ClientResponse]:
    """One control API request through the SDK; its errors become one-line CLI messages."""
    async with _client(cfg) as client:
        try:
            async with client.request(
                method, path, orjson.dumps(body) if body is not None else data, timeout=timeout
            ) as resp:
                yield resp
        except ApiError as exc:
            raise _cli_error(client, f"{method} {path}", exc) from None
        except aiohttp.ClientError as exc:
            raise CliError(f"control API call {method} {path} failed: {exc}") from exc


def _cli_error(client: AsyncClient, what: str, exc: ApiError) -> CliError:
    if exc.status == 0:
        why = getattr(exc.__cause__, "strerror", None) or exc.message  # the socket's own words, when it has them
        return CliError(f"cannot reach the control API at {client.url}: is `mvm serve` running? ({why})")
    return CliError(f"{what}: HTTP {exc.status}: {exc.message}")


async def _call(cfg: Config, method: str, path: str, body: Any, data: Any = None) -> Any:
    async with _request(cfg, method, path, body, data=data) as resp:
        raw = await resp.read()
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise CliError(f"{method} {path}: the answer is not JSON: {raw[:200].decode(errors='replace')}") from None


def _exec(args: argparse.Namespace) -> None:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise CliError("no command given: mvm exec <vm-id> -- cmd args...")
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"--env {item!r} must look like NAME=VALUE")
        env[name] = value
    body: dict[str, Any] = {"argv": argv, "env": env, "cwd": args.cwd, "user": args.user, "timeout": args.timeout}
    if not sys.stdin.isatty():
        body["stdin_b64"] = base64.b64encode(sys.stdin.buffer.read()).decode()
    sys.exit(asyncio.run(_stream_exec(_config(args), f"/v1/vms/{args.vm_id}/exec", body)))


async def _stream_exec(cfg: Config, path: str, body: dict[str, Any]) -> int:
    """Print the command's output as it comes; its exit code becomes ours (a signal: 128 + n)."""
    outputs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    async with _request(cfg, "POST", path, body, timeout=None) as resp:
        async for line in resp.content:
            event = orjson.loads(line)
            if "stream" in event:
                out = outputs[event["stream"]]
                out.write(base64.b64decode(event["data"]))
                out.flush()
            elif "exit_code" in event:
                return int(event["exit_code"])
            elif "error" in event:
                print(f"mvm: exec: {event['error']}", file=sys.stderr)
                return 124 if event.get("timed_out") else 1
    raise CliError("the exec stream ended without an exit code")


_VM_PATH = re.compile(r"^(v[a-z2-7]{11}):(/.*)$")


def _cp(args: argparse.Namespace) -> None:
    into, out_of = _VM_PATH.match(args.dest), _VM_PATH.match(args.source)
    if bool(into) == bool(out_of):
        raise CliError("give exactly one side as <vm-id>:/absolute/path, e.g. mvm cp a.txt vabc234def56:/data/a.txt")
    cfg = _config(args)
    if into:
        local = Path(args.source)
        if not local.is_file():
            raise CliError(f"{local}: not a file")
        path = f"/v1/vms/{into[1]}/files?path={urllib.parse.quote(into[2])}"
        with open(local, "rb") as data:
            result = asyncio.run(_call(cfg, "PUT", path, None, data=data))
        print(f"copied {result['bytes']} bytes to {args.dest}")
    else:
        assert out_of is not None
        asyncio.run(_download(cfg, f"/v1/vms/{out_of[1]}/files?path={urllib.parse.quote(out_of[2])}", Path(args.dest)))


async def _download(cfg: Config, path: str, local: Path) -> None:
    """Stream into a temporary file beside `local`, renamed at the end: no half file on failure."""
    async with _request(cfg, "GET", path, None, timeout=None) as resp:
        if resp.content_type == "application/json":
            raise CliError(f"{path.partition('path=')[2]} is a directory in the VM")
        tmp = local.with_name(f".{local.name}.mvm-cp")
        try:
            with open(tmp, "wb") as out:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    out.write(chunk)
            tmp.rename(local)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _shell(args: argparse.Namespace) -> None:
    sys.exit(asyncio.run(_run_shell(_config(args), args.vm_id, args.user)))


async def _run_shell(cfg: Config, vm_id: str, user: str) -> int:
    """The terminal in raw mode, bytes both ways, window size changes passed on; the shell's status is ours."""
    fd = sys.stdin.fileno()
    interactive = sys.stdin.isatty()
    cols, rows = shutil.get_terminal_size() if interactive else (80, 24)
    path = f"/v1/vms/{vm_id}/shell?cols={cols}&rows={rows}&user={user}"
    client = _client(cfg)
    loop = asyncio.get_running_loop()
    saved = termios.tcgetattr(fd) if interactive else None
    code = 1
    try:
        async with client, client.websocket(path) as ws:
            outbox: asyncio.Queue[bytes | str] = asyncio.Queue()  # keystrokes and resizes, in order
            if interactive:
                tty.setraw(fd)

                def resized() -> None:
                    size = shutil.get_terminal_size()
                    outbox.put_nowait(orjson.dumps({"resize": [size.columns, size.lines]}).decode())

                loop.add_signal_handler(signal.SIGWINCH, resized)

            def typed() -> None:
                data = os.read(fd, 4096)
                if not data:  # piped input ended: end the shell like Ctrl-D would
                    loop.remove_reader(fd)
                    data = b"\x04"
                outbox.put_nowait(data)

            async def send() -> None:
                while True:
                    item = await outbox.get()
                    await (ws.send_bytes(item) if isinstance(item, bytes) else ws.send_str(item))

            loop.add_reader(fd, typed)
            sender = asyncio.create_task(send())
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    sys.stdout.buffer.write(msg.data)
                    sys.stdout.buffer.flush()
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    end = orjson.loads(msg.data)
                    if "error" in end:
                        print(f"\r\nmvm: shell: {end['error']}", file=sys.stderr)
                    code = int(end.get("exit_code", 1))
            sender.cancel()
    except ApiError as exc:
        raise _cli_error(client, f"shell of VM {vm_id}", exc) from None
    finally:
        loop.remove_reader(fd)
        if saved is not None:
            loop.remove_signal_handler(signal.SIGWINCH)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    return code


def _events(args: argparse.Namespace) -> None:
    asyncio.run(_print_events(_config(args), args))


async def _print_events(cfg: Config, args: argparse.Namespace) -> None:
    async with _client(cfg) as client:
        try:
            async for ev in client.events(vm=args.vm, types=args.type, after=args.after, follow=args.follow):
                sys.stdout.write(orjson.dumps(ev.raw).decode() + "\n")
                sys.stdout.flush()
        except ApiError as exc:
            raise _cli_error(client, "GET /v1/events", exc) from None


def _mcp(args: argparse.Namespace) -> None:
    """An MCP server on stdin/stdout whose tools call the configured control API (microvm_edge/mcp_server.py)."""
    from microvm_edge.mcp_server import build_server

    client = _client(_config(args))

    async def run() -> None:
        async with client:
            await build_server(client).run_stdio_async()

    asyncio.run(run())


def _logs(args: argparse.Namespace) -> None:
    path = f"/v1/vms/{args.vm_id}/logs?tail={args.tail}" + ("&follow=1" if args.follow else "")
    asyncio.run(_stream_to_stdout(_config(args), path))


async def _stream_to_stdout(cfg: Config, path: str) -> None:
    async with _request(cfg, "GET", path, None, timeout=None) as resp:
        async for chunk in resp.content.iter_any():
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
