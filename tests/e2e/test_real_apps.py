"""Real apps from the real registries this machine reaches, built with buildah and served from real guests.

- images/flask-app's layers are built from scratch (apt, then pip from PyPI with the host's CA);
  its image is snapshotted once (its expensive init runs there) and cloned: the clone answers at
  once without running the init again, and keeps its state across suspend and wake.
- images/node-app (`npm ci` from its lock file) is snapshotted, cloned and asked.
- RUN steps see the host's CA bundle and proxy variables; the built image holds none of it.
- Without host trust, behind an unreachable proxy, without a lock file, or for a package the
  registry does not have, the build fails with one line naming the step and the cause.
- A rebuild after a change to app.py alone reuses the pip layer.

The flask-app and node-app images are the set-up's (scripts/install.sh builds them into var/images),
else built here once. Everything shares the buildah store and kernel cache in var/, so test builds
reuse the set-up's layers and the set-up reuses theirs; one template per app for the session.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import uvloop

from tests.e2e.conftest import machine, started_manager
from tests.e2e.guest import guest_request
from vmm import build_trust, oci
from vmm.accel import choose
from vmm.buildtools import run
from vmm.disk_image import BuildOptions, build_from_dockerfile
from vmm.errors import VmmError
from vmm.image import Image, load_image
from vmm.manager import VmManager
from vmm.settings import VmmSettings
from vmm.template import create as create_template

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / "var"
FLASK = REPO / "images" / "flask-app"
NODE = REPO / "images" / "node-app"
# A CA of our own for the bundle: its body must show up inside the build and nowhere in the image.
MARKER_CA = b"-----BEGIN CERTIFICATE-----\nTVZNLWUyZS10cnVzdC1tYXJrZXItY2E=\n-----END CERTIFICATE-----\n"


@pytest.fixture(scope="session")
def apps_state(session_root: Path) -> Path:
    """Images and templates of these tests, beside the shared buildah store and kernel cache."""
    state = session_root / "apps"
    for name in ("images", "templates"):
        (state / name).mkdir(parents=True)
    (state / "containers").symlink_to(STATE / "containers")
    (state / "cache").symlink_to(STATE / "cache")
    return state


def _image(state: Path, name: str) -> Image:
    """The set-up's build of images/<name> (scripts/install.sh), else a build of it here (cached layers)."""
    built = STATE / "images" / name
    if (built / "image.json").exists():
        (state / "images" / name).symlink_to(built)
        return load_image(state / "images", name)
    return build_from_dockerfile(REPO / "images" / name / "Dockerfile", None, BuildOptions(name=name),
                                 state / "images", state, lambda _: None)  # fmt: skip


@pytest.fixture(scope="session")
def flask_image(apps_state: Path) -> Image:
    return _image(apps_state, "flask-app")


@pytest.fixture(scope="session")
def node_image(apps_state: Path) -> Image:
    return _image(apps_state, "node-app")


@pytest.fixture(scope="session")
def flask_scratch_build() -> Iterator[tuple[str, list[str]]]:
    """images/flask-app's layers built from scratch: apt and pip really run, against the registries."""
    store = oci.Store(STATE / "containers")
    tag = f"localhost/mvm/e2e-flask-{uuid.uuid4().hex[:10]}"
    lines: list[str] = []
    try:
        oci.build_dockerfile(store, FLASK / "Dockerfile", FLASK, tag, lines.append,
                             trust=build_trust.from_host(os.environ), no_cache=True)  # fmt: skip
        yield tag, lines
    finally:
        oci.remove_image(store, tag)


@pytest.fixture(scope="session")
def flask_template(apps_state: Path, flask_image: Image) -> str:
    """One flask-app template for every test that needs it: the init runs here, once."""
    settings = replace(VmmSettings(state_dir=apps_state), boot_timeout=240.0)
    accel = choose(settings.accelerator)
    with machine():  # its boot makes a namespace: not while an exclusive test looks
        uvloop.run(create_template(settings, "flaske2e", flask_image.name, accel, lambda _: None))
    return "flaske2e"


@pytest.fixture
async def apps_manager(settings: VmmSettings, apps_state: Path) -> AsyncIterator[VmManager]:
    """A manager on the test's own state dir (cleaned up by `settings`), with these tests' images and templates."""
    for name in ("images", "templates"):
        (settings.state_dir / name).unlink()
        (settings.state_dir / name).symlink_to(apps_state / name)
    async with started_manager(settings) as mgr:
        yield mgr


def _step_seconds(lines: list[str]) -> dict[str, str]:
    """`step times: 1/11 0.1 s, 2/11 cached, ...` -> {"1/11": "0.1 s", "2/11": "cached", ...}."""
    summary = next(line for line in lines if "step times:" in line).split("step times:")[1]
    return dict(part.strip().split(" ", 1) for part in summary.split(","))


def test_flask_app_builds_from_scratch_with_pip_from_pypi(flask_scratch_build: tuple[str, list[str]]) -> None:
    output = "\n".join(flask_scratch_build[1])
    assert "Using cache" not in output and re.search(r"Successfully installed .*flask-3\.1\.3", output), output[-3000:]
    assert "host trust for RUN steps: " in output


