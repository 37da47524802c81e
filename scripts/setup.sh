#!/usr/bin/env bash
# setup.sh [--test] -- install what eplbd needs on Debian 12 and bring upb's
# headers and code generators into .deps/upb (or $EPLB_DEPS_DIR/upb).
# --test (scripts/test.sh) also installs what only the tests need: the
# Python client's grpcio (and for the eplb package, clients/python, numpy,
# torch, pytest, pip, venv), valgrind, clang-14 with its sanitizer and
# libFuzzer runtimes for the fuzz targets, and Debian's hipcc (HIP 5.2, clang
# 15) with libamdhip64-dev, so that every run compiles the HIP backend for
# real (tests/run.sh "gpu backends compile"; no AMD GPU needed).  nvcc is not
# a Debian package: the CUDA backend is compiled where /usr/local/cuda is.
#
# Idempotent and quiet on a second run: packages are installed only when
# missing, and upb is fetched only when .deps/upb does not match the
# installed libgrpc-dev.
#
# Why upb comes from source: Debian's libgrpc-dev ships the upb runtime
# (libupb.so) but no headers and no generator, and libupb-dev conflicts with
# it.  The generated code uses internal upb headers, so they must be those of
# exactly the installed grpc version: we download Debian's grpc *source*
# package of that version (from the archive the system's apt sources already
# name) and keep only third_party/upb.  Nothing of upb is committed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
deps=${EPLB_DEPS_DIR:-$root/.deps}
upb=$deps/upb

# libcriterion-dev stays here: a default configure (scripts/run.sh) builds
# the tests too.
packages=(
    build-essential cmake pkg-config git
    libgrpc-dev protobuf-compiler protobuf-compiler-grpc grpc-proto
    libprotoc-dev libprotobuf-dev libabsl-dev
    libsqlite3-dev sqlite3 libcriterion-dev
    python3 ca-certificates
)
test_packages=(
    python3-grpcio python3-protobuf valgrind
    python3-numpy python3-torch python3-pytest python3-matplotlib python3-pip python3-setuptools python3-venv
    clang-14 libclang-rt-14-dev llvm-14
    hipcc libamdhip64-dev
)
case ${1:-} in
--test) packages+=("${test_packages[@]}") ;;
"") ;;
*) echo "usage: setup.sh [--test]" >&2; exit 2 ;;
esac

say() { printf 'setup: %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_packages() {
    local missing=() p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
}

# shellcheck source=scripts/apt-archive.sh
. "$root/scripts/apt-archive.sh"

fetch_upb() {
    local srcver upstream suite tmp uri opts
    srcver=$(dpkg-query -W -f='${source:Version}' libgrpc-dev)
    upstream=${srcver#*:}
    upstream=${upstream%-*}
    if [ -f "$upb/VERSION" ] && [ "$(cat "$upb/VERSION")" = "$srcver" ] \
        && [ -x "$upb/bin/protoc-gen-upb" ] && [ -x "$upb/bin/protoc-gen-upbdefs" ]; then
        return 0
    fi
    say "fetching upb of grpc $srcver (source package, third_party/upb only)"
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    uri=$(archive_uri) || { echo "setup: no Debian archive found in the apt sources" >&2; return 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    mkdir -p "$tmp/lists/partial"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" >"$tmp/sources.list"
    opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$tmp/lists" -o "APT::Sandbox::User=root")
    apt-get "${opts[@]}" update -qq
    (cd "$tmp" && apt-get "${opts[@]}" source --download-only -qq "grpc=$srcver" >/dev/null)
    tar -C "$tmp" -xzf "$tmp/grpc_${upstream}.orig.tar.gz" --wildcards "grpc-${upstream}/third_party/upb/*"

    rm -rf "$upb"
    mkdir -p "$upb/bin" "$upb/include"
    mv "$tmp/grpc-${upstream}/third_party/upb" "$upb/src"

    # The generators, against Debian's protobuf/abseil and gRPC's libupb.so.
    local cxx=(g++ -std=c++17 -O1 -w -I"$upb/src")
    local libs=(-lprotoc -lprotobuf -labsl_raw_hash_set -labsl_hash -labsl_strings
                -labsl_str_format_internal -lupb)
    "${cxx[@]}" "$upb/src/upbc/protoc-gen-upb.cc" "$upb/src/upbc/common.cc" -o "$upb/bin/protoc-gen-upb" "${libs[@]}"
    "${cxx[@]}" "$upb/src/upbc/protoc-gen-upbdefs.cc" "$upb/src/upbc/common.cc" -o "$upb/bin/protoc-gen-upbdefs" "${libs[@]}"

    # upb/def.h includes descriptor.upb.h; libupb.so already has its tables,
    # so only the header is generated (never compiled into a second copy).
    protoc -I/usr/include --plugin=protoc-gen-upb="$upb/bin/protoc-gen-upb" \
        --upb_out="$tmp" google/protobuf/descriptor.proto
    mkdir -p "$upb/include/google/protobuf"
    cp "$tmp/google/protobuf/descriptor.upb.h" "$upb/include/google/protobuf/"

    echo "$srcver" >"$upb/VERSION"
}

install_packages
fetch_upb
