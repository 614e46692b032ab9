#!/bin/sh
# Fetch the Gasgano OCA rule files shipped by Debian's ESO pipeline packages into DEST,
# without installing the packages (apt-get download + dpkg -x in a temporary directory).
# Packages whose rule file is already in DEST are skipped. Needs `apt-get update` done.
#
#   scripts/fetch-oca-rules.sh .cache/oca-rules
set -eu

DEST=${1:?usage: $0 DEST}
PIPELINES="hawki vimos amber giraf muse naco uves visir"

mkdir -p "$DEST"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
# apt's download sandbox user (_apt) must be able to write the directory.
chmod 0777 "$work"

for pipe in $PIPELINES; do
    if [ -s "$DEST/$pipe.oca" ]; then
        continue
    fi
    (cd "$work" && apt-get download -q "cpl-plugin-$pipe" >/dev/null)
    deb=$(ls "$work"/cpl-plugin-"$pipe"_*.deb | head -n 1)
    dpkg -x "$deb" "$work/$pipe"
    oca=$(find "$work/$pipe" -name "$pipe.oca" -path '*gasgano*' | head -n 1)
    if [ -z "$oca" ]; then
        echo "$0: cpl-plugin-$pipe has no $pipe.oca" >&2
        exit 1
    fi
    cp "$oca" "$DEST/$pipe.oca.tmp"
    mv "$DEST/$pipe.oca.tmp" "$DEST/$pipe.oca"
    echo "fetched $pipe.oca from $(basename "$deb")"
done
