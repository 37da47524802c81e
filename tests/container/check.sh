#!/usr/bin/env bash
# tests/container/check.sh [BUILD_DIR] -- build the eplbd image from the repo's
# Dockerfile with podman, run it, and check it from the host with the host's
# BUILD_DIR/eplbctl: health, RegisterModel of a wrapped MoE handle, data kept
# on the volume across a restart, a clean exit on SIGTERM within the drain
# time, and no container left behind.
#
# Everything podman writes lives under BUILD_DIR/container/ (storage,
# run state, temp files, the debootstrap'd base image tarball), so a rerun
# reuses the base and the builder's cached layers. Installs podman, runc and
# debootstrap with apt when missing. When containers cannot run here it says
# why and reports "0 passed, 0 failed, 1 skipped".
#
# Environment: EPLB_CONTAINER_BUILD_TIMEOUT (s, default 1500) bounds the image
# build; EPLB_KEEP_IMAGE=0 removes the built image at the end.
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-build}
case $build in /*) ;; *) build=$root/$build ;; esac
work=$build/container
image=localhost/eplbd:check
base_tar=$work/base/debian-bookworm-minbase.tar
drain_ms=10000
build_timeout=${EPLB_CONTAINER_BUILD_TIMEOUT:-1500}

passed=0 failed=0
say() { printf 'container: %s\n' "$*"; }
pass() { passed=$((passed + 1)); printf 'PASS %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'FAIL %s\n' "$*"; }
skip() {
    printf 'SKIP container image check: %s\n' "$*"
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
}
finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
}

# ---- prerequisites -------------------------------------------------------
[ "$(id -u)" -eq 0 ] || skip "needs root (rootful podman; rootless needs subuid/subgid setup)"
ctl=$build/eplbctl
[ -x "$ctl" ] || { fail "host client $ctl missing: build the project first"; finish; }

need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || skip "podman/runc/debootstrap missing and no apt-get"
    say "installing ${need[*]}"
    install() {
        timeout 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${need[@]}" >/dev/null 2>&1
    }
    install || { timeout 300 apt-get update -qq >/dev/null 2>&1; install; } \
        || skip "could not install ${need[*]} with apt"
fi

# The Debian archive this machine uses (no host name is written anywhere).
. "$root/scripts/apt-archive.sh"

# ---- podman confined to $work ---------------------------------------------
mkdir -p "$work"/{storage,run,tmp,libpod,networks,base}
cat >"$work/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "$work/libpod"
volume_path = "$work/storage/volumes"

[network]
network_config_dir = "$work/networks"
EOF
cat >"$work/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$work/storage"
runroot = "$work/run"
EOF
export CONTAINERS_CONF=$work/containers.conf
export CONTAINERS_STORAGE_CONF=$work/storage.conf
export TMPDIR=$work/tmp
pm() { timeout "${PM_TIMEOUT:-120}" podman "$@"; }

# containers/image keeps root's blob-info cache in /var/lib/containers/cache
# whatever the storage settings: remove it again if this run created it.
[ -e /var/lib/containers ] && had_varlib=1 || had_varlib=0
tidy_host() {
    if [ "$had_varlib" = 0 ] && [ -d /var/lib/containers ]; then
        rm -f /var/lib/containers/cache/blob-info-cache-v1.boltdb
        rmdir /var/lib/containers/cache /var/lib/containers 2>/dev/null
    fi
    return 0
}
trap tidy_host EXIT

if ! pm info >"$work/info.log" 2>&1; then
    # Kernels without overlay support for this file system: fall back to vfs.
    sed -i 's/^driver = .*/driver = "vfs"/' "$work/storage.conf"
    pm info >"$work/info.log" 2>&1 || skip "podman cannot start here: $(tail -1 "$work/info.log")"
fi
say "podman $(podman --version | awk '{print $3}'), storage $(podman info --format '{{.Store.GraphDriverName}}' 2>/dev/null) in $work"

# ---- local base image: debootstrap minbase, cached --------------------------
if ! pm image exists localhost/debian:bookworm; then
    if [ ! -s "$base_tar" ]; then
        mirror=$(archive_uri) || mirror=""
        [ -n "$mirror" ] || skip "no Debian archive found in the apt sources for debootstrap"
        say "debootstrap --variant=minbase bookworm (cached in $base_tar)"
        rootfs=$work/base/rootfs
        rm -rf "$rootfs"
        if ! timeout 600 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/base/debootstrap.log" 2>&1; then
            rm -rf "$rootfs"
            skip "debootstrap failed (archive unreachable?): $(tail -1 "$work/base/debootstrap.log")"
        fi
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" --numeric-owner -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
        rm -rf "$rootfs"
    fi
    pm import -q --change 'CMD ["/bin/bash"]' "$base_tar" localhost/debian:bookworm >/dev/null \
        || skip "podman import of the base image failed"
fi
# FROM debian:bookworm must resolve locally, never from a registry.
pm tag localhost/debian:bookworm docker.io/library/debian:bookworm

if ! pm run --rm --network host localhost/debian:bookworm true >"$work/run-probe.log" 2>&1; then
    skip "podman cannot run a container here: $(tail -1 "$work/run-probe.log")"
fi

