"""Where a fast-backend decode step spends its time (issue 14's "next lever" evidence), on the card:

    python tests/profile_decode.py --out profile.txt [--batch 64]

Times one decode step with and without CUDA graphs (the same two-length difference as bench.py), then
profiles the eager fast backend for a few steps: GPU kernel time per step, kernels per step, and the
kernels that take the most time. Kernel time close to the graph step time means the GPU is busy and the
next lever is fewer or faster kernels; kernel time far below it means launch or host overhead. On CPU it
runs the tiny config in seconds (a smoke test of the script, not a measurement).
"""
import argparse
import dataclasses
import os
import sys
from types import SimpleNamespace

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
import bench  # noqa: E402
import decode  # noqa: E402


def kernels(model, ids, mask, cfg, n):
    """{kernel name: (ms, calls)} of one eager generate of n tokens; only device-side events count (an op's
    own device time would count its kernels twice)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.GPU else [])
    with profile(activities=activities) as prof:
        bench.run(model, ids, mask, "fast", n, stats=True, base=cfg)
        bench.sync()
    out = {}
    for a in prof.key_averages():
        if str(getattr(a, "device_type", "")).endswith("CUDA"):
            out[a.key] = (getattr(a, "self_device_time_total", 0) / 1e3, a.count)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profile.txt")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=64)
    args = ap.parse_args()
    model = bench.build_model("0.6b" if bench.GPU else "tiny", 0)
    ids, mask = bench.prompts(args.batch, args.prompt_len if bench.GPU else 32, model.config.vocab_size)
    n = args.new_tokens
    lines = [f"{bench.DEVICE} batch {args.batch}, prompt {ids.shape[1]}, {n} new tokens"]
    fast = decode.DecodeConfig(backend="fast")
    eager = dataclasses.replace(fast, cuda_graph=False)
    timing = SimpleNamespace(new_tokens=n, repeats=3)  # the two fields bench.decode_ms_per_step reads
    for name, cfg in (("cuda graph, kv_bucket 256", fast), ("cuda graph, kv_bucket 128",
                      dataclasses.replace(fast, kv_bucket=128)), ("eager, kv_bucket 256", eager)):
        ms, _ = bench.decode_ms_per_step(model, ids, mask, "fast", timing, base=cfg)
        lines.append(f"step ms, {name}: " + ("too noisy" if ms is None else f"{ms:.3f}"))
    kernels(model, ids, mask, eager, 2)  # warm-up outside the profile
    one, full = kernels(model, ids, mask, eager, 1), kernels(model, ids, mask, eager, n)
    per_step = {k: ((ms - one.get(k, (0, 0))[0]) / (n - 1), (calls - one.get(k, (0, 0))[1]) / (n - 1))
                for k, (ms, calls) in full.items()}
    total = sum(ms for ms, _ in per_step.values())
    launches = sum(c for _, c in per_step.values())
    lines.append(f"eager, per decode step (profile of {n} tokens minus that of 1): GPU kernel time {total:.3f} ms, "
                 f"{launches:.0f} kernels")
    lines.append("kernels by GPU time per step (ms, share, calls, name):")
    for k, (ms, calls) in sorted(per_step.items(), key=lambda kv: -kv[1][0])[:20]:
        lines.append(f"  {ms:7.3f}  {ms / max(total, 1e-9):5.1%}  {calls:5.0f}  {k[:100]}")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
