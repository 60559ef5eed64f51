#!/usr/bin/env bash
# One device call: CUDA-vs-CPU correctness checks, then `trainer bench` and the PyTorch anchor
# at the same settings, then a ratio table (last in the output; also $OUT/summary.md).
# Run from anywhere inside the repo: `bash scripts/device/run.sh`. Preparation and the exact
# device call: scripts/device/README.md. Everything is selectable through the variables below.
#
#   DEVICE=cuda|cpu    cpu runs the same pipeline on the tiny UNet here (no GPU needed)
#   CHECKS="CONFIG:RES:BATCH[:ckpt][:PREC][:cudnn][:cublas][:device][:softmax][:flash][:gn][:cudnnattn][:lora][:tuned] ..."   device checks,
#        PREC f32|bf16|f16 (default f32); cudnn = --cudnn (convolutions in cuDNN); cublas =
#        --cublas (matmuls of 4 GFLOP and more in cuBLAS, the others in the trainer's fixed
#        kernel, as in training); device =
#        --vendor-sync device (library calls ordered on the GPU); softmax = --fused-softmax
#        (attention's softmax in one CubeCL kernel); flash = --flash-attention (attention
#        forward and backward in the CubeCL flash-attention kernels, bf16/f16 models); gn =
#        --fused-group-norm (GroupNorm + SiLU forward and backward in our CubeCL kernels);
#        cudnnattn = --cudnn-attention (attention in cuDNN's fused engines where they apply;
#        dropped with a note when its kernel test fails);
#        lora = --fused-lora-linear (each LoRA linear layer one op forward and one backward;
#        dropped with a note when its kernel test fails);
#        tuned = --tuned-matmul (the matmuls cuBLAS does not take in burn's autotuned kernels
#        instead of the trainer's fixed one); hybrid = --flash-max-keys 1024 (with flash:
#        attention over more keys takes the blockwise path); smem96 / prefetch (PLAN only) =
#        SD_LORA_FLASH_SHARED_KIB=96 / SD_LORA_FLASH_PREFETCH=1 (the flash kernels' tuning);
#        cublasmin (PLAN only) = SD_LORA_CUBLAS_MIN_GFLOP=$CUBLAS_MIN_GFLOP (default 0.25:
#        matmuls from 0.25 GFLOP up in cuBLAS instead of from 4);
#        talloff (PLAN only) = SD_LORA_CUBLAS_TALL_MIN_GFLOP=4 (cuBLAS by size alone, as
#        measured before the tall rule); tall512 (PLAN only) = SD_LORA_CUBLAS_TALL_ROWS=512
#        (the tall rule from 512 rows: a CFG batch's 256-token level too);
#        device / softmax / flash / gn are dropped, with a note, when their kernel test below fails
#        (default cuda: the tiny UNet in bf16 with everything on, SD1.5 at 256 px with cuDNN's
#        attention, then with the blockwise attention, then the tiny UNet in f32; see below)
#   CHECKS_AFTER=4     the checks (and SMOKE) run after this many PLAN entries (cuda default 4:
#                      the headline benchmarks first; cpu 0)
#   PLAN="CONFIG:RES:BATCH:MODE[:ckpt][:plain][:unmerged][:cudnn][:cublas][:device][:softmax][:flash][:gn][:cudnnattn][:lora][:tuned][:hybrid][:smem96][:prefetch][:loha|:lokr|:oft|:diag-oft|:boft|:glora|:ia3|:full] ..."
#        benchmarks, MODE train|infer; plain = --plain-autodiff (burn's own backward passes,
#        for the memory A/B); unmerged = --lora-unmerged (infer: adapters beside the weights,
#        as peft runs them, instead of merged in as `trainer generate` runs them);
#        loha / lokr / oft / diag-oft / boft / glora / ia3 / full = --lora-algo (LyCORIS' forms,
#        kohya's OFT at constraint 1e-3, LyCORIS' Diag-OFT and BOFT unconstrained, GLoRA at
#        rank 4, (IA)³ per output channel, full: whole weights and biases);
#        norm = --lora-train-norm --lora-targets attn-mlp (LyCORIS' norm modules on the
#        transformers' norms, beside attn-mlp adapters; time it against the same setting
#        with the word attnmlp);
#        cudnn / cublas / device / softmax / flash / gn / tuned / hybrid as above, with the
#        default matmul threshold (default cuda: the four anchor settings with everything
#        on and cuDNN's attention, batch 1 without the one-op LoRA layers, then with the
#        flash kernels alone, batch 8 and 1 also with
#        the blockwise attention, batch 8 hybrid; then the inference step unmerged, batch 8
#        host-ordered, with the flash kernels' two tuning options, with burn's autotuned
#        small matmuls, and with none of our kernels)
#   PROFILE="CONFIG:RES:BATCH:MODE[:OPTS] ..."   per-kernel GPU time of one step under Nsight
#        Compute (ncu), ours (`trainer bench --cuda-profiler-step`) and, at the anchor's
#        settings, PyTorch's (anchor_profile.py), as tables by kernel class and by kernel
#        (ncu_report.py; printed before the summary, also $OUT/profile.md; ncu's CSVs stay in
#        $WORK: $OUT may return 8 files);
#        OPTS as in PLAN. Default cuda: batch 8 with everything on but `device` (see
#        below); none skips it. NCU=PATH picks ncu
#   PROFILE_TORCH=1    also profile the anchor at its settings (0: ours only, when an
#                      earlier call's PyTorch profile stands)
#   PROFILE_AFTER=10   the profiles run after this many PLAN entries (default: after the
#                      ten headline settings; they reuse the plan's autotune results),
#                      when the budget allows
#   KERNEL_TESTS="conv matmul ordering softmax cudnn-attention lora flash group concat"   lora-core's CUDA kernel tests before
#                      everything, those whose job names contain one of the words (1: all;
#                      0: none, every switch stays
#                      on, e.g. for a second call that only profiles)
#   ORDERING_TEST_S=240   time limit of the GPU-side ordering test
#   CUDNN_ATTN_TEST_S=150 time limit of the cuDNN attention test (its log has cuDNN's refusals)
#   PRECISION=bf16     --precision of our bench (the anchor runs bf16) and of the smoke run
#   SMOKE=1            also run `trainer train` for 20 steps on the tiny model, then `trainer
#                      generate` with its LoRA (0 skips both)
#   PARITY=1           also train the tiny model 3 steps at f32 on the CPU and on the device
#                      (one seed) and compare the two LoRA files (lora_parity.py: relative L2
#                      over all tensors, tolerance 0.05; 0 skips it)
#   OPS=1              also run `trainer bench-ops` (each kernel of ours against burn's ops at
#                      SD1.5's shapes; its table is printed before the summary; 0 skips it)
#   STEPS=5            measured steps of our bench (after one warm-up step)
#   ANCHOR_STEPS=10    timed steps of the anchor (after three warm-ups); ANCHOR=none skips it
#   BUDGET_S=540       wall-clock budget of the whole script: a job that would not fit is
#                      skipped, a running one is stopped at the budget (keep timeout_s above it)
#   BIN, ANCHOR, WHEELS, CACHE_IN, PYTHON, OUT, WORK: paths, defaults below
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$REPO/scripts/device"
START=$(date +%s)
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
STEPS=${STEPS:-5}
PROFILE_AFTER=${PROFILE_AFTER:-10}
CHECKS_AFTER=${CHECKS_AFTER:-$([ "$DEVICE" = cuda ] && echo 4 || echo 0)}
ANCHOR_STEPS=${ANCHOR_STEPS:-10}
BUDGET_S=${BUDGET_S:-540}
RESERVE_S=${RESERVE_S:-25}     # kept back for the table and the cache archive
MIN_JOB_S=${MIN_JOB_S:-30}     # a job is not started with less than this left
BIN=${BIN:-$REPO/device-bin/trainer}
ANCHOR=${ANCHOR:-$REPO/device-bin/torch_anchor.py}
WHEELS=${WHEELS:-$REPO/device-bin/whl}
CACHE_IN=${CACHE_IN:-$REPO/device-bin/cubecl-cache.tar.gz}
CACHE=${CACHE:-/tmp/sdlora-cache}
PYTHON=${PYTHON:-python3}      # runs the anchor
PY=${PY:-python3}              # runs report.py (standard library only)
OUT=${OUT:-$REPO/device-bin/out}
WORK=${WORK:-/tmp/sdlora-device-work}

