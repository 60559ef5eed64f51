"""Compares two LoRA files tensor by tensor: the same training run on two devices.

  lora_parity.py REFERENCE.safetensors OTHER.safetensors [--tolerance 0.05]

Both files must hold the same tensor names and shapes. The relative L2 error
(‖other − reference‖ / ‖reference‖) is pooled per kind of tensor (the name's last two
parts: `lora_up.weight`, `lora_down.weight`, `hada_w1_a`, ...), because the kinds differ by
orders of magnitude: after a few steps a LoRA's `up` holds only the training's updates
(it starts at zero), its `down` mostly the initial draw, and pooled together the larger
kind would hide the other's error. Scalars (`alpha`) are compared exactly. Prints the ten
worst tensors, then a JSON object as the last line: the tensors compared, the error per
kind, the largest of them (`rel_l2`), the worst tensor, the tolerance and `pass`. Exits 1
when the files differ in names, shapes or scalars, hold a non-finite value, or a kind's
error is above the tolerance.

Standard library only (run.sh runs it with the GPU machine's Python, and tests run it here):
safetensors is an 8-byte header length, a JSON header and the raw little-endian tensors.
"""
import argparse
import json
import math
import struct
import sys


def read_safetensors(path):
    """{name: (shape, [float, ...])} for every tensor of `path` (F32, F16, BF16, F64)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: header of {n} bytes runs past the end of the file")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = body[start:end]
        dtype = info["dtype"]
        count = math.prod(info["shape"])
        if dtype == "F32":
            values = struct.unpack(f"<{count}f", raw)
        elif dtype == "F64":
            values = struct.unpack(f"<{count}d", raw)
        elif dtype == "F16":
            values = struct.unpack(f"<{count}e", raw)
        elif dtype == "BF16":
            # bf16 is the upper half of an f32.
            halves = struct.unpack(f"<{count}H", raw)
            values = struct.unpack(f"<{count}f", struct.pack(f"<{count}I", *(h << 16 for h in halves)))
        else:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype}, expected F32, F16, BF16 or F64")
        out[name] = (tuple(info["shape"]), values)
    return out


def kind(name):
    """The kind of tensor a name holds: its last two dot-separated parts."""
    return ".".join(name.split(".")[-2:])


def compare(reference, other):
    """(per-tensor [(name, rel_l2)], {kind: pooled rel_l2}, problems) of `other` against
    `reference`."""
    problems = []
    for name in sorted(set(reference) ^ set(other)):
        problems.append(f"{name}: only in {'the reference' if name in reference else 'the other file'}")
    per_tensor = []
    sums = {}
    for name in sorted(set(reference) & set(other)):
        (shape_r, r), (shape_o, o) = reference[name], other[name]
        if shape_r != shape_o:
            problems.append(f"{name}: shape {list(shape_o)}, expected {list(shape_r)}")
            continue
        if not all(math.isfinite(v) for v in o):
            problems.append(f"{name}: a non-finite value")
            continue
        if len(r) == 1:
            # alpha and other settings stored as scalars: written, not trained.
            if r != o:
                problems.append(f"{name}: {o[0]}, expected {r[0]}")
            continue
        d = sum((a - b) ** 2 for a, b in zip(r, o))
        s = sum(a * a for a in r)
        acc = sums.setdefault(kind(name), [0.0, 0.0])
        acc[0] += d
        acc[1] += s
        per_tensor.append((name, math.sqrt(d / s) if s > 0 else math.sqrt(d)))
    pooled = {k: math.sqrt(d / s) if s > 0 else math.sqrt(d) for k, (d, s) in sorted(sums.items())}
    return per_tensor, pooled, problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference")
    p.add_argument("other")
    p.add_argument("--tolerance", type=float, default=0.05)
    a = p.parse_args(argv)
    try:
        reference, other = read_safetensors(a.reference), read_safetensors(a.other)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    per_tensor, pooled, problems = compare(reference, other)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    worst = sorted(per_tensor, key=lambda t: -t[1])
    for name, err in worst[:10]:
        print(f"{err:.3e}  {name}")
    for k, err in pooled.items():
        print(f"{err:.3e}  all {k}")
    overall = max(pooled.values(), default=None)
    ok = not problems and overall is not None and overall <= a.tolerance
    print(json.dumps({
        "tensors": len(per_tensor),
        "kinds": pooled,
        "rel_l2": overall,
        "worst": {"name": worst[0][0], "rel_l2": worst[0][1]} if worst else None,
        "tolerance": a.tolerance,
        "pass": ok,
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
