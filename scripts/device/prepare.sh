#!/usr/bin/env bash
# Prepares device-bin/ (ignored by git, carried to the GPU machine) for scripts/device/run.sh:
# the CUDA build of `trainer`, lora-core's CUDA test binary (its ignored GPU tests: cuDNN,
# cuBLAS, ordering, softmax, flash attention, GroupNorm), the PyTorch anchor, the diffusers wheels, a build record and,
# if given, the cache archive of an earlier device call. Run here, from anywhere in the repo.
#
#   SKIP_BUILD=1                  reuse $CUDA_TARGET_DIR/release/trainer as it is
#   CUDA_TARGET_DIR=target/cuda   a target folder of its own, so that the CUDA build does not
#                                 invalidate the CPU build in target/ (first build: 10+ min on
#                                 2 cores; later ones are incremental)
#   ANCHOR_SRC=../shared/bench/torch_anchor.py
#   CACHE_FROM=PATH/cubecl-cache.tar.gz   an earlier call's $OUT/cubecl-cache.tar.gz
#   SKIP_NVRTC=1                  skip scripts/cuda-compile.sh (every lora-core kernel through
#                                 NVRTC and ptxas for sm_90a, here, without a GPU; it needs
#                                 NVIDIA's CUDA 13.0 wheels from PyPI once)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
CUDA_TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda}
ANCHOR_SRC=${ANCHOR_SRC:-$REPO/../shared/bench/torch_anchor.py}
DEST=device-bin

mkdir -p "$DEST/whl"
rm -rf "$DEST/out"   # local test output of run.sh: it would travel with the folder

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release -p trainer --features cuda --target-dir "$CUDA_TARGET_DIR"
fi
# A kernel that NVRTC rejects would cost the device call; find it here (same test binary as
# lora-core-tests below, so nothing extra is built).
if [ "${SKIP_NVRTC:-0}" != 1 ]; then
    mkdir -p "$CUDA_TARGET_DIR"
    if ! CARGO_TARGET_DIR=$CUDA_TARGET_DIR OUT=$CUDA_TARGET_DIR/cuda-source bash scripts/cuda-compile.sh >"$CUDA_TARGET_DIR/cuda-compile.log" 2>&1; then
        cat "$CUDA_TARGET_DIR/cuda-compile.log" >&2
        echo "error: scripts/cuda-compile.sh failed (above): a kernel that does not compile for sm_90a" \
            "(fix it before the device call), or NVIDIA's wheels could not be fetched (SKIP_NVRTC=1 skips this step)" >&2
        exit 1
    fi
    tail -n 1 "$CUDA_TARGET_DIR/cuda-compile.log"
fi
# Binaries travel gzipped (the stripped CUDA build is ~70 MB; the carry limit is 64 MiB in
# all); run.sh unpacks them.
rm -f "$DEST/trainer" "$DEST/lora-core-tests"
install -m 755 "$CUDA_TARGET_DIR/release/trainer" "$DEST/trainer"
strip "$DEST/trainer" 2>/dev/null || true
gzip -9 -f "$DEST/trainer"
# lora-core's unit tests built for CUDA; run.sh runs the #[ignore]d cuDNN one on the device.
if [ "${SKIP_BUILD:-0}" != 1 ] || [ ! -f "$DEST/lora-core-tests.gz" ]; then
    tests=$(cargo test --release -p lora-core --features cuda --lib --no-run --target-dir "$CUDA_TARGET_DIR" \
        --message-format=json 2>/dev/null | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
    if [ -n "$tests" ]; then
        install -m 755 "$tests" "$DEST/lora-core-tests"
        strip "$DEST/lora-core-tests" 2>/dev/null || true
        gzip -9 -f "$DEST/lora-core-tests"
    else
        echo "warning: could not build lora-core's CUDA tests; run.sh will skip the conv check" >&2
    fi
fi

if [ -f "$ANCHOR_SRC" ]; then
    install -m 644 "$ANCHOR_SRC" "$DEST/torch_anchor.py"
else
    echo "warning: no anchor at $ANCHOR_SRC; run.sh will skip the PyTorch side" >&2
fi

# The GPU image has torch, transformers, peft and safetensors but not diffusers (REFERENCE.md).
if ! ls "$DEST"/whl/diffusers-0.42.1-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$DEST/whl" diffusers==0.42.1 importlib_metadata
fi

if [ -n "${CACHE_FROM:-}" ]; then
    cp "$CACHE_FROM" "$DEST/cubecl-cache.tar.gz"
fi

{
    echo "commit $(git rev-parse --short HEAD)$( [ -n "$(git status --porcelain --untracked-files=no)" ] && echo ' + uncommitted changes')"
    echo "built $(date -u '+%Y-%m-%d %H:%M UTC') with $(rustc --version), features cuda"
    echo "sha256 $(gzip -dc "$DEST/trainer.gz" | sha256sum | cut -c1-16)"
} >"$DEST/BUILD_INFO"

cat "$DEST/BUILD_INFO"
du -sh "$DEST"
# What travels: tracked + untracked-not-ignored files, plus the carried folder (64 MiB in all).
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
carry_bytes=$(du -sb "$DEST" | cut -f1)
if [ $(( (tree_bytes + carry_bytes) / 1048576 )) -ge 63 ] && [ -f "$DEST/lora-core-tests.gz" ]; then
    echo "warning: over the carry limit; dropping $DEST/lora-core-tests.gz (run.sh skips the kernel tests)" >&2
    rm -f "$DEST/lora-core-tests.gz"
    carry_bytes=$(du -sb "$DEST" | cut -f1)
fi
echo "working tree $((tree_bytes / 1048576)) MiB + $DEST $((carry_bytes / 1048576)) MiB (limit 64 MiB)"
