"""Per-kernel GPU time of one training or inference step, ours against PyTorch's, from two
Nsight Compute CSV logs (standard library only; scripts/device/run.sh's profile stage).

    python3 ncu_report.py --ours OURS.csv [--torch TORCH.csv] [--title TEXT] [--top 12]

Each log is what `ncu --csv --print-units base --metrics gpu__time_duration.sum
--print-kernel-base function --log-file FILE` writes for the kernels of one step (the
details page: one row per kernel launch and metric). Kernels are grouped into classes by
name (matrix products, convolutions, attention, normalisation, layout and copies,
reductions, element-wise, other) and the markdown tables give, per class and per kernel
name, the launches and the summed durations. ncu runs the kernels one at a time, so the sum
is the step's GPU work without overlap or launch gaps; the plan's step times (without the
profiler) minus that sum is what the GPU spent waiting.
"""
import argparse
import csv
import re
import sys
from collections import defaultdict

METRIC = "gpu__time_duration.sum"
UNIT_MS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}

# First match wins: cuDNN's implicit GEMMs are convolutions, not matrix products.
CLASSES = [
    ("attention", r"flash|fmha|attention|attn|softmax"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit|winograd|im2col|col2im|nchw|nhwc"),
    ("matmul", r"gemm|gemv|matmul|xmma|cutlass|s16816|s1688|cublas"),
    ("normalisation", r"norm|moments|channel_stats|channel_grads|normalize|input_grad|welford"),
    ("layout and copies", r"copy|transpose|permute|contiguous|slice|concat|cat_|split|gather|scatter|index|interpolate|upsample|nearest"),
    ("reduction", r"reduce|sum|mean"),
    ("element-wise", r"elemwise|elementwise|binop|unary|cast|fill|full|adam|multi_tensor|fuse|scalar|mul|add|where|clamp"),
]


def classify(name):
    lower = name.lower()
    for label, pattern in CLASSES:
        if re.search(pattern, lower):
            return label
    return "other"


def read(path):
    """Kernel launches of an ncu CSV log: a list of (name, milliseconds)."""
    with open(path, newline="", errors="replace") as f:
        # ncu's own messages (`==PROF==`, `==WARNING==`) and the program's output may come
        # before the table: start at the header.
        lines = [line for line in f if line.startswith('"')]
    if not lines:
        raise ValueError(f"{path}: no CSV rows (did ncu profile anything?)")
    rows = list(csv.reader(lines))
    header = rows[0]
    need = ["ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value"]
    missing = [c for c in need if c not in header]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing from the header {header}")
    col = {c: header.index(c) for c in need}
    launches = {}
    for row in rows[1:]:
        if len(row) < len(header) or row[col["Metric Name"]] != METRIC:
            continue
        unit = row[col["Metric Unit"]].strip()
        if unit not in UNIT_MS:
            raise ValueError(f"{path}: unknown unit {unit!r} of {METRIC}")
        value = float(row[col["Metric Value"]].replace(",", ""))
        launches[row[col["ID"]]] = (row[col["Kernel Name"]], value * UNIT_MS[unit])
    if not launches:
        raise ValueError(f"{path}: no {METRIC} values")
    return list(launches.values())


def by(launches, key):
    """{key(name): [launches, ms]}."""
    out = defaultdict(lambda: [0, 0.0])
    for name, ms in launches:
        entry = out[key(name)]
        entry[0] += 1
        entry[1] += ms
    return out


def fmt_ratio(a, b):
    return f"{a / b:.2f}" if b > 0 else "–"


def class_table(ours, torch):
    ours_c, torch_c = by(ours, classify), by(torch or [], classify)
    labels = [label for label, _ in CLASSES] + ["other"]
    lines = []
    if torch is not None:
        lines += ["| class | ours ms | ours launches | PyTorch ms | PyTorch launches | ours / PyTorch (ms) |", "|---|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| class | ours ms | ours launches |", "|---|---:|---:|"]
    for label in labels:
        (on, oms), (tn, tms) = ours_c.get(label, (0, 0.0)), torch_c.get(label, (0, 0.0))
        if on == 0 and tn == 0:
            continue
        if torch is not None:
            lines.append(f"| {label} | {oms:.2f} | {on} | {tms:.2f} | {tn} | {fmt_ratio(oms, tms)} |")
        else:
            lines.append(f"| {label} | {oms:.2f} | {on} |")
    ot, on = sum(ms for _, ms in ours), len(ours)
    if torch is not None:
        tt, tn = sum(ms for _, ms in torch), len(torch)
        lines.append(f"| **all kernels** | **{ot:.2f}** | **{on}** | **{tt:.2f}** | **{tn}** | **{fmt_ratio(ot, tt)}** |")
    else:
        lines.append(f"| **all kernels** | **{ot:.2f}** | **{on}** |")
    return lines


def top_table(launches, top):
    total = sum(ms for _, ms in launches) or 1.0
    names = sorted(by(launches, lambda n: n).items(), key=lambda kv: -kv[1][1])[:top]
    lines = ["| kernel | class | launches | ms | share |", "|---|---|---:|---:|---:|"]
    for name, (n, ms) in names:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"| `{short}` | {classify(name)} | {n} | {ms:.2f} | {100 * ms / total:.1f}% |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", required=True)
    p.add_argument("--torch")
    p.add_argument("--title", default="one step")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    try:
        ours = read(a.ours)
    except (OSError, ValueError) as e:
        print(f"ncu_report: ours: {e}", file=sys.stderr)
        sys.exit(1)
    torch, torch_error = None, None
    if a.torch:
        try:
            torch = read(a.torch)
        except (OSError, ValueError) as e:
            torch_error = str(e)
    out = [f"GPU time per kernel class, {a.title} (ncu, kernels serialised; sum of `{METRIC}`):", ""]
    out += class_table(ours, torch)
    if torch_error:
        out += ["", f"(PyTorch's profile is missing: {torch_error})"]
    out += ["", f"Top {a.top} kernels, ours:", ""] + top_table(ours, a.top)
    if torch is not None:
        out += ["", f"Top {a.top} kernels, PyTorch:", ""] + top_table(torch, a.top)
    print("\n".join(out))


if __name__ == "__main__":
    main()