# ---- build -----------------------------------------------------------------
say "building $image from Dockerfile (log: $work/build.log)"
t0=$SECONDS
# The builder stage is tagged too, so that its cached layers survive the prune
# of earlier builds' layers below (they would fill the disk otherwise).
build() {
    PM_TIMEOUT=$build_timeout pm build --format docker --pull=never --network host \
        -f "$root/Dockerfile" "$@" "$root" >>"$work/build.log" 2>&1
}
: >"$work/build.log"
if build --target builder -t localhost/eplbd-builder:check && build -t "$image"; then
    pass "image builds from the repo's Dockerfile ($((SECONDS - t0)) s)"
else
    tail -30 "$work/build.log"
    fail "image build (see $work/build.log)"
    finish
fi
pm image prune -f >/dev/null 2>&1
size=$(podman image inspect --format '{{.Size}}' "$image")
say "image size $((size / 1000000)) MB ($size bytes)"
echo "$size" >"$work/image-size"

cfg=$(podman image inspect --format '{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{.Config.User}} {{json .Config.Volumes}} {{json .Config.ExposedPorts}}' "$image")
case $cfg in
    '["eplbd"] ["--listen","0.0.0.0:50051","--data-dir","/var/lib/eplbd"] 10001:10001 {"/var/lib/eplbd":{}} {"50051/tcp":{}}')
        pass "image config: entrypoint eplbd, default flags, user 10001, volume, port" ;;
    *) fail "image config: $cfg" ;;
esac
if pm run --rm --network none --entrypoint /bin/sh "$image" -c \
        'test "$(id -u)" = 10001 && ! command -v gcc && ! command -v cmake && ! test -d /usr/include/grpc' \
        >/dev/null 2>&1; then
    pass "runtime runs as uid 10001 and has no toolchain or headers"
else
    fail "runtime image user or contents"
fi

# ---- run: host network, a free loopback port ---------------------------------
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
addr=127.0.0.1:$port
name=eplbd-check-$$
vol=eplbd-check-data-$$
cleanup() {
    podman rm -f -t 0 "$name" >/dev/null 2>&1
    podman volume rm -f "$vol" >/dev/null 2>&1
    tidy_host
}
trap cleanup EXIT

start() {
    pm run -d --name "$name" --network host -v "$vol:/var/lib/eplbd" "$image" \
        --listen "$addr" --data-dir /var/lib/eplbd --drain-ms "$drain_ms" >/dev/null
}
wait_serving() {
    local i
    for i in $(seq 1 50); do
        "$ctl" --addr "$addr" --timeout 1 health 2>/dev/null | grep -q '"SERVING"' && return 0
        sleep 0.2
    done
    return 1
}
# SIGTERM, then the exit status and how long the drain took.
stop() {
    local t0=$SECONDS rc
    podman kill --signal TERM "$name" >/dev/null || return 1
    rc=$(timeout $((drain_ms / 1000 + 5)) podman wait "$name") || { echo "did not exit within the drain time"; return 1; }
    echo "exit $rc after $((SECONDS - t0)) s"
    [ "$rc" = 0 ] && [ $((SECONDS - t0)) -le $((drain_ms / 1000)) ]
}

if start && wait_serving; then
    pass "container serves grpc.health.v1 Health/Check on $addr (host eplbctl)"
else
    fail "container did not become SERVING on $addr"
    podman logs "$name" 2>&1 | tail -20
    finish
fi

request='{"model_name":"kimi","model":{"architecture":"KimiK25ForConditionalGeneration","interfaces":["SUPPORTS_MULTIMODAL"],"language_model":{"architecture":"DeepseekV3ForCausalLM","interfaces":["MIXTURE_OF_EXPERTS"],"moe":{"num_moe_layers":2,"num_logical_experts":4,"num_physical_experts":6,"num_local_physical_experts":3,"num_redundant_experts":2}}},"parallel":{"enable_eplb":true,"ep_size":2}}'
out=$("$ctl" --addr "$addr" --timeout 5 register "$request" 2>&1)
if grep -q '"registered": *true' <<<"$out" \
        && grep -q '"resolved_path": *"KimiK25ForConditionalGeneration.language_model"' <<<"$out"; then
    pass "RegisterModel of the wrapped MoE handle: registered, resolved_path"
else
    fail "RegisterModel: $out"
fi
if podman exec "$name" test -s /var/lib/eplbd/eplbd.db; then
    pass "database written to the volume /var/lib/eplbd/eplbd.db"
else
    fail "no database on the volume"
fi

if msg=$(stop); then
    pass "SIGTERM: clean exit within the drain time ($msg)"
else
    fail "SIGTERM: $msg"
fi
if podman logs "$name" 2>&1 | grep -q 'stopped'; then
    pass "server logged its drain and stop"
else
    fail "no stop message in the logs: $(podman logs "$name" 2>&1 | tail -3)"
fi
podman rm "$name" >/dev/null

# A new container on the same volume still knows the model.
if start && wait_serving && "$ctl" --addr "$addr" --timeout 5 get kimi 2>/dev/null | grep -q '"model_id": *"kimi"'; then
    pass "model kept on the volume across a container restart"
else
    fail "model not found after a restart on the same volume"
fi
stop >/dev/null || fail "second container: unclean stop"
cleanup
trap tidy_host EXIT

if [ -z "$(podman ps -aq --filter "name=$name")" ] && ! podman volume exists "$vol"; then
    pass "container and volume removed"
else
    fail "container or volume left behind"
fi
[ "${EPLB_KEEP_IMAGE:-1}" = 0 ] && podman rmi -f "$image" >/dev/null
if mount | grep -q " $work/"; then
    fail "mounts left under $work: $(mount | grep " $work/" | head -3)"
fi
finish
