"""Runs the PyTorch anchor (../shared/bench/torch_anchor.py) with CUDA's profiler collecting
over exactly one of its timed steps, for `ncu --profile-from-start off` (the profile stage of
scripts/device/run.sh; the counterpart of `trainer bench --cuda-profiler-step`).

    python3 anchor_profile.py ANCHOR --batch 8 [--ckpt] [--mode train|infer] [--tiny --device cpu]

The anchor file is not changed: its source is read, each of its timed loops is wrapped in
memory, and it runs as it would (`--batches B --steps 1`: three warm-ups, then one timed step
per setting). The wrapped loop calls `cudaProfilerStart` / `cudaProfilerStop` around the one
step whose setting matches (train: batch B, latents only, gradient checkpointing as asked;
infer: its CFG UNet step), each after a device sync. When the anchor's loops no longer read
as expected, this exits with status 3 and says so, rather than profile something else.
`--tiny --device cpu` runs the same wrapping on the anchor's tiny models without CUDA (no
profiler calls), which is how the wrapping is tested without a GPU.
"""
import argparse
import sys

import torch
import torch.cuda.profiler

TRAIN_LOOP = "for _ in range(a.steps): step(bs, full, ckpt)"
INFER_LOOP = "for _ in range(a.steps): unet(x, torch.tensor([500, 500], device=dev), encoder_hidden_states=ctx)"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("anchor")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ckpt", action="store_true")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--tiny", action="store_true", help="the anchor's tiny models")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()

    with open(a.anchor) as f:
        source = f.read()
    for loop in (TRAIN_LOOP, INFER_LOOP):
        if source.count(loop) != 1:
            print(f"anchor_profile: {a.anchor} no longer holds the timed loop `{loop}` once; "
                  "update TRAIN_LOOP / INFER_LOOP in this script", file=sys.stderr)
            sys.exit(3)
    source = source.replace(TRAIN_LOOP, "for _ in range(a.steps): _profiled(('train', bs, full, ckpt), lambda: step(bs, full, ckpt))")
    source = source.replace(INFER_LOOP, "for _ in range(a.steps): _profiled(('infer',), lambda: unet(x, torch.tensor([500, 500], device=dev), encoder_hidden_states=ctx))")

    wanted = ("train", a.batch, False, a.ckpt) if a.mode == "train" else ("infer",)
    done = []

    def profiled(key, run):
        if key != wanted or done:
            return run()
        if a.device != "cuda":
            done.append(key)
            print(f"anchor_profile: would profile one step of {key} (no CUDA: not profiled)", file=sys.stderr, flush=True)
            return run()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        out = run()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        done.append(key)
        print(f"anchor_profile: profiled one step of {key}", file=sys.stderr, flush=True)
        return out

    # The inference part runs after the training settings whatever they are; the anchor's
    # batch list only needs the profiled batch.
    sys.argv = [a.anchor, "--batches", str(a.batch if a.mode == "train" else 1), "--steps", "1", "--device", a.device]
    if a.tiny:
        sys.argv.append("--tiny")
    exec(compile(source, a.anchor, "exec"), {"__name__": "__main__", "_profiled": profiled})
    if not done:
        print(f"anchor_profile: the anchor never ran the setting {wanted}", file=sys.stderr)
        sys.exit(4)


if __name__ == "__main__":
    main()