# Jobs run in $WORK: make the caller's relative paths absolute (a bare command name stays).
abs() { case $1 in /*) echo "$1" ;; */*) echo "$PWD/$1" ;; *) echo "$1" ;; esac; }
BIN=$(abs "$BIN") ANCHOR=$(abs "$ANCHOR") WHEELS=$(abs "$WHEELS") CACHE_IN=$(abs "$CACHE_IN")
BIN_DIR=$(dirname "$BIN")
TESTS=$(abs "${TESTS:-$BIN_DIR/lora-core-tests}")
CACHE=$(abs "$CACHE") PYTHON=$(abs "$PYTHON") OUT=$(abs "$OUT") WORK=$(abs "$WORK")

if [ "$DEVICE" = cuda ]; then
    # cuDNN first: it is the path meant to beat the anchor, and it skips burn's conv autotuning
    # (minutes per new shape), so it also fits the budget best.
    CHECKS=${CHECKS:-"tiny:64:2:bf16:cudnn:cublas:device:softmax:flash:gn:lora sd15:256:1:bf16:cudnn:cublas:device:softmax:flash:gn:cudnnattn:lora sd15:256:1:bf16:cudnn:cublas:device:softmax:gn tiny:64:2:cudnn:cublas:device:softmax:gn:lora tiny:64:2"}
    ALL=cudnn:cublas:device:softmax:flash:gn:lora
    # Every switch on, with the flash kernels (ALL) and with the blockwise attention (BLOCK:
    # cuBLAS products and the fused softmax): the profile of 2026-11-30 put the flash
    # kernels at 16x PyTorch's attention time, the blockwise path is untimed.
    BLOCK=cudnn:cublas:device:softmax:gn:lora
    # SDPA: attention in cuDNN's fused engines where they apply, the flash kernels elsewhere.
    SDPA=$ALL:cudnnattn
    # The one-op LoRA layers (lora) cut the host's work per step by a third (2026-11-30, on
    # the CPU): the fifth row is batch 1 without them.
    PLAN=${PLAN:-"sd15:512:8:train:$SDPA sd15:512:1:train:$SDPA sd15:512:1:infer:$SDPA sd15:512:8:train:ckpt:$SDPA sd15:512:1:train:cudnn:cublas:device:softmax:flash:gn:cudnnattn sd15:512:8:train:$ALL sd15:512:8:train:$BLOCK sd15:512:8:train:$ALL:hybrid sd15:512:1:train:$ALL sd15:512:1:train:$BLOCK sd15:512:1:infer:$ALL sd15:512:8:train:ckpt:$ALL sd15:512:1:infer:unmerged:$SDPA sd15:512:8:train:cudnn:cublas:softmax:flash:gn sd15:512:8:train:$ALL:smem96 sd15:512:8:train:$ALL:prefetch sd15:512:8:train:$ALL:tuned sd15:512:8:train"}
    # Host-ordered library calls: GPU-side ordering spins in a kernel until work on our
    # stream has run, and ncu, which runs one kernel at a time, holds that work back.
    PROFILE=${PROFILE:-"sd15:512:8:train:cudnn:cublas:softmax:flash:gn:cudnnattn:lora"}
