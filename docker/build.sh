#!/usr/bin/env bash
# Builds Baker's release binaries and its five images, FROM scratch, with no registry access:
#
#   baker/directory   baker-directory, the `baker` CLI, baker-probe
#   baker/registrar   baker-registrar, baker-probe
#   baker/ambassador  baker-ambassador, HAProxy (/usr/sbin/haproxy), baker-probe
#   baker/greeting    baker-greeting, baker-greeting-client, baker-probe
#   baker/etcd        etcd (/usr/bin/etcd, Debian's etcd-server), baker-probe
#
# Each image holds only its binaries, the shared libraries `ldd` names for them (and the
# dynamic loader), /etc/passwd and /etc/group with a `baker` user (uid/gid 65532), and a
# writable /tmp. Nothing is pulled: the legacy builder is used and there is no base image.
#
# Usage: docker/build.sh [IMAGE...]     (default: all five; e.g. `docker/build.sh greeting`)
#
# Idempotent: when neither the sources nor these files changed, cargo has nothing to do and an
# image whose label baker.context is the digest of its staged files and Dockerfile is not
# built again ("baker/NAME is up to date"), so a second run takes a few seconds. Installs
# nothing except HAProxy (the ambassador image carries the host's HAProxy), etcd-server (the
# etcd image carries the host's etcd) and protoc (the directory's etcd client is generated
# from its .proto files at build time), with apt-get, saying so, when they are missing.
#
# Variables: CARGO_TARGET_DIR (where cargo builds), BAKER_IMAGE_TAG (extra tag, default the
# workspace version), BAKER_HAPROXY (the HAProxy binary to copy, default /usr/sbin/haproxy).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
all_images=(directory registrar ambassador greeting etcd)

die() { printf 'docker/build.sh: error: %s\n' "$*" >&2; exit 1; }
say() { printf '==> %s\n' "$*" >&2; }

