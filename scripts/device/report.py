#!/usr/bin/env python3
"""Collects the JSON lines of `trainer device-check`, `trainer bench` and the PyTorch anchor
into one results file, and prints the ratio table (used by scripts/device/run.sh).

  report.py collect --source ours|torch|check|smoke --name NAME --rc RC --wall S --cmd CMD \
      --stdout FILE --stderr FILE [--setting JSON]      # appends records to stdout
  report.py table RESULTS.jsonl [--info FILE]...         # prints the Markdown summary

Standard library only: it runs on the GPU machine's Python and on any python3 here.
"""
import argparse
import json
import sys


def json_lines(path):
    """Every line of `path` that is a JSON object, in order."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{") and line.endswith("}"):
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(obj, dict):
                        out.append(obj)
    except OSError:
        pass
    return out


def tail(path, n=12):
    """The error message of a failed run: anyhow's `Error:` block or a panic message (without
    the backtrace) where there is one, else the last `n` lines."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [l.rstrip() for l in f if l.strip()]
    except OSError:
        return ""
    picked = []
    for i, line in enumerate(lines):
        if line.startswith("Error:") or "panicked at" in line:
            block = [line]
            for more in lines[i + 1 : i + 6]:
                if more.startswith(("Stack backtrace", "note:", "stack backtrace")) or more.lstrip()[:3] == "0: ":
                    break
                block.append(more)
            picked += block
    return "\n".join(picked[:n]) if picked else "\n".join(lines[-n:])


def collect(a):
    base = {"source": a.source, "name": a.name, "rc": a.rc, "wall_s": a.wall, "cmd": a.cmd}
    if a.setting:
        base["setting"] = json.loads(a.setting)
    if a.source == "smoke":
        # A whole `trainer train` run: it passes when it exits cleanly.
        rec = dict(base, result={"pass": a.rc == 0})
        # lora_parity.py's summary (the relative error of the device's LoRA file).
        last = json_lines(a.stdout)[-1:]
        if last and "rel_l2" in last[0]:
            rec["result"]["rel_l2"] = last[0]["rel_l2"]
        if a.rc != 0:
            rec["error"] = tail(a.stderr) or tail(a.stdout) or f"exit status {a.rc}, no output"
        print(json.dumps(rec))
        return
    objs = json_lines(a.stdout)
    if a.source in ("ours", "check"):
        # Our binaries print their result as the last stdout line.
        objs = objs[-1:]
    records = [dict(base, result=o) for o in objs]
    if not records or a.rc != 0:
        err = dict(base, error=tail(a.stderr) or tail(a.stdout) or f"exit status {a.rc}, no output")
        if a.rc == 124 or a.rc == 137:
            err["error"] = f"timed out (exit {a.rc})\n" + err["error"]
        records.append(err)
    for r in records:
        print(json.dumps(r))


def fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if v != 0 and (abs(v) < 10 ** -(digits - 1) or abs(v) >= 10 ** 5):
            return f"{v:.2e}"
        return f"{v:.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"
    return str(v)


def vendor_cell(res):
    """What ran in vendor libraries: `dnn calls/blas calls/fallbacks`, then how the calls were
    ordered (`host`, or `gpu N` for N GPU-ordered calls, with any spin timeouts), then
    `softmax N` for N fused softmaxes, `flash N` for N flash-attention passes, `sdpa N` for N
    attention passes in cuDNN's fused attention, `gn N` for N
    fused GroupNorm passes and `fixed N` for N matmuls in the fixed (not autotuned) kernel;
    `off` without --cudnn or --cublas,
    `–` for binaries that do not report it."""
    v = res.get("vendor")
    if not isinstance(v, dict):
        return "–"
    softmax = f" softmax {v.get('fused_softmax_calls', 0)}" if v.get("fused_softmax") else ""
    if v.get("flash_attention"):
        softmax += f" flash {v.get('flash_attention_calls', 0)}"
    if v.get("cudnn_attention"):
        softmax += f" sdpa {v.get('cudnn_attention_calls', 0)}"
    if v.get("fused_group_norm"):
        softmax += f" gn {v.get('fused_group_norm_calls', 0)}"
    if v.get("fixed_matmul"):
        softmax += f" fixed {v.get('fixed_matmul_calls', 0)}"
    if not (v.get("cudnn") or v.get("cublas")):
        return "off" + softmax
    cell = f"{v.get('cudnn_calls', 0)}/{v.get('cublas_calls', 0)}/{v.get('fallbacks', 0)}"
    if v.get("sync") == "device":
        cell += f" gpu {v.get('device_ordered', 0)}"
        if v.get("ordering_timeouts"):
            cell += f" TIMEOUTS {v['ordering_timeouts']}"
        if v.get("ordering_error"):
            cell += " (" + str(v["ordering_error"])[:60] + ")"
    elif "sync" in v:
        cell += " host"
    return cell + softmax + (" (" + str(v["last_error"])[:60] + ")" if v.get("last_error") else "")


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def back_to_back(res):
    """Our steps timed back to back (as the anchor times its own); results from before the
    field existed fall back to the synced median."""
    s = res.get("back_to_back_s_per_step")
    if s is None:
        return {"s": res.get("s_per_step"), "img_s": res.get("img_per_s")}
    return {"s": s, "img_s": res.get("back_to_back_img_per_s")}


