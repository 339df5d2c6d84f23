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
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules
import bench  # noqa: E402
import decode  # noqa: E402


def step_ms(model, ids, mask, graph, new_tokens, repeats=3):
    cfg = decode.DecodeConfig(max_new_tokens=1, backend="fast", cuda_graph=graph)

    def timed(n):
        best = float("inf")
        for _ in range(repeats):
            bench.sync()
            start = time.perf_counter()
            decode.generate(model, ids, mask, dataclasses.replace(cfg, max_new_tokens=n), eos_ids=[],
                            pad_id=0, stats=True, generator=torch.Generator(ids.device).manual_seed(0))
            bench.sync()
            best = min(best, time.perf_counter() - start)
        return best

    timed(8)  # warm-up: allocations, graph capture
    return 1e3 * (timed(new_tokens) - timed(1)) / (new_tokens - 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profile.txt")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=64)
    args = ap.parse_args()
    model = bench.build_model("0.6b" if bench.GPU else "tiny", 0)
    ids, mask = bench.prompts(args.batch, args.prompt_len if bench.GPU else 32, model.config.vocab_size)
    lines = [f"{bench.DEVICE} batch {args.batch}, prompt {ids.shape[1]}, {args.new_tokens} new tokens"]
    for graph in (True, False):
        lines.append(f"step ms, cuda_graph={graph}: {step_ms(model, ids, mask, graph, args.new_tokens):.3f}")
    cfg = decode.DecodeConfig(max_new_tokens=args.new_tokens, backend="fast", cuda_graph=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.GPU else [])
    with profile(activities=activities) as prof:
        decode.generate(model, ids, mask, cfg, eos_ids=[], pad_id=0, stats=True,
                        generator=torch.Generator(ids.device).manual_seed(0))
        bench.sync()
    averages = prof.key_averages()
    device_us = [getattr(a, "self_device_time_total", getattr(a, "self_cuda_time_total", 0)) for a in averages]
    kernels = [(us, a) for us, a in zip(device_us, averages) if us > 0]
    total_ms = sum(us for us, _ in kernels) / 1e3
    launches = sum(a.count for _, a in kernels)
    lines.append(f"eager profile over prefill + {args.new_tokens} steps: GPU kernel time {total_ms:.2f} ms, "
                 f"{launches} kernels ({launches / args.new_tokens:.0f} per step incl. prefill share)")
    lines.append("top kernels by GPU time (ms total, calls, name):")
    for us, a in sorted(kernels, key=lambda k: -k[0])[:20]:
        lines.append(f"  {us / 1e3:9.3f}  {a.count:6d}  {a.key[:110]}")
    sort = "self_cuda_time_total" if bench.GPU else "self_cpu_time_total"
    try:
        table = averages.table(sort_by=sort, row_limit=25)
    except (AttributeError, KeyError):
        table = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    text = "\n".join(lines) + "\n\n" + table + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
