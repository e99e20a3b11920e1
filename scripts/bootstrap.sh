#!/usr/bin/env bash
# Installs what Norm's tests, sandbox and demo need, and nothing twice:
# Debian packages (etcd, Docker engine, registry, busybox, debootstrap, HAProxy, Prometheus) and the
# virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(etcd-server etcd-client docker.io docker-registry busybox-static debootstrap
              systemd dbus iproute2 iptables openssl python3 util-linux faketime haproxy prometheus)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
stamp=.venv/.norm-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: preparing .venv"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' 2>&1 \
    | grep -v "is neither a file nor a directory" || true
  .venv/bin/python -c "import norm, aetcd, dbus_fast, structlog" # fails loudly if the install did not take
  echo "$want" > "$stamp"
fi
