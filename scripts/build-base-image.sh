#!/usr/bin/env bash
# Makes the base image Norm's docker/Dockerfile builds on, without pulling anything from an image
# registry: a minimal Debian 12 (bookworm) root filesystem with python3 (3.11) and python3-venv, made
# by debootstrap from the Debian mirror this machine's apt is configured with, then `docker import`ed.
#
#   scripts/build-base-image.sh [-H DOCKER_HOST] [-t TAG] [--tarball-only]
#
# The root filesystem tarball is cached under /var/cache/norm (NORM_CACHE_DIR), keyed by the hash of
# this script and the mirror, so that a second run only imports it. A fresh machine builds it once.
# Prints the tarball path (--tarball-only) or the image tag as its last line.
set -euo pipefail

TAG=norm/base:bookworm
DOCKER_HOST_ARG=${DOCKER_HOST:-}
TARBALL_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    -H) DOCKER_HOST_ARG=$2; shift 2 ;;
    -t) TAG=$2; shift 2 ;;
    --tarball-only) TARBALL_ONLY=1; shift ;;
    *) echo "usage: $0 [-H DOCKER_HOST] [-t TAG] [--tarball-only]" >&2; exit 2 ;;
  esac
done

SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
CACHE_DIR=${NORM_CACHE_DIR:-/var/cache/norm}

# The mirror apt uses here: the first deb822 source carrying the suite, then sources.list.
mirror() {
  if [ -n "${NORM_DEBIAN_MIRROR:-}" ]; then echo "$NORM_DEBIAN_MIRROR"; return; fi
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    uri=$(awk -v suite="$SUITE" '
      BEGIN { RS=""; FS="\n" }
      {
        u=""; s=""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/)   { u=$i; sub(/^URIs:[ \t]*/, "", u); split(u, a, /[ \t]+/); u=a[1] }
          if ($i ~ /^Suites:/) { s=" " $i " " }
        }
        if (u != "" && s ~ (" " suite " ")) { print u; exit }
      }' "$f")
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  uri=$(awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

MIRROR=$(mirror)
KEY=$( { cat "$0"; echo "$MIRROR $SUITE $PACKAGES $(dpkg --print-architecture)"; } | sha256sum | cut -c1-16)
TARBALL="$CACHE_DIR/base-$SUITE-$KEY.tar"

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/base-$SUITE.lock"
flock 9  # one builder at a time; the others find the tarball made

if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || { echo "debootstrap is missing (scripts/bootstrap.sh installs it)" >&2; exit 1; }
  echo "build-base-image: debootstrap $SUITE from $MIRROR (cold, a few minutes)" >&2
  work=$(mktemp -d "$CACHE_DIR/.build-XXXXXX")
  cleanup() {
    # debootstrap mounts proc and sys inside the target; never leave them behind.
    for m in $(awk -v r="$work/" 'index($5, r) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do
      umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$work"
  }
  trap cleanup EXIT
  root="$work/rootfs"
  if ! debootstrap --variant=minbase --include="$PACKAGES" --merged-usr \
       "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.out" 2>&1; then
    tail -n 40 "$work/debootstrap.out" >&2
    tail -n 40 "$root/debootstrap/debootstrap.log" >&2 2>/dev/null || true
    exit 1
  fi
  # An image needs neither package caches and lists nor device nodes (the engine makes /dev), nor
  # manuals and translations (licences stay).
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* \
         "$root"/dev/* "$root"/tmp/* "$root"/run/* "$root"/debootstrap \
         "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
  find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  echo "$SUITE" > "$root/etc/debian_chroot"
  tar --numeric-owner --xattrs -C "$root" -cf "$work/rootfs.tar" .
  mv "$work/rootfs.tar" "$TARBALL"
  # Older tarballs of this cache are from earlier versions of this script.
  find "$CACHE_DIR" -maxdepth 1 -name "base-$SUITE-*.tar" ! -name "$(basename "$TARBALL")" -delete
fi

if [ "$TARBALL_ONLY" = 1 ]; then
  echo "$TARBALL"
  exit 0
fi

DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker)
args=()
[ -n "$DOCKER_HOST_ARG" ] && args=(-H "$DOCKER_HOST_ARG")
"$DOCKER" "${args[@]}" import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV LANG=C.UTF-8' \
  -c 'CMD ["/bin/bash"]' \
  -m "debootstrap --variant=minbase $SUITE + $PACKAGES ($KEY)" \
  "$TARBALL" "$TAG" >/dev/null
echo "$TAG"