async def test_flask_clone_answers_at_once_without_the_init_and_keeps_its_state(
    apps_manager: VmManager, flask_template: str
) -> None:
    rec = await apps_manager.create_vm(flask_template)
    status, body = await guest_request(rec.id, "/")  # how fast: bench/app_bench.py (tests assert behaviour)
    first = json.loads(body)
    assert status == 200 and first["init_count"] == 1, body
    assert first["model"]["bytes"] == 30_000 * 8 * 16 * 8 and first["init_seconds"] > 0

    await apps_manager.suspend(rec.id)
    await apps_manager.ensure_running(rec.id)
    status, body = await guest_request(rec.id, "/")
    again = json.loads(body)
    assert status == 200 and again["init_count"] == 1
    for key in ("pid", "init_pid", "started_at"):  # the same processes, restored: not restarted
        assert again[key] == first[key], (key, first, again)
    assert again["requests"] == first["requests"] + 1


async def test_node_app_from_its_lock_file(apps_manager: VmManager, node_image: Image) -> None:
    assert node_image.ready.path == "/" and node_image.app_port == 8080
    name = (await apps_manager.create_template("nodee2e", node_image.name, lambda _: None)).name
    try:
        rec = await apps_manager.create_vm(name)
        status, body = await guest_request(rec.id, "/")
        answer = json.loads(body)
        assert status == 200 and answer["app"] == "node-app" and answer["express"] == "4.21.2", body
        await apps_manager.delete(rec.id)
    finally:
        apps_manager.remove_template(name)


@pytest.fixture
def store() -> oci.Store:
    return oci.Store(STATE / "containers")


@pytest.fixture
def scratch_tag(store: oci.Store) -> Iterator[str]:
    """A tag for a test build, removed afterwards with the layers only it has, and the cached steps
    a failed build left behind."""
    tag = f"localhost/mvm/e2e-{uuid.uuid4().hex[:10]}"
    before = _dangling(store)
    yield tag
    oci.remove_image(store, tag)
    for image in _dangling(store) - before:
        oci.remove_image_id(store, image)


def _dangling(store: oci.Store) -> set[str]:
    argv = store.buildah("images", "-a", "-q", "--no-trunc", "--filter", "dangling=true")
    return {image.removeprefix("sha256:") for image in run(argv, "buildah images").split()}


