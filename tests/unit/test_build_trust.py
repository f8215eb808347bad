"""What RUN steps borrow from the host (CA bundle, proxies, indexes), the ARGs added after each FROM,
how buildah's output is followed, and the one-line error a failing step becomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mvm.config import load_config
from vmm import build_trust, oci
from vmm.build_log import BuildLog
from vmm.errors import ConfigError, InvalidRequest

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _trust(tmp_path: Path, environ: dict[str, str] | None = None, **kwargs: object) -> build_trust.HostTrust:
    bundle = tmp_path / "host-bundle.pem"
    bundle.write_bytes(PEM * 3)
    monkey_home = {"HOME": str(tmp_path / "home")}
    return build_trust.from_host({"SSL_CERT_FILE": str(bundle), **monkey_home, **(environ or {})}, **kwargs)  # type: ignore[arg-type]


def test_the_host_bundle_and_extra_ca_files(tmp_path: Path) -> None:
    extra = tmp_path / "corp.pem"
    extra.write_bytes(PEM.replace(b"MIIB", b"CORP").rstrip(b"\n"))
    trust = _trust(tmp_path, ca_files=(extra,))
    assert trust.bundle == PEM * 3 + PEM.replace(b"MIIB", b"CORP")
    assert trust.sources == (str(tmp_path / "host-bundle.pem"), str(extra))
    assert "4 CA certificates" in trust.describe() and trust.fingerprint[:16] in trust.describe()
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    with pytest.raises(InvalidRequest, match=r"build\.ca_files: .*empty\.pem holds no PEM certificate"):
        _trust(tmp_path, ca_files=(tmp_path / "empty.pem",))
    with pytest.raises(InvalidRequest, match=r"build\.ca_files: cannot read .*missing\.pem"):
        _trust(tmp_path, ca_files=(tmp_path / "missing.pem",))


def test_proxies_in_both_cases_and_indexes_over_http_only(tmp_path: Path) -> None:
    environ = {"https_proxy": "http://user:secret@proxy.corp:3128", "NO_PROXY": "localhost,.corp",
               "PIP_INDEX_URL": "https://pypi.corp/simple", "PIP_EXTRA_INDEX_URL": "file:///opt/wheels https://x.corp/s",
               "npm_config_registry": "https://npm.corp/"}  # fmt: skip
    trust = _trust(tmp_path, environ)
    assert trust.proxies == {"HTTPS_PROXY": "http://user:secret@proxy.corp:3128",
                             "https_proxy": "http://user:secret@proxy.corp:3128",
                             "NO_PROXY": "localhost,.corp", "no_proxy": "localhost,.corp"}  # fmt: skip
    assert trust.pip_index == {"index-url": "https://pypi.corp/simple", "extra-index-url": "https://x.corp/s"}
    assert trust.npm_registry == "https://npm.corp/"
    assert "secret" not in trust.describe() and "proxy http://user:***@proxy.corp:3128" in trust.describe()
    files = trust.files()
    assert files["pip.conf"] == b"[global]\nindex-url = https://pypi.corp/simple\nextra-index-url = https://x.corp/s\n"
    assert files["npmrc"] == b"registry=https://npm.corp/\n"
    variables = trust.variables()
    assert variables["PIP_CONFIG_FILE"] == build_trust.PIP_CONF
    assert variables["NPM_CONFIG_GLOBALCONFIG"] == build_trust.NPMRC
    assert all(value.startswith(build_trust.TRUST_DIR + "/") for value in variables.values())


def test_pip_and_npm_config_files_of_the_host(tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.corp/simple\nextra-index-url = file:///opt/pypi/simple\n")
    trust = _trust(tmp_path, {"PIP_CONFIG_FILE": str(conf)})
    assert trust.pip_index == {"index-url": "https://mirror.corp/simple"}
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".npmrc").write_text("fund=false\nregistry = https://npm.mirror.corp/\n")
    assert _trust(tmp_path).npm_registry == "https://npm.mirror.corp/"


def test_no_bundle_on_the_host_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(build_trust, "HOST_BUNDLES", (str(tmp_path / "none.crt"),))
    with pytest.raises(InvalidRequest, match=r"no CA bundle on this host.*--no-host-trust"):
        build_trust.from_host({})


def test_an_arg_after_each_from() -> None:
    dockerfile = (
        "# syntax=docker/dockerfile:1\n"
        "FROM base AS build\n"
        "RUN make \\\n    all\n"
        "from --platform=linux/amd64 \\\n"
        "  # a comment inside the instruction\n"
        "  base\n"
        "COPY --from=build /out /out"
    )
    text, added = build_trust.with_trust_args(dockerfile, {"A": "/run/x", "B": "/run/y"})
    assert added == 2
    assert text == (
        "# syntax=docker/dockerfile:1\n"
        "FROM base AS build\nARG A=/run/x B=/run/y\n"
        "RUN make \\\n    all\n"
        "from --platform=linux/amd64 \\\n  # a comment inside the instruction\n  base\nARG A=/run/x B=/run/y\n"
        "COPY --from=build /out /out\n"
    )
    backtick = "# escape=`\nFROM base `\n  AS x\nRUN echo \\\n"
    expected = "# escape=`\nFROM base `\n  AS x\nARG A=1\nRUN echo \\\n"
    assert build_trust.with_trust_args(backtick, {"A": "1"})[0] == expected
    assert build_trust.with_trust_args(dockerfile, {}) == (dockerfile, 0)


def test_staged_files_and_mounts(tmp_path: Path) -> None:
    trust = _trust(tmp_path, {"PIP_INDEX_URL": "https://pypi.corp/simple"})
    scratch = tmp_path / "scratch"
    with build_trust.staged(trust, scratch) as mounts:
        assert mounts.before == ["--default-mounts-file", str(scratch / "mounts.conf")]
        assert (scratch / "mounts.conf").read_text() == f"{scratch / 'subscription'}:{build_trust.TRUST_DIR}\n"
        assert list((scratch / "subscription").iterdir()) == []
        assert mounts.after == ["-v", f"{scratch / 'ca.pem'}:{build_trust.BUNDLE}:ro",
                                "-v", f"{scratch / 'pip.conf'}:{build_trust.PIP_CONF}:ro"]  # fmt: skip
        assert (scratch / "ca.pem").read_bytes() == trust.bundle
    assert not scratch.exists()


def test_build_config(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert cfg.build == build_trust.BuildSettings(host_trust=True, ca_files=(), args={})
    path = tmp_path / "c.toml"
    path.write_text('[build]\nhost_trust = false\nca_files = ["corp.pem"]\nargs = { APP_ENV = "prod" }\n')
    cfg = load_config(path)
    assert not cfg.build.host_trust and cfg.build.ca_files == (Path.cwd() / "corp.pem",)
    assert cfg.build.args == {"APP_ENV": "prod"}
    for text, message in [("ca_files = \"x\"", "build.ca_files: must be a list of paths"),
                          ("args = { \"1x\" = \"y\" }", "build.args: '1x' is not a build argument name"),
                          ("args = [\"x\"]", "build.args: must be a table"),
                          ("hosttrust = true", "build.hosttrust: unknown key")]:  # fmt: skip
        path.write_text(f"[build]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def _follow(lines: list[str], trust: build_trust.HostTrust | None, added: int = 1) -> tuple[BuildLog, list[str]]:
    shown: list[str] = []
    log = BuildLog(shown.append, trust, added)
    for line in lines:
        log(line)
    return log, shown


HIDDEN = f"ARG SSL_CERT_FILE={build_trust.BUNDLE} PIP_CERT={build_trust.BUNDLE}"


def test_added_steps_are_hidden_and_steps_numbered_as_written(tmp_path: Path) -> None:
    trust = _trust(tmp_path)
    log, shown = _follow([
        "[1/2] STEP 1/3: FROM base AS build", f"[1/2] STEP 2/3: {HIDDEN}", "--> abc", "[1/2] STEP 3/3: RUN make",
        "making", "--> def", "[2/2] STEP 1/3: FROM base", f"[2/2] STEP 2/3: {HIDDEN}", "--> Using cache 123",
        "[2/2] STEP 3/3: COPY --from=build /out /out", "--> Using cache 456", "COMMIT localhost/mvm/build/x",
    ], trust)  # fmt: skip
    assert shown == [
        "      [1/2] STEP 1/2: FROM base AS build", "      [1/2] STEP 2/2: RUN make", "      making", "      --> def",
        "      [2/2] STEP 1/2: FROM base", "      [2/2] STEP 2/2: COPY --from=build /out /out",
        "      --> Using cache 456", "      COMMIT localhost/mvm/build/x",
    ]  # fmt: skip
    assert [(s.number, s.total, s.cached) for s in log.steps] == [(1, 2, False), (2, 2, False), (1, 2, False),
                                                                   (2, 2, True)]  # fmt: skip
    assert log.summary().startswith("step times: 1/2 ") and log.summary().endswith("2/2 cached")


PIP_TLS = [
    "STEP 1/2: FROM base", "STEP 2/2: RUN pip install flask",
    "WARNING: Retrying (Retry(total=4)) after connection broken by 'SSLError(SSLCertVerificationError(1, "
    "'[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in certificate chain "
    "(_ssl.c:992)'))': /simple/flask/",
    "Could not fetch URL https://pypi.org/simple/flask/: There was a problem confirming the ssl certificate: "
    "HTTPSConnectionPool(host='pypi.org', port=443): Max retries exceeded - skipping",
    "ERROR: Could not find a version that satisfies the requirement flask (from versions: none)",
    "ERROR: No matching distribution found for flask",
    "subprocess exited with status 1", 'Error: building at STEP "RUN pip install flask": exit status 1',
]  # fmt: skip


def test_a_tls_failure_names_the_registry_the_proxy_and_a_hint(tmp_path: Path) -> None:
    log, _ = _follow(PIP_TLS, None, 0)
    assert log.explain("exit 1") == (
        "image build: STEP 2/2 `RUN pip install flask` failed: could not reach pypi.org with no proxy "
        "(--no-host-trust): its TLS certificate is not trusted (CERTIFICATE_VERIFY_FAILED); "
        "the host trusts it: build without --no-host-trust"
    )
    log, _ = _follow(PIP_TLS, _trust(tmp_path, {"HTTPS_PROXY": "http://proxy.corp:3128"}), 0)
    assert "through proxy http://proxy.corp:3128" in log.explain("x") and "build.ca_files" in log.explain("x")


def test_other_causes(tmp_path: Path) -> None:
    trust = _trust(tmp_path, {"HTTPS_PROXY": "http://127.0.0.1:9"})
    proxy = ["STEP 2/2: RUN pip install flask", "WARNING: Retrying after connection broken by "
             "'ProxyError('Cannot connect to proxy.', NewConnectionError('...: [Errno 111] Connection refused'))': "
             "/simple/flask/", "ERROR: No matching distribution found for flask"]  # fmt: skip
    assert _follow(proxy, trust, 0)[0].explain("x") == (
        "image build: STEP 2/2 `RUN pip install flask` failed: could not reach pypi.org through proxy "
        "http://127.0.0.1:9: the proxy cannot be reached (ProxyError); check HTTPS_PROXY"
    )
    missing = ["STEP 3/3: RUN pip install no-such-pkg", "ERROR: Could not find a version that satisfies the "
               "requirement no-such-pkg (from versions: none)", "ERROR: No matching distribution found for no-such-pkg"]
    assert _follow(missing, trust, 0)[0].explain("x").endswith(
        "failed: the registry pypi.org has no distribution of no-such-pkg (pip: no matching distribution)"
    )
    npm_404 = ["STEP 2/2: RUN npm install nope-xyz", "npm ERR! code E404",
               "npm ERR! 404 Not Found - GET https://registry.npmjs.org/nope-xyz - Not found"]  # fmt: skip
    assert _follow(npm_404, trust, 0)[0].explain("x").endswith(
        "failed: the registry answered 404 Not Found for https://registry.npmjs.org/nope-xyz"
    )
    lockless = ["STEP 4/6: RUN npm ci", "npm ERR! code EUSAGE", "npm ERR!",
                "npm ERR! The `npm ci` command can only install with an existing package-lock.json or",
                "npm ERR! npm-shrinkwrap.json with lockfileVersion >= 1.", "npm ERR!", "npm ERR! Clean install",
                "subprocess exited with status 1", 'Error: building at STEP "RUN npm ci": exit status 1']  # fmt: skip
    assert _follow(lockless, trust, 0)[0].explain("x") == (
        "image build: STEP 4/6 `RUN npm ci` failed (exit 1): npm: The `npm ci` command can only install with an "
        "existing package-lock.json or npm-shrinkwrap.json with lockfileVersion >= 1."
    )
    dns = ["STEP 2/2: RUN curl https://nowhere.example/", "curl: (6) Could not resolve host: nowhere.example"]
    assert "could not reach nowhere.example with no proxy: its name does not resolve" in _follow(dns, _trust(
        tmp_path), 0)[0].explain("x")  # fmt: skip
    plain = ["STEP 2/2: RUN false", 'Error: building at STEP "RUN false": exit status 1']
    assert _follow(plain, None, 0)[0].explain("x") == "image build: STEP 2/2 `RUN false` failed (exit 1): no output"


def _layout(tmp_path: Path, layer: bytes) -> Path:
    """A minimal OCI layout with one image: a config blob and one layer blob."""
    import hashlib

    layout = tmp_path / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = put(json.dumps({"config": {"Cmd": ["x"], "ExposedPorts": {"80/tcp": {}}}}).encode())
    manifest = put(json.dumps({"config": config, "layers": [put(layer)]}).encode())
    (layout / "index.json").write_text(json.dumps({"manifests": [manifest]}))
    return layout


def test_blob_digests_and_sizes_are_checked(tmp_path: Path) -> None:
    layout = _layout(tmp_path, b"layer bytes")
    oci.check_blobs(layout)
    layer = next(p for p in (layout / "blobs" / "sha256").iterdir() if p.read_bytes() == b"layer bytes")
    layer.write_bytes(b"layer bytez")
    with pytest.raises(InvalidRequest, match=rf"image blob sha256:{layer.name} does not match its digest"):
        oci.check_blobs(layout)
    layer.unlink()
    with pytest.raises(InvalidRequest, match=rf"image blob sha256:{layer.name} is missing"):
        oci.check_blobs(layout)
