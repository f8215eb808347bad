"""Dockerfiles and OCI/docker archives become bootable disk images, with real buildah and real guests.

The test image is FROM scratch with a static busybox, so it builds and boots in seconds:
busybox httpd serves CGI scripts that show what the guest init set up (env, working dir,
user) and fill the disk. Bad input of every kind gets a one-line error and leaves no image.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.e2e.guest import guest_request
from vmm import disks, jsonlog, oci
from vmm.buildtools import run
from vmm.disk_image import BuildOptions, build_from_archive, build_from_dockerfile
from vmm.errors import Conflict, InvalidRequest, OverCapacity, VmmError
from vmm.image import list_images
from vmm.manager import VmManager
from vmm.settings import VmmSettings

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / "var"  # the shared buildah store (var/containers) and kernel cache, as scripts/install.sh made them

DOCKERFILE = """\
FROM scratch
COPY rootfs/ /
COPY --chown=1000:1000 data/ /data/
ENV GREETING="hello from the image" PATH=/bin
WORKDIR /srv/www
USER web:web
EXPOSE 8080
LABEL mvm.ready="http:/cgi-bin/ready" mvm.memory_mb="128" mvm.disk_mb="64"
ENTRYPOINT ["/bin/busybox"]
CMD ["sh", "-c", "echo app-says-hi-on-stdout; echo app-says-hi-on-stderr >&2; exec busybox httpd -f -p 8080 -h ."]
"""

CGI = {
    "ready": "echo ok",
    "env": 'echo "greeting=$GREETING"; echo "uid=$(busybox id -u) gid=$(busybox id -g)"\n'
    'echo "host=$(busybox hostname)"',
    "fill": "busybox dd if=/dev/zero of=/data/fill bs=1M 2>&1; echo \"exit=$?\"; busybox df -k /data",
}


def _context(root: Path, dockerfile: str = DOCKERFILE) -> Path:
    """A build context: the Dockerfile, a tiny root filesystem, and /data owned by the app user."""
    ctx = root / "ctx"
    (ctx / "rootfs" / "bin").mkdir(parents=True)
    shutil.copyfile("/bin/busybox", ctx / "rootfs" / "bin" / "busybox")
    (ctx / "rootfs" / "bin" / "busybox").chmod(0o755)
    (ctx / "rootfs" / "etc").mkdir()
    (ctx / "rootfs" / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nweb:x:1000:1000::/srv/www:/bin/sh\n")
    (ctx / "rootfs" / "etc" / "group").write_text("root:x:0:\nweb:x:1000:\n")
    cgi = ctx / "rootfs" / "srv" / "www" / "cgi-bin"
    cgi.mkdir(parents=True)
    for name, body in CGI.items():
        script = cgi / name
        script.write_text(f"#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n{body}\n")
        script.chmod(0o755)
    (ctx / "data").mkdir()
    (ctx / "data" / "README").write_text("the app's data\n")
    (ctx / "Dockerfile").write_text(dockerfile)
    return ctx


@pytest.fixture
def build_settings(settings: VmmSettings, tmp_path: Path) -> Iterator[VmmSettings]:
    """The test's own images dir (its own templates too), next to the shared buildah store and cache."""
    images = tmp_path / "images"
    images.mkdir()
    state = settings.state_dir
    (state / "images").unlink()
    (state / "images").symlink_to(images)
    (state / "templates").unlink()
    (state / "templates").mkdir()
    (state / "containers").symlink_to(STATE / "containers")
    (state / "cache").symlink_to(STATE / "cache")
    store = oci.Store(STATE / "containers")
    before = _cache_tags(store)
    yield settings
    for tag, _ in _cache_tags(store) - before:  # the layer caches this test's builds left in the shared store
        oci.remove_image(store, tag)


def _cache_tags(store: oci.Store) -> set[tuple[str, str]]:
    """(tag, image id) of every image build's layer cache (localhost/mvm/build/<name>) in the store."""
    lines = run(store.buildah("images", "--format", "{{.Name}} {{.ID}}"), "buildah images").splitlines()
    pairs = {tuple(line.split()[:2]) for line in lines if line.startswith("localhost/mvm/build/")}
    return {(tag, image) for tag, image in pairs}


