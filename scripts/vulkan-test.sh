#!/usr/bin/env bash
# Runs the CubeCL kernels' tests (lora-core's `vulkan-test` feature; sd-model's flash-attention
# path) without a GPU, on Mesa's lavapipe (a Vulkan driver that runs on the CPU). The
# flash-attention kernels need VK_KHR_cooperative_matrix, which lavapipe has from Mesa 25.1
# on (Debian bookworm's 22.3 and bookworm-backports' 25.0 lack it), so the tests run inside a
# Debian sid chroot with a current Mesa; the test binaries are built here as usual.
#
#   bash scripts/vulkan-test.sh [FILTER...]  test-name filters; default `wgpu vulkan` (the
#                                            kernels' tests on CubeCL's wgpu runtime)
#   SID=/opt/sid                             the chroot (made with debootstrap if missing; root)
#
# The first run downloads ~150 MB of Debian packages; later runs only rebuild and copy.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SID=${SID:-/opt/sid}
FILTERS=("$@")
[ ${#FILTERS[@]} -gt 0 ] || FILTERS=(wgpu vulkan)

if ! [ -x "$SID/usr/bin/vulkaninfo" ]; then
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
    debootstrap --variant=minbase --include=mesa-vulkan-drivers,vulkan-tools sid "$SID" http://deb.debian.org/debian
fi
for fs in proc dev sys; do
    mountpoint -q "$SID/$fs" || mount --bind "/$fs" "$SID/$fs"
done
# (Read whole: `grep -q` would stop vulkaninfo early, a pipe failure under pipefail.)
if ! chroot "$SID" vulkaninfo 2>/dev/null | grep -c "cooperativeMatrix *= true" >/dev/null; then
    echo "lavapipe in $SID has no VK_KHR_cooperative_matrix (Mesa >= 25.1 needed): update the chroot" >&2
    exit 1
fi

cd "$REPO"
mkdir -p "$SID/work"
# `cargo test --no-run` prints the test executables; copy each library test binary in.
run_crate() {
    local crate=$1 feature=$2
    local exe
    exe=$(cargo test -p "$crate" --release --features "$feature" --lib --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
    [ -n "$exe" ] || { echo "no test binary for $crate (does it build? cargo test -p $crate --features $feature)" >&2; exit 1; }
    install -m 755 "$exe" "$SID/work/$crate-$feature-tests"
    echo "== $crate ($feature): ${FILTERS[*]}"
    chroot "$SID" "/work/$crate-$feature-tests" "${FILTERS[@]}"
}
# The WGSL build (`wgpu-test`) for the ordering kernels' tests (see kernels/ordering.rs),
# then the SPIR-V build (`vulkan-test`: cooperative matrices) for the rest.
run_crate lora-core wgpu-test
run_crate lora-core vulkan-test
run_crate sd-model vulkan-test
