#!/usr/bin/env bash
# Compiles lora-core's CubeCL kernels for an H100/H200 (sm_90a) without a GPU and reports
# what ptxas says about each: registers, spills, stack, and the dynamic shared memory the
# source declares.
#
# lora-core's test `kernels::cuda_source::kernels_translate_to_cuda_for_sm90` runs every
# kernel launcher with SD1.5/SD2.1 shapes on a stand-in CubeCL runtime that translates each
# launched kernel with cubecl-cuda's compiler; here it also compiles each source with NVRTC
# exactly as cubecl-cuda does on the device. NVRTC, the CUDA headers and ptxas come from
# NVIDIA's wheels on PyPI (CUDA 13.0, ~250 MB unpacked), cached in $CUDA_TOOLS.
#
#   bash scripts/cuda-compile.sh
#   CUDA_TOOLS=DIR   where the toolkit pieces are unpacked (default ~/.cache/sd-lora/cuda-13.0)
#   OUT=DIR          sources, PTX and the report (default target/cuda-source)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# Absolute: the test runs in the crate's folder.
CUDA_TOOLS=$(realpath -m "${CUDA_TOOLS:-$HOME/.cache/sd-lora/cuda-13.0}")
OUT=$(realpath -m "${OUT:-$REPO/target/cuda-source}")
CUDA=$CUDA_TOOLS/nvidia/cu13

if ! [ -x "$CUDA/bin/ptxas" ] || ! [ -f "$CUDA/include/crt/mma.h" ] || ! [ -f "$CUDA/lib/libnvrtc.so.13" ]; then
    mkdir -p "$CUDA_TOOLS/wheels"
    # NVRTC; cuda_runtime/cuda_bf16/mma headers; crt/ (CUDA 13 ships it apart); CCCL; ptxas.
    python3 -m pip download --no-deps -q -d "$CUDA_TOOLS/wheels" \
        "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvcc==13.0.*"
    for wheel in "$CUDA_TOOLS"/wheels/*.whl; do
        python3 -m zipfile -e "$wheel" "$CUDA_TOOLS"
    done
    chmod +x "$CUDA/bin/ptxas"
fi

rm -rf "$OUT"
mkdir -p "$OUT"
# (`SD_LORA_NVRTC`, not `CUDA_PATH`: cudarc's build script watches that, and would rebuild burn.)
LD_LIBRARY_PATH=$CUDA/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} SD_LORA_NVRTC=$CUDA SD_LORA_CUDA_OUT=$OUT \
    cargo test -p lora-core --release --features cuda --lib -- kernels::cuda_source --nocapture

for ptx in "$OUT"/*.ptx; do
    "$CUDA/bin/ptxas" -arch=sm_90a -v "$ptx" -o /dev/null 2> "${ptx%.ptx}.ptxas"
done

python3 - "$OUT" <<'EOF'
import pathlib, re, sys
out = pathlib.Path(sys.argv[1])
rows = []
for ptxas in sorted(out.glob("*.ptxas")):
    text = ptxas.read_text()
    source = ptxas.with_suffix(".cu").read_text()
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0
    regs = num(r"Used (\d+) registers")
    spills = num(r"(\d+) bytes spill stores") + num(r"(\d+) bytes spill loads")
    stack = num(r"(\d+) bytes stack frame")
    threads = int(m.group(1)) if (m := re.search(r"__launch_bounds__\((\d+)\)", source)) else 0
    # Dynamic shared arrays: `T *name = reinterpret_cast<T*>(&dynamic_shared_mem[OFFSET])`
    # after a `// Shared array size: N, BYTES bytes` comment.
    sizes = [int(b) for b in re.findall(r"Shared array size: \d+, (\d+) bytes", source)]
    offsets = [int(o) for o in re.findall(r"dynamic_shared_mem\[(\d+)\]", source)]
    shared = max((o + b for o, b in zip(offsets, sizes)), default=0)
    # Resident cubes per SM on sm_90: 65536 registers, 228 KiB shared, 2048 threads, 32 cubes.
    limits = [32]
    if threads:
        limits.append(2048 // threads)
        limits.append(65536 // max(1, regs * threads))
    if shared:
        limits.append(233472 // (shared + 1024))
    rows.append((ptxas.stem, threads, regs, spills, stack, shared, min(limits)))
print(f"\n{'kernel':48} {'threads':>7} {'regs':>5} {'spill B':>7} {'stack B':>7} {'smem B':>7} {'cubes/SM':>8}")
for r in rows:
    print(f"{r[0]:48} {r[1]:>7} {r[2]:>5} {r[3]:>7} {r[4]:>7} {r[5]:>7} {r[6]:>8}")
bad = [r[0] for r in rows if r[3]]
print(f"\n{len(rows)} kernels compiled for sm_90a; spilling: {', '.join(bad) if bad else 'none'}")
EOF