def anchor_adapters(res):
    """Whether our run trained the anchor's adapters (LoRA rank 4 on attention, nothing
    else), so that a ratio against the anchor means something: results from before a key
    existed count as its default."""
    return res.get("algo", "lora") == "lora" and not res.get("train_norm") and res.get("lora_targets", "attn") == "attn"


def torch_row(records, setting):
    """The anchor's measurement matching one of our settings, or None."""
    for r in records:
        if r["source"] != "torch" or "result" not in r:
            continue
        s, res = r.get("setting", {}), r["result"]
        if s.get("unet") != setting.get("unet") or s.get("resolution") != setting.get("resolution"):
            continue
        if setting["mode"] == "train" and res.get("what") == "train_step":
            if res.get("batch") == setting["batch"] and bool(res.get("grad_ckpt")) == setting["ckpt"] and not res.get("full_step"):
                return {"s": res.get("s_per_step"), "img_s": res.get("img_s"), "mem": res.get("peak_gib")}
        if setting["mode"] == "infer" and res.get("what") == "infer_cfg_unet_step" and setting["batch"] == 1:
            return {"s": res.get("s"), "img_s": res.get("it_s"), "mem": None}
    return None


def table(a):
    records = []
    with open(a.results, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    out = []
    env = {}
    for path in a.info or []:
        try:
            with open(path, encoding="utf-8") as f:
                for l in f:
                    if l.strip():
                        out.append("    " + l.rstrip())
                        key, _, value = l.partition(":")
                        env.setdefault(key.strip(), value.strip())
        except OSError:
            pass
    if out:
        out = ["Environment:", ""] + out + [""]

    checks = [r for r in records if r["source"] == "check"]
    if checks:
        out += ["Correctness (relative error against the f32 CPU reference: rel_l2 / max_rel):", ""]
        out += ["| check | output | grad up | grad down | tolerance | pass | device s | cuDNN/cuBLAS calls/fallbacks |", "|---|---|---|---|---|---|---|---|"]
        for r in checks:
            res = r.get("result")
            if res is None:
                out.append(f"| {r['name']} | error (rc {r['rc']}) | | | | no | |")
                continue
            cell = lambda e: f"{fmt(e['rel_l2'], 2)} / {fmt(e['max_rel'], 2)}" + ("" if e["finite"] else " NaN!")
            out.append(
                f"| {r['name']} | {cell(res['output'])} | {cell(res['grad_up'])} | {cell(res['grad_down'])} "
                f"| {fmt(res['tolerance'], 2)} | {fmt(res['pass'])} | {fmt(res['device_s'])} | {vendor_cell(res)} |"
            )
        out.append("")

    smokes = [r for r in records if r["source"] == "smoke"]
    if smokes:
        out += ["Runs that pass when they exit cleanly (`trainer train` on the tiny model and the demo data; the kernel tests: cuDNN and cuBLAS against burn, GPU- against host-ordered library calls, the fused softmax against burn, flash attention against the same math in burn's ops, the fused GroupNorm against burn; the per-op A/B `trainer bench-ops` and the ncu profiles of one step, ours and PyTorch's, whose tables are printed above):", ""]
        out += ["| run | pass | wall s | relative L2 (parity) |", "|---|---|---|---|"]
        for r in smokes:
            res = r.get("result", {})
            out.append(f"| {r['name']} | {'yes' if res.get('pass') else 'no'} | {fmt(r.get('wall_s'))} | {fmt(res.get('rel_l2'), 2)} |")
        out.append("")

    ours = [r for r in records if r["source"] == "ours"]
    if ours:
        out += [
            "Throughput (ours vs the PyTorch anchor — bf16 weights, autocast, SDPA — on the same card;",
            "a ratio > 1 means ours is faster / uses more memory). The anchor times its steps back to",
            "back with one sync at the end; so does ours' `b2b` column, which the ratio uses. `synced`",
            "is the median of steps each followed by a device sync (the host cannot queue ahead):",
            "",
        ]
        out += [
            "| setting | precision | ours s/step synced | ours s/step b2b | torch s/step | ours img/s b2b | torch img/s | img/s ratio | ours peak GiB (in use / reserved) | torch peak GiB | mem ratio | ours first step s | cuDNN/cuBLAS calls/fallbacks |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ours:
            s = r.get("setting", {})
            res = r.get("result")
            if res is None:
                first = r.get("error", "").splitlines()[:1]
                out.append(f"| {r['name']} | | error (rc {r['rc']}): {first[0][:80] if first else ''} | | | | | | | | | |")
                continue
            t = torch_row(records, s) if s and anchor_adapters(res) else None
            mem = res.get("peak_mem_gib")
            reserved = res.get("peak_reserved_gib")
            mem_cell = fmt(mem) + (f" / {fmt(reserved)}" if reserved is not None else "")
            b2b = back_to_back(res)
            out.append(
                f"| {r['name']} | {res.get('precision')} | {fmt(res.get('s_per_step'))} | {fmt(b2b['s'])} | {fmt(t and t['s'])} "
                f"| {fmt(b2b['img_s'])} | {fmt(t and t['img_s'])} | {fmt(ratio(b2b['img_s'], t and t['img_s']))} "
                f"| {mem_cell} | {fmt(t and t['mem'])} | {fmt(ratio(mem, t and t['mem']))} | {fmt(res.get('first_step_s'))} | {vendor_cell(res)} |"
            )
        out.append("")
        card = env.get("gpu") or env.get("cpu") or "?"
        date = env.get("date", "?")[:10]
        commit = env.get("commit", "?")
        out += ["Rows for docs/benchmarks.md (date | card | commit | command | s/step | img/s | notes):", ""]
        for r in ours:
            res = r.get("result")
            if res is None:
                continue
            s = r.get("setting", {})
            t = torch_row(records, s) if s and anchor_adapters(res) else None
            cmd = r.get("cmd", "").split(" bench ", 1)[-1]
            b2b = back_to_back(res)
            notes = f"back to back {fmt(b2b['s'])} s/step, {fmt(b2b['img_s'])} img/s; peak {fmt(res.get('peak_mem_gib'))} GiB, first step {fmt(res.get('first_step_s'))} s"
            if t:
                notes += f"; torch {fmt(t['img_s'])} img/s ({fmt(ratio(b2b['img_s'], t['img_s']))}x)"
            out.append(
                f"| {date} | {card} | {commit} | `trainer bench {cmd}` | {fmt(res.get('s_per_step'))} "
                f"| {fmt(res.get('img_per_s'))} | {notes} |"
            )
        out.append("")
    errors = [r for r in records if "error" in r]
    for r in errors:
        out.append(f"[{r['source']} {r['name']}] rc={r['rc']}: " + r["error"].replace("\n", "\n    "))
    print("\n".join(out))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd_name", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--source", required=True, choices=["ours", "torch", "check", "smoke"])
    c.add_argument("--name", required=True)
    c.add_argument("--rc", type=int, required=True)
    c.add_argument("--wall", type=float, default=None)
    c.add_argument("--cmd", default="")
    c.add_argument("--stdout", required=True)
    c.add_argument("--stderr", required=True)
    c.add_argument("--setting", default=None)
    t = sub.add_parser("table")
    t.add_argument("results")
    t.add_argument("--info", action="append")
    a = p.parse_args()
    collect(a) if a.cmd_name == "collect" else table(a)


if __name__ == "__main__":
    sys.exit(main())