async def test_dockerfile_to_image_to_template_to_vm(build_settings: VmmSettings, tmp_path: Path) -> None:
    lines: list[str] = []
    image = build_from_dockerfile(
        _context(tmp_path) / "Dockerfile", None, BuildOptions(name="bbweb"), build_settings.images_dir,
        build_settings.state_dir, lines.append,
    )  # fmt: skip
    assert [line[:5] for line in lines if line.startswith("[")] == [f"[{i}/9]" for i in range(1, 10)]
    assert (image.kind, image.app_port, image.memory_mb, image.disk_mb) == ("disk", 8080, 128, 64)
    assert image.ready.kind == "http" and image.ready.path == "/cgi-bin/ready"
    assert [i.name for i in list_images(build_settings.images_dir)] == ["bbweb"]

    mgr = VmManager(build_settings)
    await mgr.start()
    try:
        tpl = await mgr.create_template("bbweb", "bbweb", lambda _: None)
        assert tpl.disk_mb == 64
        rec = await mgr.create_vm("bbweb")
        status, body = await guest_request(rec.id, "/cgi-bin/env")
        assert status == 200
        text = body.decode()
        assert "greeting=hello from the image" in text
        assert "uid=1000 gid=1000" in text
        assert f"host={rec.id}" in text  # the agent names each VM after its id

        # The guest fills its disk: ENOSPC inside, and the host file stays within the disk's size.
        status, body = await guest_request(rec.id, "/cgi-bin/fill", timeout=120)
        assert b"No space left on device" in body and b"exit=1" in body, body
        overlay = build_settings.vms_dir / rec.id / "disk.qcow2"
        assert disks.allocated_bytes(overlay) <= (64 + 8) * 2**20

        # The app's stdout and stderr reach the VM's log file, and the init's own lines too.
        log = mgr.app_log(rec.id).tail(1 << 20)
        assert b"app-says-hi-on-stdout\n" in log and b"app-says-hi-on-stderr\n" in log, log
        assert b"mvm-init: ready ports=8080" in log

        with pytest.raises(Conflict, match="in use by template"):
            mgr.remove_image("bbweb")
        with pytest.raises(Conflict, match=f"in use by VM.*{rec.id}"):
            mgr.remove_template("bbweb")
        await mgr.delete(rec.id)
        mgr.remove_template("bbweb")
        mgr.remove_image("bbweb")
        assert list_images(build_settings.images_dir) == []
    finally:
        for vm in list(mgr.list_vms()):
            await mgr.delete(vm.id)
        await mgr.close()


async def test_oci_and_docker_archives_import(build_settings: VmmSettings, tmp_path: Path) -> None:
    store = oci.Store(build_settings.containers_dir)
    ref = "localhost/mvm/test-archive:1"
    oci.build_dockerfile(store, _context(tmp_path) / "Dockerfile", tmp_path / "ctx", ref, lambda _: None)
    try:
        for fmt in ("oci-archive", "docker-archive"):
            oci.save_archive(store, ref, tmp_path / f"{fmt}.tar", fmt)
    finally:
        oci.remove_image(store, ref)
    for fmt in ("oci-archive", "docker-archive"):
        image = build_from_archive(
            tmp_path / f"{fmt}.tar", BuildOptions(name=fmt), build_settings.images_dir, build_settings.state_dir,
            lambda _: None,
        )  # fmt: skip
        assert (image.app_port, image.ready.path, image.disk_mb) == (8080, "/cgi-bin/ready", 64)

    # and an archive of an image FROM the local Debian base: its files and config come through
    base_ctx = tmp_path / "from-base"
    base_ctx.mkdir()
    (base_ctx / "Dockerfile").write_text(
        f"FROM {oci.BASE_IMAGE}\nRUN echo imported > /etc/mvm-test\nEXPOSE 9000\n"
        'CMD ["python3", "-m", "http.server", "9000"]\n'
    )
    oci.build_dockerfile(store, base_ctx / "Dockerfile", base_ctx, ref, lambda _: None)
    try:
        oci.save_archive(store, ref, tmp_path / "from-base.tar", "oci-archive")
    finally:
        oci.remove_image(store, ref)
    debian = build_from_archive(tmp_path / "from-base.tar", BuildOptions(), build_settings.images_dir,
                                build_settings.state_dir, lambda _: None)  # fmt: skip
    assert (debian.name, debian.app_port, debian.ready.kind) == ("from-base", 9000, "tcp")
    assert debian.disk is not None
    for inside in ("/usr/bin/python3", "/etc/mvm-test", "/mvm/init"):
        listed = subprocess.run(["debugfs", "-R", f"stat {inside}", str(debian.disk)], capture_output=True, text=True)
        assert "Inode:" in listed.stdout, (inside, listed.stderr)

    mgr = VmManager(build_settings)
    await mgr.start()
    try:
        await mgr.create_template("imported", "docker-archive", lambda _: None)
        rec = await mgr.create_vm("imported")
        status, body = await guest_request(rec.id, "/cgi-bin/env")
        assert status == 200 and b"greeting=hello from the image" in body
    finally:
        for vm in list(mgr.list_vms()):
            await mgr.delete(vm.id)
        await mgr.close()


