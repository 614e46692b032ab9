#!/usr/bin/env bash
# `make images`: the preimg images (service, processor) and the Debian RabbitMQ
# of the stack test, tagged <version>-g<commit> (and :dev).
#
# Engine: podman where installed (with docker/podman/*.conf), else docker.
# Base: PYTHON_IMAGE when set; with podman, else, the bookworm image
# docker/base-image.sh makes with debootstrap (no registry needed); with
# docker, else, python:3.11-slim-bookworm from the registry.
# The project's wheels (and its dependencies') are built here, on the host, into
# dist/wheels, and the image installs them with pip --no-index.
#
# Prints the built references, one `name=reference` a line, to
# dist/images.env (read by docker/stack-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
log() { echo "images: $*" >&2; }

if [ -n "${ENGINE:-}" ]; then :
elif command -v podman >/dev/null; then ENGINE=podman
elif command -v docker >/dev/null; then ENGINE=docker
else log "neither podman nor docker is installed (apt-get install podman buildah)"; exit 1
fi
export ENGINE
if [ "$ENGINE" = podman ]; then
  . docker/podman/env.sh
  BUILD_FLAGS=(--format docker --layers)
else
  BUILD_FLAGS=()
fi

version=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
tag="$version-g${revision:0:12}"
if [ "$revision" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no -- shared services pyproject.toml docker)" ]; then
  tag="$tag-dirty"
fi

if [ -z "${PYTHON_IMAGE:-}" ]; then
  if [ "$ENGINE" = podman ]; then PYTHON_IMAGE=$(docker/base-image.sh)
  else PYTHON_IMAGE=python:3.11-slim-bookworm
  fi
fi
log "engine $ENGINE, base $PYTHON_IMAGE, tag $tag"

# Wheels: dependencies (reused while pyproject.toml is unchanged) and the project.
started=$(date +%s)
mkdir -p dist/wheels
deps_key=$(sha256sum pyproject.toml | cut -c1-12)
if [ "$(cat dist/wheels/.deps-key 2>/dev/null)" != "$deps_key" ]; then
  rm -rf dist/wheels/deps
  "$PY" -m pip wheel -q --wheel-dir dist/wheels/deps \
    $("$PY" -c 'import tomllib; print(" ".join(repr(d)[1:-1] for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
  echo "$deps_key" > dist/wheels/.deps-key
fi
rm -rf dist/wheels/preimg build
"$PY" -m pip wheel -q --no-deps --wheel-dir dist/wheels/preimg .
rm -rf build
log "wheels in $(( $(date +%s) - started )) s: $(ls dist/wheels/deps | wc -l) dependencies + $(ls dist/wheels/preimg)"

build() {  # name target context [dockerfile] [build-arg...]
  local name=$1 target=$2 context=$3 dockerfile=$4; shift 4
  local t0; t0=$(date +%s)
  $ENGINE build "${BUILD_FLAGS[@]}" -f "$dockerfile" ${target:+--target "$target"} \
    --build-arg PREIMG_VERSION="$version" --build-arg PREIMG_REVISION="$revision" "$@" \
    -t "localhost/$name:$tag" -t "localhost/$name:dev" "$context" >&2
  log "$name built in $(( $(date +%s) - t0 )) s"
  echo "$name=localhost/$name:$tag"
}

{
  build preimg service . docker/Dockerfile --build-arg PYTHON_IMAGE="$PYTHON_IMAGE"
  build preimg-processor processor . docker/Dockerfile --build-arg PYTHON_IMAGE="$PYTHON_IMAGE"
  build preimg-rabbitmq "" docker/rabbitmq docker/rabbitmq/Dockerfile --build-arg BASE_IMAGE="$PYTHON_IMAGE"
} > dist/images.env.tmp
mv dist/images.env.tmp dist/images.env

# Storage is reused between runs (CI on the same machine): drop what this build superseded
# (older tags of these images, other bases) and build-cache layers unused for a week.
# Not all dangling images: the intermediate ones are the layer cache of the next build.
if [ "$ENGINE" = podman ]; then
  keep=" $(cut -d= -f2 dist/images.env | tr '\n' ' ') $PYTHON_IMAGE "
  for repo in localhost/preimg localhost/preimg-processor localhost/preimg-rabbitmq localhost/preimg-base; do
    for ref in $(podman images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$repo"); do
      case "$keep" in *" $ref "*) ;; *) [ "${ref##*:}" = dev ] || podman rmi "$ref" >/dev/null 2>&1 || true ;; esac
    done
  done
  podman image prune -f --filter until=168h >/dev/null 2>&1 || true
fi
# Image ids/digests, for pinning (k8s/kustomization.yaml pins the pushed images by digest).
while IFS== read -r name ref; do
  echo "$name $($ENGINE image inspect --format '{{.Digest}}' "$ref" 2>/dev/null || true)"
done < dist/images.env > dist/images.digests
cat dist/images.env