else
    CHECKS=${CHECKS:-"tiny:64:2:ckpt"}
    PLAN=${PLAN:-"tiny:64:1:train tiny:64:2:train tiny:64:2:train:ckpt tiny:64:1:infer tiny:64:1:infer:unmerged"}
    PROFILE=${PROFILE:-none}
fi
CHECKS=${CHECKS//,/ }
PLAN=${PLAN//,/ }

mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK"
LOG="$OUT/run.log"
RESULTS="$OUT/results.jsonl"
INFO="$OUT/env.txt"
: >"$LOG"
: >"$RESULTS"

say() { echo "[$(printf '%4d' $(( $(date +%s) - START )))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - RESERVE_S - ($(date +%s) - START) )); }

# run_job SOURCE NAME SETTING_JSON COMMAND...: runs COMMAND in $WORK (where cubecl.toml is)
# under the remaining budget, appends its records to $RESULTS and its output to $LOG.
run_job() {
    local source=$1 name=$2 setting=$3
    shift 3
    local budget
    budget=$(left)
    if [ "$budget" -lt "$MIN_JOB_S" ]; then
        say "$name: skipped, ${budget}s of the budget left"
        LAST_RC=-1
        echo "{\"source\": \"$source\", \"name\": \"$name\", \"rc\": -1, \"error\": \"skipped: budget spent\"}" >>"$RESULTS"
        return
    fi
    say "$name: $* (limit ${budget}s)"
    local t0 ms rc
    t0=$(date +%s%N)
    (cd "$WORK" && timeout -k 10 "$budget" "$@") >"$WORK/$name.out" 2>"$WORK/$name.err"
    rc=$?
    LAST_RC=$rc
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    { echo "--- $name stdout"; cat "$WORK/$name.out"; echo "--- $name stderr"; cat "$WORK/$name.err"; } >>"$LOG"
    "$PY" "$HERE/report.py" collect --source "$source" --name "$name" --rc "$rc" \
        --wall "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))" --cmd "$*" \
        --stdout "$WORK/$name.out" --stderr "$WORK/$name.err" --setting "$setting" >>"$RESULTS"
    if [ "$rc" -eq 0 ]; then
        say "$name: done: $(tail -n 1 "$WORK/$name.out" | cut -c1-300)"
    else
        say "$name: FAILED (exit $rc); last lines:"
        tail -n 8 "$WORK/$name.err" | tee -a "$LOG"
    fi
}

# --- environment ----------------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
    export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
    export LD_LIBRARY_PATH="$CUDA_PATH/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # cuDNN 9 (for --cudnn): the system's, else the one PyTorch's wheels bring
    # (site-packages/nvidia/cudnn/lib, next to cuBLAS, which cuDNN loads too).
    if ! ldconfig -p 2>/dev/null | grep -q 'libcudnn.so.9'; then
        for site in $("$PYTHON" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
            for lib in "$site"/nvidia/cudnn/lib "$site"/nvidia/cublas/lib; do
                [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib:$LD_LIBRARY_PATH"
            done
        done
    fi
fi
# Persistent caches: cubecl's PTX and autotune caches (cubecl.toml below) and the driver's
# PTX-to-SASS cache; restored from $CACHE_IN, archived to $OUT/cubecl-cache.tar.gz at the end.
mkdir -p "$CACHE"
if [ -f "$CACHE_IN" ]; then
    tar -xzf "$CACHE_IN" -C "$CACHE" && say "restored caches from $CACHE_IN ($(du -sh "$CACHE" | cut -f1))"
fi
export CUDA_CACHE_PATH="$CACHE/nv" CUDA_CACHE_MAXSIZE=4294967296
cat >"$WORK/cubecl.toml" <<EOF
# Written by scripts/device/run.sh: cubecl reads cubecl.toml from the working directory.
[autotune]
cache = { file = "$CACHE/autotune" }

[compilation]
cache = { file = "$CACHE/ptx" }

[compilation.logger]
level = "basic"
file = "$OUT/cubecl-compile.log"
EOF

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "device: $DEVICE"
    if [ "$DEVICE" = cuda ]; then
        echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
    else
        echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
    fi
    echo "commit: $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$REPO" && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (with uncommitted changes)')"
    [ -f "$BIN_DIR/BUILD_INFO" ] && sed 's/^/build: /' "$BIN_DIR/BUILD_INFO"
    echo "plan: CHECKS='$CHECKS' PLAN='$PLAN' PROFILE='$PROFILE' (after $PROFILE_AFTER) PRECISION=$PRECISION STEPS=$STEPS ANCHOR_STEPS=$ANCHOR_STEPS BUDGET_S=$BUDGET_S"
} >"$INFO" 2>&1
cat "$INFO" | tee -a "$LOG"

# prepare.sh ships the binaries gzipped (the CUDA build is ~70 MB, over the carry limit):
# unpack NAME.gz into $WORK when NAME itself is not there.
unpack() {
    if [ ! -x "$1" ] && [ -f "$1.gz" ]; then
        local to
        to="$WORK/bin-$(basename "$1")"
        gzip -dc "$1.gz" >"$to" && chmod +x "$to" && echo "$to" && return
    fi
    echo "$1"
}
BIN=$(unpack "$BIN")
TESTS=$(unpack "$TESTS")

if [ ! -x "$BIN" ]; then
    say "no trainer binary at $BIN: build it first (scripts/device/README.md)"
    exit 2
fi

# --- 1a. cuDNN convolutions and cuBLAS matmuls against burn's CUDA kernels (f32 and bf16), ---
# then GPU-side ordering of library calls against host ordering (bounded: a broken ordering
# shows as spin timeouts of about a second per call, so the test gets a limit of its own),
# then the fused softmax, flash-attention and GroupNorm kernels against burn's ops. Minimal
# autotuning of burn's reference kernels, as in the checks.
DSYNC=1 FUSED_SOFTMAX=1 FLASH=1 FUSED_GN=1 CUDNN_ATTN=1 FUSED_LORA=1
# Runs lora-core's ignored CUDA test `kernels::tests::TEST` as job NAME (further words, e.g. a
# timeout, go in front of the command); succeeds when the test passes.
kernel_test() {
    local name=$1 test=$2 word
    shift 2
    if [ "$KERNEL_TESTS" != 1 ]; then
        for word in $KERNEL_TESTS; do
            case $name in *"$word"*) break ;; esac
            word=
        done
        # Not selected: the switch stays on.
        [ -n "$word" ] || return 0
    fi
    run_job smoke "$name" "{}" "$@" env CUBECL_AUTOTUNE_LEVEL=minimal "$TESTS" --ignored --exact "kernels::tests::$test" --nocapture
    [ "${LAST_RC:-1}" = 0 ]
}
KERNEL_TESTS=${KERNEL_TESTS:-"conv matmul ordering softmax cudnn-attention lora flash group concat"}
KERNEL_TESTS=${KERNEL_TESTS//,/ }
if [ "$DEVICE" = cuda ] && [ -x "$TESTS" ] && [ "$KERNEL_TESTS" != 0 ]; then
    kernel_test conv-cudnn-vs-burn cudnn_matches_burn_kernels_on_cuda
    # cuDNN writing a convolution onto its residual / time embedding (beta = 1): if that
    # fails, every run below adds them with a kernel after the convolution instead.
    kernel_test conv-add-cudnn-vs-burn cudnn_conv_add_matches_burn_kernels_on_cuda || {
        export SD_LORA_CUDNN_BLEND=0
        say "cuDNN's output blend failed its test: every run below adds the residuals after the convolutions"
    }
    kernel_test matmul-cublas-vs-burn cublas_matches_burn_kernels_on_cuda
    kernel_test ordering-device-vs-host device_ordering_matches_host_ordering_on_cuda timeout -k 5 "${ORDERING_TEST_S:-240}" || {
        DSYNC=0
        say "GPU-side ordering failed its test: the :device settings below run host-ordered"
    }
    kernel_test softmax-fused-vs-burn fused_softmax_matches_burn_on_cuda || {
        FUSED_SOFTMAX=0
        say "the fused softmax failed its test: the :softmax settings below use burn's ops"
    }
    kernel_test flash-attention-vs-math flash_attention_matches_math_on_cuda || {
        FLASH=0
        say "flash attention failed its test: the :flash settings below use the blockwise attention"
    }
    # cuDNN says why it refuses a graph (errors only) in this test's log.
    kernel_test cudnn-attention-vs-math cudnn_attention_matches_math_on_cuda timeout -k 5 "${CUDNN_ATTN_TEST_S:-150}" env CUDNN_LOGERR_DBG=1 CUDNN_LOGLEVEL_DBG=1 CUDNN_LOGDEST_DBG=stderr || {
        CUDNN_ATTN=0
        say "cuDNN's attention failed its test: the :cudnnattn settings below use the flash kernels"
    }
    kernel_test cudnn-attention-padded-vs-math cudnn_attention_padded_backward_matches_math_on_cuda timeout -k 5 "${CUDNN_ATTN_TEST_S:-150}" env CUDNN_LOGERR_DBG=1 CUDNN_LOGLEVEL_DBG=1 CUDNN_LOGDEST_DBG=stderr || {
        export SD_LORA_CUDNN_PADDED_BACKWARD=0
        say "cuDNN's padded attention backward failed its test: every run below leaves the 77-token cross-attention's backward to the flash kernels"
    }
    kernel_test lora-linear-fused-vs-composed fused_lora_linear_matches_composed_ops_on_cuda || {
        FUSED_LORA=0
        say "the one-op LoRA linear layer failed its test: the :lora settings below compose burn's ops"
    }
    kernel_test group-norm-fused-vs-burn fused_group_norm_matches_burn_on_cuda || {
        FUSED_GN=0
        say "the fused GroupNorm failed its test: the :gn settings below use burn's ops"
    }
    # On by default in the trainer (FlatAdamW's gradient gather): off for every run below
    # when its test fails.
    kernel_test concat-flat-vs-cat concat_flat_matches_cat_on_cuda || {
        export SD_LORA_FUSED_CONCAT=0
        say "the multi-tensor concatenation failed its test: every run below uses burn's cat"
    }
fi

# --- 1. correctness, and the whole training loop (run_checks, called from the plan loop) --------
# After CHECKS_AFTER benchmarks: the first device call (2026-11-29) spent its whole budget
# compiling and autotuning inside the first check, so the headline numbers come first.
checks_done=0
run_checks() {
    [ "$checks_done" = 1 ] && return
    checks_done=1
    for c in $CHECKS; do
        [ "$c" = none ] && continue
        IFS=: read -r cfg res batch opts <<<"$c"
        # The kernel options as for the benchmarks; the precision word is the checks' own.
        bench_flags "$opts"
        prec=f32
        for o in ${opts//:/ }; do
            case $o in f32 | bf16 | f16) prec=$o ;; esac
        done
        # A check runs the matmuls as the trainer does (with `cublas`, the large ones in
        # cuBLAS, the others in the fixed kernel; `tuned`: burn's autotuned ones) and buckets
        # burn's autotune keys coarsely (CUBECL_AUTOTUNE_LEVEL=minimal: fewer keys, though
        # each still compiles and times every candidate): correctness does not need the
        # fastest variants.
        run_job check "check-$cfg-r$res-b$batch$suffix-$prec" "{}" \
            env CUBECL_AUTOTUNE_LEVEL=minimal "$BIN" device-check --unet-config "$cfg" --resolution "$res" --batch "$batch" \
            --device "$DEVICE" --precision "$prec" "${flag[@]}"
    done

    # 1b. the whole training loop on the device: tiny model, demo data, the bench precision,
    # the trainer's default kernels (every fast path) less those whose test failed above.
    if [ "${SMOKE:-1}" = 1 ]; then
        case $PRECISION in f16) mp=fp16 ;; bf16) mp=bf16 ;; *) mp=no ;; esac
        local off=()
        [ "$DSYNC" = 1 ] || off+=(SD_LORA_VENDOR_SYNC=host)
        [ "$FUSED_SOFTMAX" = 1 ] || off+=(SD_LORA_FUSED_SOFTMAX=0)
        [ "$FLASH" = 1 ] || off+=(SD_LORA_FLASH_ATTENTION=0)
        [ "$FUSED_GN" = 1 ] || off+=(SD_LORA_FUSED_GROUP_NORM=0)
        [ "$CUDNN_ATTN" = 1 ] || off+=(SD_LORA_CUDNN_ATTENTION=0)
        [ "$FUSED_LORA" = 1 ] || off+=(SD_LORA_FUSED_LORA_LINEAR=0)
        run_job smoke "train-tiny-$mp" "{}" \
            env "${off[@]}" "$BIN" train --set train.max_train_steps=20 --set train.mixed_precision=$mp \
            --set output.output_dir="$WORK/smoke" --set output.sample_steps=4
        # `trainer generate` with that LoRA merged in, at the bench's precision.
        lora=$(ls "$WORK"/smoke/*.safetensors 2>/dev/null | head -1)
        if [ -n "$lora" ]; then
            run_job smoke "generate-tiny-$PRECISION" "{}" \
                env "${off[@]}" "$BIN" generate --prompt "a red circle, demostyle" --lora "$lora" --precision "$PRECISION" \
                --width 64 --height 64 --steps 4 --out "$WORK/smoke/generate.png"
        fi
    fi

    # 1c. the same three training steps on the CPU and on the device, f32, one seed: the
    # noise, timesteps, data order and initial adapters come from host streams, so the two
    # LoRA files differ only by the kernels' rounding (and TF32 where cuDNN uses it).
    if [ "${PARITY:-1}" = 1 ] && [ "$DEVICE" != cpu ]; then
        local common=(train --set train.max_train_steps=3 --set train.mixed_precision=no
            --set output.save_precision=f32 --set "output.sample_prompts=[]")
        run_job smoke parity-train-cpu "{}" \
            env SD_LORA_DEVICE=cpu "$BIN" "${common[@]}" --set output.output_dir="$WORK/parity-cpu"
        run_job smoke "parity-train-$DEVICE" "{}" \
            env SD_LORA_DEVICE="$DEVICE" "$BIN" "${common[@]}" --set output.output_dir="$WORK/parity-$DEVICE"
        local a b
        a=$(ls "$WORK"/parity-cpu/*.safetensors 2>/dev/null | head -1)
        b=$(ls "$WORK/parity-$DEVICE"/*.safetensors 2>/dev/null | head -1)
        if [ -n "$a" ] && [ -n "$b" ]; then
            run_job smoke "parity-lora-$DEVICE-vs-cpu" "{}" "$PY" "$HERE/lora_parity.py" "$a" "$b" --tolerance 0.05
        else
            say "parity: a LoRA file is missing (cpu: ${a:-none}, $DEVICE: ${b:-none})"
        fi
    fi
}

# --- 2. the PyTorch anchor, once for every train batch of the plan ---------------------------
# The anchor needs diffusers (and peft): the image may lack it, prepare.sh ships the wheels.
ensure_diffusers() {
    "$PYTHON" -c "import diffusers" 2>/dev/null && return
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/sdlora-site "$WHEELS"/*.whl >>"$LOG" 2>&1
        export PYTHONPATH="/tmp/sdlora-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        say "anchor: diffusers is missing and there are no wheels in $WHEELS"
    fi
}
if [ "$DEVICE" = cuda ]; then anchor_unet=sd15 anchor_res=512; else anchor_unet=tiny anchor_res=64; fi
batches=""
for p in $PLAN; do
    IFS=: read -r cfg res batch mode _ <<<"$p"
    if [ "$cfg" = "$anchor_unet" ] && [ "$res" = "$anchor_res" ] && [ "$mode" = train ]; then
        case ",$batches," in *",$batch,"*) ;; *) batches="${batches:+$batches,}$batch" ;; esac
    fi
done
if [ "$ANCHOR" = none ] || [ -z "$batches" ]; then
    say "anchor: skipped (ANCHOR=none or no $anchor_unet train setting at $anchor_res)"
elif [ ! -f "$ANCHOR" ]; then
    say "anchor: skipped, no script at $ANCHOR (copy ../shared/bench/torch_anchor.py there)"
else
    ensure_diffusers
    tiny=()
    [ "$DEVICE" = cuda ] || tiny=(--tiny)
    export PYTHONUNBUFFERED=1
    run_job torch anchor "{\"unet\": \"$anchor_unet\", \"resolution\": $anchor_res}" \
        "$PYTHON" "$ANCHOR" "${tiny[@]}" --device "$DEVICE" --batches "$batches" --steps "$ANCHOR_STEPS"
fi

# --- 3. our benchmark -----------------------------------------------------------------------
# bench_flags OPTS: from a PLAN / PROFILE / CHECKS entry's options, sets `flag` (trainer's
# arguments), `suffix` (for job names) and `is_ckpt`; other words are left to the caller.
bench_flags() {
    # From burn's kernels (every fast path is the trainer's default): the words add each one.
    flag=(--burn-kernels) envs=() is_ckpt=false suffix=
    for o in ${1//:/ }; do
        case $o in
            ckpt) flag+=(--grad-checkpointing); is_ckpt=true; suffix="$suffix-ckpt" ;;
            plain) flag+=(--plain-autodiff); suffix="$suffix-plain" ;;
            unmerged) flag+=(--lora-unmerged); suffix="$suffix-unmerged" ;;
            cudnn) flag+=(--cudnn); suffix="$suffix-cudnn" ;;
            cublas) flag+=(--cublas); suffix="$suffix-cublas" ;;
            device) [ "$DSYNC" = 1 ] && flag+=(--vendor-sync device) && suffix="$suffix-gpusync" ;;
            softmax) [ "$FUSED_SOFTMAX" = 1 ] && flag+=(--fused-softmax) && suffix="$suffix-fsoftmax" ;;
            flash) [ "$FLASH" = 1 ] && flag+=(--flash-attention) && suffix="$suffix-flash" ;;
            gn) [ "$FUSED_GN" = 1 ] && flag+=(--fused-group-norm) && suffix="$suffix-fgn" ;;
            tuned) flag+=(--tuned-matmul); suffix="$suffix-tuned" ;;
            hybrid) flag+=(--flash-max-keys 1024); suffix="$suffix-flash1k" ;;
            cudnnattn) [ "$CUDNN_ATTN" = 1 ] && flag+=(--cudnn-attention) && suffix="$suffix-cudnnattn" ;;
            lora) [ "$FUSED_LORA" = 1 ] && flag+=(--fused-lora-linear) && suffix="$suffix-flora" ;;
            smem96) envs+=(SD_LORA_FLASH_SHARED_KIB=96); suffix="$suffix-smem96" ;;
            prefetch) envs+=(SD_LORA_FLASH_PREFETCH=1); suffix="$suffix-prefetch" ;;
            cublasmin) envs+=(SD_LORA_CUBLAS_MIN_GFLOP=${CUBLAS_MIN_GFLOP:-0.25}); suffix="$suffix-cublas${CUBLAS_MIN_GFLOP:-0.25}" ;;
            talloff) envs+=(SD_LORA_CUBLAS_TALL_MIN_GFLOP=4); suffix="$suffix-talloff" ;;
            tall512) envs+=(SD_LORA_CUBLAS_TALL_ROWS=512); suffix="$suffix-tall512" ;;
            # Another adapter form than LoRA (`--lora-algo`): end-to-end timings, not ratios.
            loha|lokr|oft|diag-oft|boft|glora|ia3|full) flag+=(--lora-algo "$o"); suffix="$suffix-$o" ;;
            # LyCORIS' norm modules beside the adapters (the transformers' norms need attn-mlp).
            attnmlp) flag+=(--lora-targets attn-mlp); suffix="$suffix-attnmlp" ;;
            norm) flag+=(--lora-train-norm --lora-targets attn-mlp); suffix="$suffix-norm" ;;
        esac
    done
}
# Per-kernel profiles (PROFILE): one step of ours and of the anchor under Nsight Compute.
# Each side runs its warm-up as usual and turns the profiler on for one step only (ours:
# `trainer bench --cuda-profiler-step`; the anchor: anchor_profile.py), so ncu times just
# that step's kernels, one at a time, with the clocks left alone.
NCU=${NCU:-$(command -v ncu 2>/dev/null || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)}
# The options this ncu knows, of those wanted beside the essential ones (ncu_report.py reads
# any units and kernel-name style).
ncu_options() {
    local help opt
    help=$("$NCU" --help 2>&1)
    ncu_flags=(--profile-from-start off --metrics gpu__time_duration.sum --csv)
    for opt in "--clock-control none" "--cache-control none" "--print-units base" "--print-kernel-base function"; do
        if grep -q -- "${opt%% *}" <<<"$help"; then
            read -ra words <<<"$opt"
            ncu_flags+=("${words[@]}")
        else
            say "profile: this ncu has no ${opt%% *} option; profiling without it"
        fi
    done
}
profiles_done=0
run_profiles() {
    [ "$profiles_done" = 1 ] && return
    profiles_done=1
    local p name torch_csv ckpt
    for p in $PROFILE; do
        [ "$p" = none ] && continue
        if [ "$DEVICE" != cuda ] || [ -z "$NCU" ]; then
            say "profile: skipped (it needs DEVICE=cuda and Nsight Compute's ncu; NCU='$NCU')"
            break
        fi
        [ -n "${ncu_flags+x}" ] || ncu_options
        IFS=: read -r cfg res batch mode opts <<<"$p"
        bench_flags "$opts"
        name="profile-$cfg-r$res-b$batch-$mode$suffix"
        run_job smoke "$name-ours" "{}" "$NCU" "${ncu_flags[@]}" --log-file "$WORK/$name-ours.csv" \
            "$BIN" bench --unet-config "$cfg" --resolution "$res" --batch "$batch" --mode "$mode" \
            --steps 1 --device "$DEVICE" --precision "$PRECISION" "${flag[@]}" --cuda-profiler-step
        torch_csv=()
        if [ "${PROFILE_TORCH:-1}" = 1 ] && [ "$cfg:$res" = "$anchor_unet:$anchor_res" ] && [ -f "$ANCHOR" ] && [ "$ANCHOR" != none ]; then
            ensure_diffusers
            ckpt=()
            [ "$is_ckpt" = true ] && ckpt=(--ckpt)
            run_job smoke "$name-torch" "{}" "$NCU" "${ncu_flags[@]}" --log-file "$WORK/$name-torch.csv" \
                "$PYTHON" "$HERE/anchor_profile.py" "$ANCHOR" --batch "$batch" --mode "$mode" "${ckpt[@]}"
            torch_csv=(--torch "$WORK/$name-torch.csv")
        fi
        { "$PY" "$HERE/ncu_report.py" --ours "$WORK/$name-ours.csv" "${torch_csv[@]}" --title "$p" --top 20 && echo; } \
            >>"$OUT/profile.md" 2>>"$LOG" || say "$name: no profile table (see $LOG)"
    done
}

rm -f "$OUT/profile.md"
planned=0
ran=" "
for p in $PLAN; do
    [ "$p" = none ] && continue
    [ "$planned" = "$CHECKS_AFTER" ] && run_checks
    [ "$planned" = "$PROFILE_AFTER" ] && run_profiles
    planned=$((planned + 1))
    IFS=: read -r cfg res batch mode opts <<<"$p"
    bench_flags "$opts"
    # A setting whose switches were dropped (a failed kernel test) may repeat an earlier one.
    case "$ran" in *" $cfg-r$res-b$batch-$mode$suffix "*) say "$cfg-r$res-b$batch-$mode$suffix: already timed"; continue ;; esac
    ran="$ran$cfg-r$res-b$batch-$mode$suffix "
    run_job ours "$cfg-r$res-b$batch-$mode$suffix" \
        "{\"unet\": \"$cfg\", \"resolution\": $res, \"batch\": $batch, \"mode\": \"$mode\", \"ckpt\": $is_ckpt}" \
        env "${envs[@]}" "$BIN" bench --unet-config "$cfg" --resolution "$res" --batch "$batch" --mode "$mode" \
        --steps "$STEPS" --device "$DEVICE" --precision "$PRECISION" "${flag[@]}"
done
run_checks
run_profiles

# --- 3b. per-op A/B: each kernel of ours against burn's ops at SD1.5's shapes ----------------
if [ "${OPS:-1}" = 1 ]; then
    if [ "$DEVICE" = cuda ]; then ops_size=(--batch 8 --resolution 512); else ops_size=(--batch 1 --resolution 64); fi
    run_job smoke "ops-ours-vs-burn" "{}" \
        timeout -k 5 120 "$BIN" bench-ops --device "$DEVICE" --precision "$PRECISION" "${ops_size[@]}"
    grep '^|' "$WORK/ops-ours-vs-burn.out" >"$OUT/ops.md" 2>/dev/null || rm -f "$OUT/ops.md"
fi

# --- 4. caches and the table ----------------------------------------------------------------
if [ -n "$(ls -A "$CACHE" 2>/dev/null)" ]; then
    tar -czf "$OUT/cubecl-cache.tar.gz" -C "$CACHE" . 2>>"$LOG"
    if [ "$(stat -c %s "$OUT/cubecl-cache.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
        # Files over 16 MiB do not come back: drop the driver's cache, then give up.
        tar -czf "$OUT/cubecl-cache.tar.gz" --exclude=./nv -C "$CACHE" . 2>>"$LOG"
        [ "$(stat -c %s "$OUT/cubecl-cache.tar.gz")" -gt $((15 * 1024 * 1024)) ] && rm -f "$OUT/cubecl-cache.tar.gz"
    fi
    [ -f "$OUT/cubecl-cache.tar.gz" ] && say "caches archived: $OUT/cubecl-cache.tar.gz ($(du -h "$OUT/cubecl-cache.tar.gz" | cut -f1))"
fi
"$PY" "$HERE/report.py" table "$RESULTS" --info "$INFO" >"$OUT/summary.md" 2>>"$LOG"
say "total $(( $(date +%s) - START ))s; raw JSON in $RESULTS, log in $LOG"
echo
if [ -s "$OUT/profile.md" ]; then
    cat "$OUT/profile.md"
fi
if [ -s "$OUT/ops.md" ]; then
    echo "Per-op A/B (\`trainer bench-ops\`: median ms with each switch off, i.e. burn's ops or a tuning option's default, and on):"
    echo
    cat "$OUT/ops.md"
    echo
fi
cat "$OUT/summary.md"
