#!/bin/sh
# Fetch the Reflex workflow OCA rules ESO ships in its pipelines' source packages
# (Debian source packages cpl-plugin-{hawki,muse,uves}) into DEST, keeping only the
# reflex/*.oca files. Nothing is installed: a private apt configuration with a
# deb-src line downloads the sources into a temporary directory.
# Usage: tests/oca/fetch-reflex-rules.sh DEST
set -eu
dest=${1:?usage: $0 DEST}
suite=${OCA_DEBIAN_SUITE:-bookworm}
# The machine's own Debian mirror (its first deb822 URIs or sources.list line), unless given.
machine_mirror() {
    { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
      grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } | grep -v security | head -n 1
}
mirror=${OCA_DEBIAN_MIRROR:-$(machine_mirror)}
[ -n "$mirror" ] || { echo "no Debian mirror configured; set OCA_DEBIAN_MIRROR" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/src" "$dest"
echo "deb-src $mirror $suite main" > "$tmp/sources.list"
set -- -o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root
apt-get "$@" -qq update
cd "$tmp/src"
for pkg in cpl-plugin-hawki cpl-plugin-muse cpl-plugin-uves; do
    # the .orig tarball is what carries reflex/; a missing Debian diff does not matter
    apt-get "$@" -qq source --download-only "$pkg" >/dev/null 2>&1 || true
done
found=0
for tarball in *.orig.tar.*; do
    [ -e "$tarball" ] || continue
    tar -xf "$tarball" --wildcards --no-anchored 'reflex/*.oca' 2>/dev/null || true
done
for f in $(find . -path '*/reflex/*.oca' | sort); do
    pipe=$(echo "$f" | sed 's|^\./||; s|-[0-9][^/]*/.*||')
    cp "$f" "$dest/${pipe}_$(basename "$f")"
    found=$((found + 1))
done
[ "$found" -gt 0 ] || { echo "no reflex/*.oca found" >&2; exit 1; }
ls "$dest"
