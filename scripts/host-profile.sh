#!/usr/bin/env bash
# Where the host's CPU time goes in a LoRA training step on burn-fusion + CubeCL, without a
# GPU: runs sd-model's `launches` example on lavapipe (in the Debian sid chroot that
# scripts/vulkan-test.sh makes) and samples it with `perf` after its warm-up step.
#
#   bash scripts/host-profile.sh [SECONDS] [-- LAUNCHES_ARGS...]
#       SECONDS         how long to sample the measured steps (default 8)
#       LAUNCHES_ARGS   default: --precision f16 --fused-group-norm --fused-softmax
#                       --flash-attention --steps 30; the steps must outlast SKIP +
#                       SECONDS (at 64 px a step takes about 1.4 s on lavapipe here), or
#                       the run ends while `perf` samples it and the report is lost
#   SKIP=5              seconds not sampled after the warm-up step: the first step after
#                       it still plans (burn-fusion's plans for a step that ends in a sync,
#                       as the warm-up does, are not those for one that runs on)
#   SID=/opt/sid        the chroot (see scripts/vulkan-test.sh)
#   BIN=PATH            profile this `launches` binary instead of building one (A/B runs)
#
# Threads: the calling thread ("launches") records autodiff and hands every operation to
# burn-fusion through a 32-slot channel; a device thread ("DSU-…") runs burn-fusion's stream
# (plan matching, exploration, fused-kernel launches); lavapipe's threads execute the
# kernels. A thread that waits on a full channel spins (a `pause` loop), and on lavapipe the
# kernels are slow, so most samples of the two host threads are such waits. The report
# counts a sample as a wait when it falls in a `pause` loop of the binary or in the
# scheduler (the loops yield), and prints, per
# thread, the milliseconds per step that did work, with the busiest functions: that work is
# the host cost that a fast GPU leaves exposed.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SID=${SID:-/opt/sid}
SECONDS_TO_SAMPLE=8
RATE=499 # samples per second of CPU time, per thread
if [ $# -gt 0 ] && [ "$1" != "--" ]; then SECONDS_TO_SAMPLE=$1; shift; fi
[ "${1:-}" = "--" ] && shift
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--precision f16 --fused-group-norm --fused-softmax --flash-attention --steps 30)
command -v perf >/dev/null || { echo "perf is needed (linux-perf)" >&2; exit 1; }
[ -x "$SID/usr/bin/vulkaninfo" ] || { echo "no chroot at $SID: run scripts/vulkan-test.sh once" >&2; exit 1; }
for fs in proc dev sys; do
    mountpoint -q "$SID/$fs" || mount --bind "/$fs" "$SID/$fs"
done

cd "$REPO"
# BIN: a `launches` binary built earlier (an A/B against another commit's build).
if [ -z "${BIN:-}" ]; then
    cargo build --release -p sd-model --features vulkan-test --example launches
    BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/examples/launches"
fi
install -m 755 "$BIN" "$SID/work/launches"
# A fusion log in the working directory would slow every operation down.
rm -f "$SID/work/burn.toml"

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
chroot "$SID" sh -c "cd /work && CUBECL_AUTOTUNE_LEVEL=minimal ./launches ${ARGS[*]} --top 0" >"$OUT/run.log" 2>&1 &
RUN=$!
until grep -q "warm-up step done" "$OUT/run.log"; do
    kill -0 $RUN 2>/dev/null || { cat "$OUT/run.log" >&2; exit 1; }
    sleep 2
done
PID=$(pgrep -f "^./launches" | head -1)
sleep "${SKIP:-5}"
perf record -q -F "$RATE" -p "$PID" -o "$OUT/perf.data" -- sleep "$SECONDS_TO_SAMPLE" 2>/dev/null
wait $RUN
tail -1 "$OUT/run.log"

objdump -d --no-show-raw-insn "$SID/work/launches" | awk '$2 == "pause" { sub(":", "", $1); print $1 }' >"$OUT/pauses"
nm --defined-only "$SID/work/launches" >"$OUT/symbols"
perf script -i "$OUT/perf.data" --no-demangle -F comm,tid,ip,sym,symoff,dso -G 2>/dev/null >"$OUT/samples"
python3 - "$OUT" "$SECONDS_TO_SAMPLE" "$RATE" <<'EOF'
import bisect, collections, json, re, subprocess, sys
out, window, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
pauses = sorted(int(a, 16) for a in open(f"{out}/pauses"))
starts = {}
for line in open(f"{out}/symbols"):
    parts = line.split()
    if len(parts) == 3:
        starts.setdefault(parts[2], int(parts[0], 16))
report = json.loads(open(f"{out}/run.log").read().strip().splitlines()[-1])
steps = window / report["s_per_step"]
ms_per_sample = 1000.0 / rate

def per_step(samples):
    return samples * ms_per_sample / steps

def waiting(sym, off):
    # A `pause` up to 0x30 bytes before the sampled instruction: a spin-wait loop.
    if sym not in starts:
        return False
    addr = starts[sym] + off
    i = bisect.bisect_right(pauses, addr) - 1
    return i >= 0 and addr - pauses[i] <= 0x30

threads = collections.defaultdict(lambda: {"all": 0, "wait": 0, "work": collections.Counter()})
pattern = re.compile(r"^\s*(.+?)\s+(\d+)\s+[0-9a-f]+\s+(?:(\S+)\+0x([0-9a-f]+)|\[unknown\])\s+\((.*)\)$")
for line in open(f"{out}/samples"):
    m = pattern.match(line)
    if not m:
        continue
    comm, tid, dso = m.group(1), int(m.group(2)), m.group(5)
    sym, off = (m.group(3), int(m.group(4), 16)) if m.group(3) else ("[unknown]", 0)
    t = threads[(comm, tid)]
    t["all"] += 1
    # Spin loops end in a yield to the scheduler: its kernel and libc side is waiting too.
    yielding = re.search(r"sched|switch_to|finish_task_switch|futex", sym) and not dso.endswith("/launches")
    if yielding or (dso.endswith("/launches") and waiting(sym, off)):
        t["wait"] += 1
    else:
        t["work"][(sym, dso.rsplit("/", 1)[-1])] += 1
names = {}
mangled = sorted({sym for t in threads.values() for sym, _ in t["work"] if sym.startswith(("_ZN", "_R"))})
if mangled:
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    for s, d in zip(mangled, demangled):
        names[s] = re.sub(r"::h[0-9a-f]{16}$", "", d)
total = sum(t["all"] for t in threads.values())
print(f"\n{steps:.2f} steps sampled ({report['launches_per_step']:.0f} launches per step, {report['s_per_step']:.2f} s per step on lavapipe)\n")
print("| thread | ms/step sampled | of which waiting | working | µs per launch |")
print("|---|---:|---:|---:|---:|")
for (comm, tid), t in sorted(threads.items(), key=lambda kv: -kv[1]["all"]):
    if t["all"] < 0.02 * total:
        continue
    work = t["all"] - t["wait"]
    print(f"| {comm} ({tid}) | {per_step(t['all']):.0f} | {per_step(t['wait']):.0f} | {per_step(work):.0f} | {1000 * per_step(work) / report['launches_per_step']:.1f} |")
for (comm, tid), t in sorted(threads.items(), key=lambda kv: -kv[1]["all"]):
    if not (comm.startswith("launches") or comm.startswith("DSU")):
        continue
    print(f"\n{comm} ({tid}), busiest functions outside waits, ms/step:")
    for (sym, dso), n in t["work"].most_common(15):
        print(f"  {per_step(n):7.1f}  {names.get(sym, sym)[:110]} [{dso}]")
EOF
