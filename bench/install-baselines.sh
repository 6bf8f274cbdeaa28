#!/usr/bin/env bash
# Install what the proxy benchmark compares dorm against: nginx (the baseline proxy) and wrk (the
# load generator), from Debian packages. Idempotent: does nothing when both are on PATH, and runs
# `apt-get update` only when something is missing (it is slow and needs the network).
set -euo pipefail

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    need+=(nginx)
fi
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)  # bench-sandbox compares against it

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

fail() {
    echo "install-baselines: $*" >&2
    echo "install-baselines: install them by hand (Debian: apt-get install nginx-light wrk util-linux bubblewrap)" >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "missing ${need[*]} and apt-get is not available"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "missing ${need[*]}; need root (or sudo) to install them"
    sudo=(sudo -n)
fi

pkgs=()
for p in "${need[@]}"; do
    if [ "$p" = nginx ]; then
        pkgs+=(NGINX)  # resolved below: nginx-light where the release still has it, else nginx
    else
        pkgs+=("$p")
    fi
done

echo "install-baselines: installing ${need[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq || fail "apt-get update failed"
resolved=()
for p in "${pkgs[@]}"; do
    if [ "$p" = NGINX ]; then
        if apt-cache show nginx-light >/dev/null 2>&1; then
            resolved+=(nginx-light)
        else
            resolved+=(nginx)
        fi
    else
        resolved+=("$p")
    fi
done
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${resolved[@]}" >&2 \
    || fail "apt-get install ${resolved[*]} failed"

# The Debian package may start a system nginx on port 80; the benchmark runs its own instance and
# needs none. Stop it if something started it (no-op in containers without an init system).
if command -v service >/dev/null 2>&1; then
    service nginx stop >/dev/null 2>&1 || true
fi

command -v wrk >/dev/null 2>&1 || fail "wrk is still missing after installing"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || fail "nginx is still missing after installing"
echo "install-baselines: ok" >&2