def _build(settings: VmmSettings, dockerfile: Path, context: Path | None = None, **options: object) -> None:
    build_from_dockerfile(
        dockerfile, context, BuildOptions(name="bad", **options),  # type: ignore[arg-type]
        settings.images_dir, settings.state_dir, lambda _: None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("dockerfile", "options", "error", "message"),
    [
        (f"FROM {oci.BASE_IMAGE}\nRUN false\n", {}, VmmError, r"RUN false"),
        ("FROM localhost/mvm/no-such-base:1\nCMD [\"x\"]\n", {}, VmmError, r"localhost/mvm/no-such-base:1"),
        (DOCKERFILE.replace("EXPOSE 8080\n", ""), {}, InvalidRequest, r"EXPOSE one port"),
        (DOCKERFILE.replace('ENTRYPOINT ["/bin/busybox"]\nCMD', "LABEL x=y\n#"), {}, InvalidRequest, r"nothing to run"),
        (DOCKERFILE, {"vcpus": 17}, InvalidRequest, r"image\.vcpus"),
        (DOCKERFILE, {"disk_mb": 40000}, InvalidRequest, r"image\.disk_mb"),
        (DOCKERFILE, {"ready": "http:no-slash"}, InvalidRequest, r"ready must be"),
    ],
)
def test_bad_dockerfiles_fail_clearly_and_leave_no_image(
    build_settings: VmmSettings, tmp_path: Path, dockerfile: str, options: dict[str, object],
    error: type[Exception], message: str,
) -> None:  # fmt: skip
    with pytest.raises(error, match=message):
        _build(build_settings, _context(tmp_path, dockerfile) / "Dockerfile", **options)
    assert list_images(build_settings.images_dir) == []
    assert not list(build_settings.images_dir.glob(".bad.build-*"))


def test_missing_dockerfile_or_context(build_settings: VmmSettings, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="Dockerfile not found"):
        _build(build_settings, tmp_path / "nope" / "Dockerfile")
    ctx = _context(tmp_path)
    with pytest.raises(InvalidRequest, match="build context is not a directory"):
        _build(build_settings, ctx / "Dockerfile", tmp_path / "no-context")


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 100, b"\x1f\x8b\x08corrupt-gzip"])
def test_corrupt_archives_are_refused(build_settings: VmmSettings, tmp_path: Path, content: bytes) -> None:
    archive = tmp_path / "broken.tar"
    archive.write_bytes(content)
    with pytest.raises(InvalidRequest, match=r"broken\.tar"):
        build_from_archive(archive, BuildOptions(), build_settings.images_dir, build_settings.state_dir, print)
    with pytest.raises(InvalidRequest, match="archive not found"):
        build_from_archive(tmp_path / "missing.tar", BuildOptions(), build_settings.images_dir,
                           build_settings.state_dir, print)  # fmt: skip
    assert list_images(build_settings.images_dir) == []


