#!/usr/bin/env bash
# Make the Debian bookworm base image of the preimg images without a registry:
# debootstrap a minimal root file system with Python 3.11 and import it.
#
#   docker/base-image.sh            # prints the image reference on stdout
#
# The tag is a key of what makes the image: this script, the suite and the
# month (so the base picks up Debian's security updates at least monthly;
# PREIMG_BASE_EPOCH overrides). An image with that tag already in the
# engine's storage is reused; otherwise the debootstrap tarball cached under
# PREIMG_BASE_CACHE (outside the clone, default /var/cache/preimg) is
# imported; otherwise debootstrap runs (needs root and a Debian mirror:
# PREIMG_DEBIAN_MIRROR, default http://deb.debian.org/debian).
# A changed script or a new month gives a new key, so a stale base is never used.
set -euo pipefail

ENGINE=${ENGINE:-podman}
SUITE=${PREIMG_BASE_SUITE:-bookworm}
MIRROR=${PREIMG_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${PREIMG_BASE_CACHE:-/var/cache/preimg}
EPOCH=${PREIMG_BASE_EPOCH:-$(date -u +%Y-%m)}
NAME=${PREIMG_BASE_NAME:-localhost/preimg-base}
# python-is-python3: the Dockerfile (and python:3.11-slim) call `python`.
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates

self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
key=$( { cat "$self"; echo "$SUITE $EPOCH $PACKAGES"; } | sha256sum | cut -c1-12)
ref="$NAME:$SUITE-$key"
tarball="$CACHE/$SUITE-$key.tar"
log() { echo "base-image: $*" >&2; }

if $ENGINE image exists "$ref" 2>/dev/null \
   || { [ "$ENGINE" = docker ] && docker image inspect "$ref" >/dev/null 2>&1; }; then
  log "$ref present"
  echo "$ref"
  exit 0
fi

if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || { log "debootstrap not installed (apt-get install debootstrap)"; exit 1; }
  [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
  mkdir -p "$CACHE"
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root" "$tarball.tmp"' EXIT
  log "debootstrap $SUITE from $MIRROR into $root"
  started=$(date +%s)
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >&2
  # Sources for later `apt-get install` in image builds (updates and security too).
  cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SOURCES
  # Like the official images: no recommends, no docs, no caches kept.
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    >"$root/etc/apt/apt.conf.d/90preimg-no-recommends"
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/tmp/* "$root"/root/.cache
  chmod 0755 "$root"  # mktemp made it 0700: as the image's /, it would lock out every non-root user
  tar --numeric-owner --xattrs -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  # Older keys' tarballs are never used again.
  find "$CACHE" -maxdepth 1 -name "$SUITE-*.tar" ! -name "$(basename "$tarball")" -delete
  log "debootstrap took $(( $(date +%s) - started )) s; cached $tarball"
fi

log "importing $tarball as $ref"
$ENGINE import \
  --change 'CMD ["/bin/bash"]' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  "$tarball" "$ref" >&2
echo "$ref"