images=("$@")
[[ ${#images[@]} -gt 0 ]] || images=("${all_images[@]}")
for image in "${images[@]}"; do
    [[ " ${all_images[*]} " == *" $image "* ]] ||
        die "unknown image '$image' (known: ${all_images[*]})"
done

# --- tools -----------------------------------------------------------------------------------
command -v docker >/dev/null ||
    die "the docker command is missing: install Docker Engine (https://docs.docker.com/engine/install/)"
if ! docker_err=$(docker version --format '{{.Server.APIVersion}}' 2>&1 >/dev/null); then
    die "the Docker engine is not reachable (is it running, may this user use /var/run/docker.sock?):
  $docker_err"
fi
command -v cargo >/dev/null || die "cargo is missing: install Rust with rustup (https://rustup.rs)"
command -v ldd >/dev/null || die "ldd is missing (it comes with the C library's tools, e.g. Debian's libc-bin)"

apt_updated=0
apt_install() {
    local sudo=(); [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    if [[ $apt_updated -eq 0 ]]; then "${sudo[@]}" apt-get update -qq; apt_updated=1; fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if [[ -z ${PROTOC:-} ]] && ! command -v protoc >/dev/null; then
    command -v apt-get >/dev/null ||
        die "protoc is missing (the etcd client is generated with it): install protobuf-compiler or set PROTOC"
    say "protoc is missing and the build needs it for the etcd client: installing protobuf-compiler with apt-get"
    apt_install protobuf-compiler
fi

haproxy=${BAKER_HAPROXY:-/usr/sbin/haproxy}
if [[ " ${images[*]} " == *" ambassador "* && ! -x $haproxy ]]; then
    if [[ -z ${BAKER_HAPROXY:-} ]] && command -v haproxy >/dev/null; then
        haproxy=$(command -v haproxy)
    elif [[ -z ${BAKER_HAPROXY:-} ]] && command -v apt-get >/dev/null; then
        say "HAProxy is missing and the ambassador image carries it: installing it with apt-get"
        apt_install haproxy
    else
        die "HAProxy is missing ($haproxy): install it (Debian/Ubuntu: apt-get install haproxy) or set BAKER_HAPROXY"
    fi
fi
if [[ " ${images[*]} " == *" etcd "* && ! -x /usr/bin/etcd ]]; then
    command -v apt-get >/dev/null ||
        die "etcd is missing (/usr/bin/etcd) and the etcd image carries it: install Debian's etcd-server"
    say "etcd is missing and the etcd image carries it: installing etcd-server with apt-get"
    apt_install etcd-server
fi

# --- binaries --------------------------------------------------------------------------------
declare -A bins=(
    [directory]="baker-directory baker baker-probe"
    [registrar]="baker-registrar baker-probe"
    [ambassador]="baker-ambassador baker-probe"
    [greeting]="baker-greeting baker-greeting-client baker-probe"
    [etcd]="baker-probe"
)
declare -A packages=(
    [baker-directory]=baker-directory [baker]=baker-client [baker-probe]=baker-probe
    [baker-registrar]=baker-registrar [baker-ambassador]=baker-ambassador
    [baker-greeting]=baker-greeting [baker-greeting-client]=baker-greeting-client
)
cargo_args=()
declare -A seen=()
for image in "${images[@]}"; do
    for b in ${bins[$image]}; do
        p=${packages[$b]}
        [[ -n ${seen[$p]:-} ]] && continue
        seen[$p]=1
        cargo_args+=(-p "$p")
    done
done

# The whole workspace's binaries, not only these packages: one feature set for every build, so
# this and `cargo build --release --workspace --bins` (the test command) share their artifacts
# instead of rebuilding each other's.
say "building release binaries (cargo build --release --workspace --bins; images need ${cargo_args[*]})"
(cd "$repo" && cargo build --release --workspace --bins) ||
    die "cargo build failed (see above)"

target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -n $target_dir && -d $target_dir/release ]] || die "cannot find cargo's target directory"
release=$target_dir/release
version=$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"name":"baker-directory","version":"\([^"]*\)".*/\1/p')
tag=${BAKER_IMAGE_TAG:-${version:-latest}}

# --- root file systems -----------------------------------------------------------------------
# Copies $1 to $2/$1's path (following symlinks), keeping the file's mode.
put() {
    local src=$1 root=$2 dest=${3:-$1}
    mkdir -p "$root$(dirname "$dest")"
    cp -L --preserve=mode "$src" "$root$dest"
}

# Copies every shared library `ldd` names for the executable $1 (and the loader) into $2.
put_libs() {
    local exe=$1 root=$2 out line lib
    out=$(ldd "$exe" 2>&1) || die "ldd $exe failed: $out"
    while read -r line; do
        case $line in
            *"=> not found"*) die "$exe needs a library this machine lacks: $line" ;;
            *"=> /"*) lib=${line#*=> }; lib=${lib%% (*} ;;
            /*) lib=${line%% (*} ;;
            *) continue ;; # linux-vdso and friends live in the kernel
        esac
        [[ -e $root$lib ]] || put "$lib" "$root"
    done <<<"$out"
}

stage() {
    local image=$1 root=$2 b
    rm -rf "$root"
    mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp"
    chmod 1777 "$root/tmp"
    for b in ${bins[$image]}; do
        [[ -x $release/$b ]] || die "$release/$b was not built"
        put "$release/$b" "$root" "/usr/local/bin/$b"
        put_libs "$release/$b" "$root"
    done
    if [[ $image == etcd ]]; then
        put /usr/bin/etcd "$root"
        put_libs /usr/bin/etcd "$root"
    fi
    if [[ $image == ambassador ]]; then
        put "$haproxy" "$root" /usr/sbin/haproxy
        put_libs "$haproxy" "$root"
        # glibc loads libgcc_s at run time to unwind threads (pthread_cancel/exit).
        for lib in /lib/x86_64-linux-gnu/libgcc_s.so.1 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1; do
            [[ -e $lib ]] && { [[ -e $root$lib ]] || put "$lib" "$root"; break; }
        done
    fi
    cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
baker:x:65532:65532:baker:/home/baker:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
PASSWD
    cat >"$root/etc/group" <<'GROUP'
root:x:0:
baker:x:65532:
nogroup:x:65534:
GROUP
    printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
}

# The digest of a build context and its Dockerfile: every file's path, mode and content.
context_digest() {
    local ctx=$1 dockerfile=$2
    {
        sha256sum "$dockerfile" | cut -d' ' -f1
        (cd "$ctx" && find . -print0 | LC_ALL=C sort -z |
            xargs -0 stat -c '%n %a %F' && find . -type f -print0 | LC_ALL=C sort -z |
            xargs -0 sha256sum)
    } | sha256sum | cut -d' ' -f1
}

stage_dir=$target_dir/docker
for image in "${images[@]}"; do
    ctx=$stage_dir/$image
    rm -rf "$ctx" && mkdir -p "$ctx"
    stage "$image" "$ctx/rootfs"
    # An empty directory, copied by the Dockerfiles with --chown to make the `baker` user's
    # writable directories (/var/lib/baker, /run/baker).
    mkdir -p "$ctx/empty"
    # An image built from this very context is up to date: it is only tagged again.
    digest=$(context_digest "$ctx" "$here/$image.Dockerfile")
    built=$(docker image inspect --format '{{index .Config.Labels "baker.context"}}' \
        "baker/$image:latest" 2>/dev/null || true)
    if [[ $built == "$digest" ]]; then
        say "baker/$image is up to date"
        docker tag "baker/$image:latest" "baker/$image:$tag"
        continue
    fi
    say "building image baker/$image"
    if ! out=$(DOCKER_BUILDKIT=0 docker build -q -f "$here/$image.Dockerfile" \
        --label "baker.context=$digest" \
        -t "baker/$image:latest" -t "baker/$image:$tag" "$ctx" 2>&1); then
        printf '%s\n' "$out" >&2
        die "docker build of baker/$image failed"
    fi
done

# --- report ----------------------------------------------------------------------------------
for image in "${images[@]}"; do
    docker image inspect --format "baker/$image:latest {{.Id}} {{.Size}}" "baker/$image:latest" |
        awk '{ printf "%-24s %s  %.1f MB\n", $1, substr($2, 8, 12), $3 / 1000000 }'
done
