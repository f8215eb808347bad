"""`mvm`: serve the edge, build images, and drive the control API.

Commands that change VMs talk to a running `mvm serve` over its control API (it owns
the QEMU processes); `image build` and `dev-cert` work locally. Errors print one line,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from vmm.errors import VmmError

from .config import Config, ConfigError, load_config
from .tls import TlsError, make_dev_cert

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

    serve = sub.add_parser("serve", "run the edge proxy, control API and VM manager")
    serve.set_defaults(func=_serve)

    cert = sub.add_parser("dev-cert", "make a self-signed wildcard certificate for the dev domain")
    cert.set_defaults(func=_dev_cert)

    image = sub.group("image", "guest images", "action")
    build = image.add_parser("build", "build a guest image from its spec")
    build.add_argument("spec", type=Path, nargs="?", default=Path("images/demo/image.toml"))
    build.set_defaults(func=_image_build)

    tpl = sub.group("template", "templates (pre-initialised snapshots)", "action")
    tpl_create = tpl.add_parser("create", "boot an image once and snapshot it")
    tpl_create.add_argument("name")
    tpl_create.add_argument("--image", default="demo", help="image to boot (default demo)")
    tpl_create.set_defaults(func=lambda a: _print(_api(a, "POST", "/v1/templates", {"name": a.name, "image": a.image})))
    tpl_ls = tpl.add_parser("ls", "list templates")
    tpl_ls.set_defaults(func=lambda a: _print(_api(a, "GET", "/v1/templates")))

    vm = sub.group("vm", "VMs", "action")
    create = vm.add_parser("create", "launch a VM from a template")
    create.add_argument("--template", default=None, help="template to launch from (default vmm.default_template)")
    create.add_argument("--policy", default=None, help="JSON object, e.g. '{\"idle_suspend_after\": 60}'")
    create.set_defaults(func=_vm_create)
    vm.add_parser("ls", "list VMs").set_defaults(func=_vm_ls)
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

    token = sub.add_parser("token", "issue a short-lived token for one VM")
    token.add_argument("vm_id")
    token.add_argument("--ttl", type=float, default=None, help="seconds (default tokens.default_ttl)")
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
    from .app import serve

    serve(_config(args))


def _dev_cert(args: argparse.Namespace) -> None:
    cfg = _config(args)
    cert, key = make_dev_cert(cfg.server.domain, cfg.server.tls_cert.parent, extra_hosts=[cfg.server.control_host])
    if (cert, key) != (cfg.server.tls_cert, cfg.server.tls_key):
        cert.rename(cfg.server.tls_cert)
        key.rename(cfg.server.tls_key)
    print(f"wrote {cfg.server.tls_cert} and {cfg.server.tls_key} for *.{cfg.server.domain}")


def _image_build(args: argparse.Namespace) -> None:
    from vmm.image import build_image

    cfg = _config(args)
    image = build_image(args.spec, cfg.vmm.images_dir, cfg.vmm.state_dir / "cache", lambda line: print(line))
    print(f"image {image.name!r}: {image.kernel} + {image.initrd}")


def _vm_create(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {}
    if args.template:
        body["template"] = args.template
    if args.policy:
        try:
            body["policy"] = orjson.loads(args.policy)
        except orjson.JSONDecodeError as exc:
            raise CliError(f"--policy is not valid JSON: {exc}") from exc
    _print(_api(args, "POST", "/v1/vms", body))


def _vm_ls(args: argparse.Namespace) -> None:
    vms = _api(args, "GET", "/v1/vms")["vms"]
    print(f"{'ID':<14}{'STATE':<11}{'TEMPLATE':<10}URL")
    for vm in vms:
        reason = f"  ({vm['reason']})" if vm.get("reason") else ""
        print(f"{vm['id']:<14}{vm['state']:<11}{vm['template']:<10}{vm['url']}{reason}")


def _token(args: argparse.Namespace) -> None:
    body = {"ttl": args.ttl} if args.ttl is not None else {}
    _print(_api(args, "POST", f"/v1/vms/{args.vm_id}/tokens", body))


def _print(data: Any) -> None:
    if data is not None:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _api(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """Call the control API of the configured server (loopback address, control host name)."""
    return asyncio.run(_call(_config(args), method, path, body))


async def _call(cfg: Config, method: str, path: str, body: Any) -> Any:
    server = cfg.server
    host = "127.0.0.1" if server.listen_host in ("0.0.0.0", "::") else server.listen_host
    scheme = "https" if server.tls else "http"
    url = f"{scheme}://{host}:{server.listen_port}{path}"
    ssl_ctx: ssl.SSLContext | bool = False
    if server.tls:
        if not server.tls_cert.exists():
            raise CliError(f"server.tls_cert {server.tls_cert} is missing: run `mvm dev-cert`")
        ssl_ctx = ssl.create_default_context(cafile=str(server.tls_cert))
    headers = {"Host": server.control_host, "Authorization": f"Bearer {server.admin_key}"}
    timeout = aiohttp.ClientTimeout(total=300)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                method,
                url,
                data=orjson.dumps(body) if body is not None else None,
                headers={**headers, "Content-Type": "application/json"} if body is not None else headers,
                ssl=ssl_ctx,
                server_hostname=server.control_host if server.tls else None,
            ) as resp,
        ):
            raw = await resp.read()
    except aiohttp.ClientConnectorError as exc:
        raise CliError(f"cannot reach the control API at {url}: is `mvm serve` running? ({exc.strerror})") from exc
    except aiohttp.ClientError as exc:
        raise CliError(f"control API call {method} {path} failed: {exc}") from exc
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    if resp.status >= 400:
        message = data.get("message") if isinstance(data, dict) else raw.decode(errors="replace").strip()
        raise CliError(f"{method} {path}: HTTP {resp.status}: {message}")
    if raw and data is None:
        raise CliError(f"{method} {path}: the answer is not JSON: {raw[:200].decode(errors='replace')}")
    return data


if __name__ == "__main__":
    main()
