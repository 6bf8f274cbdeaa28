#!/usr/bin/env bash
# Installs what the cgroup v2 guest test (tests/vm/test_cgroup2_guest.py) needs, from Debian's
# packages, when this machine can run it: x86_64 and we are root. /dev/kvm is not required: where
# it is real KVM the guest uses it, elsewhere (this machine's /dev/kvm is kvm_pvm, which boots only
# PVM guest kernels) qemu emulates the CPU (TCG) and runs the same kernel, slower.
#
# Why a guest at all: this host (and CI, same image) binds memory/pids/cpu to cgroup v1, so the
# v2 code path of sandboxes/cgroups.py can only be tested for real under a kernel booted with
# cgroup_no_v1=all. That kernel comes from Debian's linux-image-amd64 (the cloud flavour has no
# 9p, which the guest's root is), and only its vmlinuz and the few modules the guest loads (virtio,
# 9p) are *extracted* into a cache directory (apt-get download + dpkg-deb): installing it would run
# initramfs-tools and write /boot for a kernel this machine never boots (and take 400 MB). qemu-system-x86 and busybox-static are
# installed normally (the guest shares the host's root read-only, so /bin/busybox is what the
# guest's initramfs runs).
#
# Never fails `make test`: every problem is printed, and the test skips saying what is missing.
# Bounded: each apt step has a timeout. Idempotent and fast (no apt call) once everything is there.
set -uo pipefail

CACHE="${DORM_VM_CACHE:-/var/cache/dorm-vm}"
STEP_TIMEOUT="${DORM_VM_INSTALL_TIMEOUT:-120}"
KERNEL_META="linux-image-amd64"

say() { echo "tests/vm/install-packages.sh: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "not root: cannot apt-get install; the cgroup v2 guest test will skip if packages are missing"
    exit 0
fi
if [ "$(uname -m)" != x86_64 ]; then
    say "$(uname -m) host: the guest is x86_64 only; nothing installed"
    exit 0
fi

have_kernel() {
    compgen -G "$CACHE/kernel/boot/vmlinuz-*" >/dev/null &&
        compgen -G "$CACHE/kernel/lib/modules/*/kernel/fs/overlayfs/overlay.ko" >/dev/null
}
need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
[ -x /bin/busybox ] || need_apt+=(busybox-static)

if [ ${#need_apt[@]} -eq 0 ] && have_kernel; then
    exit 0
fi

start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
say "installing ${need_apt[*]:-} ${KERNEL_META} (extracted into $CACHE) for the cgroup v2 guest"
if ! timeout "$STEP_TIMEOUT" apt-get update -qq; then
    say "apt-get update failed or timed out; trying the installs with the current lists"
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    if ! timeout "$STEP_TIMEOUT" apt-get install -y -qq --no-install-recommends \
        "${need_apt[@]}" >/dev/null; then
        say "apt-get install ${need_apt[*]} failed or timed out"
    fi
fi
if ! have_kernel; then
    # The meta package depends on exactly one versioned image package: find it and download it.
    pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1)
    if [ -z "$pkg" ]; then
        say "cannot resolve $KERNEL_META to a kernel image package"
    else
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        chown _apt "$tmp" 2>/dev/null || true # apt downloads as _apt when it can write there
        keep=(./boot/vmlinuz-* ./boot/config-*)
        for d in drivers/virtio fs/9p net/9p fs/netfs fs/fscache fs/overlayfs; do
            keep+=("./lib/modules/*/kernel/$d/*")
        done
        if (cd "$tmp" && timeout "$STEP_TIMEOUT" apt-get download -qq "$pkg") &&
            mkdir -p "$CACHE" && rm -rf "$CACHE/kernel.new" && mkdir "$CACHE/kernel.new" &&
            dpkg-deb --fsys-tarfile "$tmp"/"$pkg"_*.deb |
            tar -x -C "$CACHE/kernel.new" --wildcards "${keep[@]}"; then
            rm -rf "$CACHE/kernel" && mv "$CACHE/kernel.new" "$CACHE/kernel"
            echo "$pkg" >"$CACHE/kernel/PACKAGE"
        else
            say "downloading or extracting $pkg failed"
            rm -rf "$CACHE/kernel.new"
        fi
    fi
fi
say "done in $(($(date +%s) - start)) s"
exit 0