def _context(tmp_path: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        (ctx / name).write_text(text)
    return ctx


PROBE = f"""\
FROM {oci.BASE_IMAGE}
RUN for v in SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE PIP_CERT NODE_EXTRA_CA_CERTS GIT_SSL_CAINFO NO_PROXY \\
        no_proxy; do echo "probe-env $v=$(printenv $v)"; done; echo "probe-sha256 $(sha256sum < "$SSL_CERT_FILE")"
RUN echo built > /probe-marker
"""


def test_run_steps_trust_the_host_and_the_image_holds_none_of_it(
    store: oci.Store, scratch_tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "probe.no-proxy.invalid")
    extra = tmp_path / "marker-ca.pem"
    extra.write_bytes(MARKER_CA)
    trust = build_trust.from_host(os.environ, (extra,))
    lines: list[str] = []
    oci.build_dockerfile(store, _context(tmp_path, PROBE) / "Dockerfile", tmp_path / "ctx", scratch_tag, lines.append,
                         trust=trust)  # fmt: skip
    output = [line.strip() for line in lines if "STEP" not in line]
    seen = dict(line.removeprefix("probe-env ").split("=", 1) for line in output if line.startswith("probe-env "))
    assert {k: seen[k] for k in build_trust.CA_VARIABLES} == dict.fromkeys(build_trust.CA_VARIABLES, build_trust.BUNDLE)
    assert seen["NO_PROXY"] == seen["no_proxy"] == "probe.no-proxy.invalid"
    fingerprint = next(line for line in output if line.startswith("probe-sha256 ")).split()[1]
    assert fingerprint == trust.fingerprint == hashlib.sha256(trust.bundle).hexdigest()
    assert trust.bundle.endswith(MARKER_CA) and trust.bundle.startswith(Path(trust.sources[0]).read_bytes())

    layout = tmp_path / "layout"
    run(store.buildah("push", "--quiet", scratch_tag, f"oci:{layout}:img"), "buildah push", timeout=600)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    config_text = (layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_text()
    config = json.loads(config_text)
    names = (*build_trust.CA_VARIABLES, "NO_PROXY", "no_proxy")
    assert not [e for e in config["config"].get("Env", []) if e.split("=")[0] in names], config["config"]
    for secret in ("probe.no-proxy.invalid", "TVZNLWUyZS10cnVzdC1tYXJrZXItY2E", trust.fingerprint):
        assert secret not in config_text
    members = 0
    for layer in manifest["layers"]:
        with tarfile.open(layout / "blobs" / "sha256" / layer["digest"][7:]) as tar:
            for member in tar:
                members += 1
                assert not member.name.lstrip("./").startswith(build_trust.TRUST_DIR.lstrip("/")), member.name
                if member.isfile() and member.size:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    assert b"TVZNLWUyZS10cnVzdC1tYXJrZXItY2E" not in data, member.name
                    assert b"probe.no-proxy.invalid" not in data, member.name
    assert members > 1000  # the base layer too: every layer was read


def _failure(store: oci.Store, tag: str, tmp_path: Path, dockerfile: str, trust: build_trust.HostTrust | None,
             files: dict[str, str] | None = None) -> str:  # fmt: skip
    with pytest.raises(VmmError) as failed:
        oci.build_dockerfile(store, _context(tmp_path, dockerfile, files) / "Dockerfile", tmp_path / "ctx", tag,
                             lambda _: None, trust=trust)  # fmt: skip
    message = str(failed.value)
    assert "\n" not in message and message.startswith("image build: STEP "), message
    return message


def _pip_download() -> str:
    """A pip step that reaches PyPI, never taken from the cache (its text is new each time)."""
    return f"RUN /srv/app/venv/bin/pip download --retries 1 --no-cache-dir -d /tmp/d six  # {uuid.uuid4()}\n"


def test_without_host_trust_pip_names_the_registry_and_a_hint(
    store: oci.Store, scratch_tag: str, tmp_path: Path, flask_scratch_build: tuple[str, list[str]]
) -> None:
    dockerfile = f"FROM {flask_scratch_build[0]}\n{_pip_download()}"
    message = _failure(store, scratch_tag, tmp_path, dockerfile, None)
    assert re.search(r"STEP 2/2 `RUN /srv/app/venv/bin/pip download .*` failed: could not reach pypi\.org with no "
                     r"proxy \(--no-host-trust\): its TLS certificate is not trusted \(.*\); the host trusts it: "
                     r"build without --no-host-trust$", message), message  # fmt: skip


@pytest.mark.parametrize("case", ["missing lock file", "package the registry lacks (404)", "unreachable proxy"])
def test_bad_input_is_one_line_naming_the_step_and_the_cause(
    store: oci.Store, scratch_tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, node_image: Image,
    flask_scratch_build: tuple[str, list[str]], case: str,
) -> None:  # fmt: skip
    node = f"FROM localhost/mvm/build/{node_image.name}\nUSER root\nWORKDIR /tmp/app\n"
    if case == "missing lock file":
        message = _failure(store, scratch_tag, tmp_path, node + "COPY package.json ./\nRUN npm ci\n",
                           build_trust.from_host(os.environ), {"package.json": (NODE / "package.json").read_text()})
        assert re.search(r"STEP 5/5 `RUN npm ci` failed \(exit 1\): npm: The `npm ci` command can only install "
                         r"with an existing package-lock\.json", message), message  # fmt: skip
    elif case == "package the registry lacks (404)":
        missing = f"mvm-e2e-no-such-package-{uuid.uuid4().hex[:8]}"
        message = _failure(store, scratch_tag, tmp_path, node + f"RUN npm install --no-audit --no-fund {missing}\n",
                           build_trust.from_host(os.environ))  # fmt: skip
        assert message.endswith(f"failed: the registry answered 404 Not Found for https://registry.npmjs.org/{missing}")
    else:
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")
        dockerfile = f"FROM {flask_scratch_build[0]}\n{_pip_download()}"
        message = _failure(store, scratch_tag, tmp_path, dockerfile, build_trust.from_host(os.environ))
        assert "could not reach pypi.org through proxy http://127.0.0.1:9: the proxy cannot be reached" in message


def test_a_rebuild_after_an_app_change_reuses_the_pip_layer(
    store: oci.Store, scratch_tag: str, tmp_path: Path, flask_scratch_build: tuple[str, list[str]]
) -> None:
    ctx = tmp_path / "flask-app"
    shutil.copytree(FLASK, ctx)
    with open(ctx / "app.py", "a") as app:
        app.write(f"\n# changed by the rebuild test {uuid.uuid4()}\n")
    lines: list[str] = []
    oci.build_dockerfile(store, ctx / "Dockerfile", ctx, scratch_tag, lines.append,
                         trust=build_trust.from_host(os.environ))  # fmt: skip
    steps = [line.strip() for line in lines if re.match(r"\s+STEP \d+/\d+: ", line)]
    pip = next(i for i, s in enumerate(steps) if "pip install" in s)
    after_pip = lines[lines.index(next(line for line in lines if "pip install" in line and "STEP" in line)) + 1]
    assert "--> Using cache" in after_pip, lines
    rebuilt, scratch = _step_seconds(lines), _step_seconds(flask_scratch_build[1])
    key = f"{pip + 1}/{len(steps)}"
    assert rebuilt[key] == "cached" and scratch[key].endswith(" s")
    assert rebuilt[f"{pip + 2}/{len(steps)}"] != "cached"  # COPY app.py ran again
    total = sum(float(v.split()[0]) for v in rebuilt.values() if v != "cached")
    assert total < float(scratch[key].split()[0]) / 2, (rebuilt, scratch)