async def test_app_that_never_gets_ready_fails_the_template_with_its_log(
    build_settings: VmmSettings, tmp_path: Path
) -> None:
    never = DOCKERFILE.replace(
        DOCKERFILE.splitlines()[-1],
        'CMD ["sh", "-c", "echo still-warming-up-the-flux-capacitor; exec busybox sleep 1000"]',
    )
    _build(build_settings, _context(tmp_path, never) / "Dockerfile")
    settings = replace(build_settings, boot_timeout=15.0)
    mgr = VmManager(settings)
    await mgr.start()
    try:
        with pytest.raises(VmmError, match=r"not ready within 15 s.*still-warming-up-the-flux-capacitor"):
            await mgr.create_template("never", "bad", lambda _: None)
        assert mgr.templates() == []
        with pytest.raises(OverCapacity, match="memory"):
            _build(build_settings, _context(tmp_path / "big") / "Dockerfile", memory_mb=32768)
            await mgr.create_template("huge", "bad", lambda _: None)
    finally:
        await mgr.close()


HOOKED = DOCKERFILE.replace(
    'LABEL mvm.ready="http:/cgi-bin/ready"',
    'LABEL mvm.hooks="run,resume,suspend,terminate,ready,validate" mvm.hooks.prefix="/cgi-bin" '
    'mvm.hooks.timeout="5" mvm.hooks.suspend.timeout="1" mvm.ready="http:/cgi-bin/show"',
)
HOOK_CGI = {
    # every HTTP hook appends its event (and its body) to /data/hooks.log; suspend is slower than its timeout
    **{e: f'echo "{e} $(busybox head -c "${{CONTENT_LENGTH:-0}}")" >> /data/hooks.log; echo ok'
       for e in ("run", "resume", "terminate", "ready", "validate")},
    "suspend": 'echo "suspend" >> /data/hooks.log; busybox sleep 3; echo late',
    "show": "busybox cat /data/hooks.log /data/exec-hooks.log 2>/dev/null",
}


async def test_lifecycle_hooks_run_once_per_step_and_never_hold_a_vm(
    build_settings: VmmSettings, tmp_path: Path
) -> None:
    ctx = _context(tmp_path, HOOKED)
    cgi = ctx / "rootfs" / "srv" / "www" / "cgi-bin"
    for name, body in HOOK_CGI.items():
        (cgi / name).write_text(f"#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n{body}\n")
        (cgi / name).chmod(0o755)
    executable = ctx / "rootfs" / "etc" / "mvm" / "hooks" / "resume.d" / "10-mark"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/busybox sh\necho \"exec-resume $1\" >> /data/exec-hooks.log\n")
    executable.chmod(0o755)
    image = build_from_dockerfile(ctx / "Dockerfile", None, BuildOptions(name="hooked"), build_settings.images_dir,
                                  build_settings.state_dir, lambda _: None)  # fmt: skip
    assert image.hooks is not None and image.hooks["exec"] == ["resume"] and image.hooks["prefix"] == "/cgi-bin"

    events = io.StringIO()
    jsonlog.configure("info", stream=events)  # every hook is logged with its outcome
    mgr = VmManager(build_settings)
    await mgr.start()
    try:
        await mgr.create_template("hooked", "hooked", lambda _: None)
        rec = await mgr.create_vm("hooked", run_payload={"user": "alice"})

        async def log() -> list[str]:
            status, body = await guest_request(rec.id, "/cgi-bin/show")
            assert status == 200
            return body.decode().splitlines()

        assert await log() == ["ready {}", "validate {}", 'run {"user":"alice"}']
        for restores in (1, 2):
            await mgr.suspend(rec.id)  # its suspend hook outlives its 1 s timeout: logged, the suspend goes on
            await mgr.ensure_running(rec.id)
            lines = await log()
            assert lines.count("suspend") == restores and lines.count("resume {}") == restores
            assert lines.count("exec-resume resume") == restores
        await mgr.delete(rec.id)
        hooks = [line for line in events.getvalue().splitlines() if '"vm.hook"' in line]
        assert any('"hook":"suspend","ok":false' in e and "TimeoutError" in e for e in hooks), hooks
        assert any('"hook":"terminate","ok":true' in e for e in hooks), hooks
    finally:
        for vm in list(mgr.list_vms()):
            await mgr.delete(vm.id)
        await mgr.close()
        jsonlog.configure("info", None)
