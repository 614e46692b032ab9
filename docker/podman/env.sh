# Source this to point podman/buildah at the project's settings:
#   . docker/podman/env.sh
_preimg_podman_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF="$_preimg_podman_dir/containers.conf"
export CONTAINERS_STORAGE_CONF="$_preimg_podman_dir/storage.conf"
unset _preimg_podman_dir
