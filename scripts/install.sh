#!/usr/bin/env bash
# Install everything microvm-edge needs on Debian 12, idempotently: apt packages, the
# Python venv, the guest image (built from Debian packages) and a dev TLS certificate.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "microvm-edge needs root (network namespaces, taps, QEMU): run this as root" >&2
    exit 1
fi

APT_PACKAGES=(
    qemu-system-x86 qemu-utils busybox-static kmod cpio iproute2 gcc libc6-dev
    python3 python3-venv openssl ca-certificates
    buildah skopeo umoci mmdebstrap e2fsprogs   # Dockerfiles and OCI archives -> root disks
    nginx-light wrk curl   # benchmarks: nginx baseline, load generator, streaming
    nghttp2-client         # h2load: the HTTP/2 benchmark (bench/h2_bench.py)
    libnghttp2-14          # the edge's HTTP/2: its session and HPACK (edge/nghttp2_session.py, edge/hpack_native.py, through ctypes)
    chromium               # the shell page's test in a real (headless) browser
    postgresql             # the shared catalog's tests run a throwaway server (initdb, pg_ctl)
    xfsprogs               # reflinked RAM files: the e2e test makes a loop-mounted XFS (mkfs.xfs)
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
# The image build downloads the kernel .deb with apt, so the package indexes must exist.
if [ ${#missing[@]} -gt 0 ] || ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
    echo "==> apt: installing ${missing[*]:-(package lists only)}"
    apt-get update -qq
    [ ${#missing[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Edge workers parse untrusted HTTP: once their port and keys are open they drop to this user.
if ! id -u mvm-edge >/dev/null 2>&1; then
    echo "==> user: adding the system user mvm-edge (server.worker_user)"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mvm-edge
fi
# The benchmarks start their own nginx; the package's default site must not hold port 80.
if systemctl is-active --quiet nginx 2>/dev/null; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi

# Debian's own python3: its standard library is readable by the unprivileged edge workers, which
# import from it after they drop root (an interpreter under a private home directory is not).
if [ -f .venv/pyvenv.cfg ] && ! grep -qx "home = /usr/bin" .venv/pyvenv.cfg; then
    echo "==> venv: remaking it on /usr/bin/python3"
    rm -rf .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "==> venv: installing Python dependencies"
    /usr/bin/python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi

# The web console's front-end: xterm.js and its fit add-on from the npm registry, exactly as
# console/package-lock.json pins them (edge/console.py serves them from console/node_modules;
# nothing is fetched from a CDN at run time). A host with NodeSource's nodejs has npm already.
command -v npm >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm
stamp="console/node_modules/.installed-$(sha256sum console/package-lock.json | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "==> console: npm ci (xterm.js, pinned in console/package-lock.json)"
    (cd console && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    touch "$stamp"
fi

inputs=$(cat images/demo/* vmm/image_spec.py vmm/initramfs.py | sha256sum | cut -c1-16)
if [ "$(cat var/images/demo/.inputs 2>/dev/null)" != "$inputs" ]; then
    echo "==> image: building the demo guest image"
    .venv/bin/mvm image build images/demo/image.toml
    echo "$inputs" > var/images/demo/.inputs
fi

# The Debian base image for `FROM localhost/mvm/debian:bookworm` (mmdebstrap; a no-op once this version,
# a hash of its package list in vmm/oci.py, is made; an older one is made again),
# then the Dockerfile examples, each rebuilt when its inputs change (buildah's layer cache in
# var/containers makes a rebuild after an app change skip the apt, pip and npm steps):
# python-sandbox (stdlib only), flask-app (Flask + gunicorn from PyPI, a model loaded at import),
# node-app (Express from npm, `npm ci` from its lock file), grpc-app (grpcio from PyPI, an h2c port).
.venv/bin/mvm image base
base_version=$(.venv/bin/python -c 'from vmm.oci import base_version; print(base_version())')
for app in python-sandbox flask-app node-app grpc-app; do
    inputs=$( (cat "images/$app"/* guest/init/* guest/stage1/* vmm/disk_image.py vmm/oci.py vmm/build_trust.py; \
        echo "base $base_version") | sha256sum | cut -c1-16)
    if [ "$(cat "var/images/$app/.inputs" 2>/dev/null)" != "$inputs" ]; then
        echo "==> image: building images/$app/Dockerfile"
        .venv/bin/mvm image build --dockerfile "images/$app/Dockerfile" --name "$app"
        echo "$inputs" > "var/images/$app/.inputs"
    fi
done

if [ ! -f var/tls/dev.crt ]; then
    .venv/bin/mvm dev-cert --config configs/dev.toml
fi
# The state directory holds the registry, TLS key and every VM's files: nobody else may read it
# (a host with jail.enabled refuses to start otherwise).
chmod 700 var
echo "==> installed"
