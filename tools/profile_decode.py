"""Where a fast-backend decode step spends its time, per kernel set (DecodeConfig.kernels), on the card:

    python -m tools.profile_decode --out profile_decode.txt [--batch 64] [--kernels torch,triton]

1. Per kernel set: one decode step's time with CUDA graphs (the same two-length difference as bench.py), then
   a profile of the eager step: GPU kernel time per step, kernels per step, and the kernels that take the most
   time. Kernel time close to the graph step time means the GPU is busy and the next lever is fewer or faster
   kernels; kernel time far below it means launch or host overhead.
2. kv_bucket at rollout length: ms per step averaged over a whole rollout (--rollout_tokens new tokens), the
   Triton set at each bucket in --buckets and the torch set at the default bucket for reference, graphs captured
   in a first run (the fastest of --repeats counts). One graph per bucket the rollout crosses; a small bucket
   reads fewer padded columns on the torch kernels (the Triton attention reads only the columns a row uses,
   whatever the bucket, but launches programs for the whole bucket).
3. The attention kernel alone against torch SDPA at the same size (a full cache of prompt + rollout columns),
   and at other split counts and tile widths: time and the bandwidth of streaming K/V once, next to a
   device-to-device copy's bandwidth.

On CPU it runs the tiny config (a smoke test of the script, not a measurement; the Triton set only under
TRITON_INTERPRET=1, slowly).
"""
import argparse
import dataclasses
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from plumbing import decode
from speed import fastdecode
from tools import bench


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


def step_profile(model, ids, mask, cfg, n):
    """Lines: GPU kernel time and count per eager decode step (profile of n tokens minus that of 1), top kernels."""
    kernels(model, ids, mask, cfg, 2)  # warm-up outside the profile
    one, full = kernels(model, ids, mask, cfg, 1), kernels(model, ids, mask, cfg, n)
    per_step = {k: ((ms - one.get(k, (0, 0))[0]) / (n - 1), (calls - one.get(k, (0, 0))[1]) / (n - 1))
                for k, (ms, calls) in full.items()}
    total = sum(ms for ms, _ in per_step.values())
    launches = sum(c for _, c in per_step.values())
    lines = [f"  eager, per decode step (profile of {n} tokens minus that of 1): GPU kernel time {total:.3f} ms, "
             f"{launches:.0f} kernels", "  kernels by GPU time per step (ms, share, calls, name):"]
    for k, (ms, calls) in sorted(per_step.items(), key=lambda kv: -kv[1][0])[:15]:
        lines.append(f"    {ms:7.3f}  {ms / max(total, 1e-9):5.1%}  {calls:5.0f}  {k[:100]}")
    return lines


def median_ms(fn, iters=50):
    """Median ms of fn() after a warm-up: CUDA events on a GPU, the host clock (and 2 runs) on a CPU."""
    fn()
    times = []
    for _ in range(iters if bench.GPU else 2):
        if not bench.GPU:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def attention_alone(model, batch, cols):
    """Lines: the Triton attention and SDPA (as fastdecode's torch kernels call it) on one layer's full cache of
    `cols` columns, and a device-to-device copy, as ms and GB/s (K and V read once)."""
    from speed import tritondecode
    c = model.config
    Hkv, H, D = c.num_key_value_heads, c.num_attention_heads, c.head_dim
    dtype = torch.bfloat16 if bench.GPU else torch.float32
    cache = torch.randn(1, 2, batch, Hkv, cols, D, device=bench.DEVICE, dtype=dtype)
    q = torch.randn(batch, H, D, device=bench.DEVICE, dtype=dtype)
    start = torch.zeros(batch, device=bench.DEVICE, dtype=torch.long)
    col = torch.tensor([cols - 1], device=bench.DEVICE)
    programs = fastdecode._programs(bench.DEVICE)
    splits = tritondecode.n_splits(batch * Hkv, cols, programs)
    mask = torch.zeros(batch, 1, 1, cols, device=bench.DEVICE, dtype=dtype)
    kv_bytes = 2 * cache[0, 0].numel() * cache.element_size()
    lines = [f"attention alone: batch {batch}, {H} query / {Hkv} KV heads, head_dim {D}, {cols} columns attended, "
             f"K+V {kv_bytes / 1e6:.1f} MB per layer, {splits} splits ({programs} programs aimed at)"]
    runs = {"triton split-KV": lambda: tritondecode.decode_attention(q, cache, 0, start, col, cols, splits),
            "torch SDPA": lambda: F.scaled_dot_product_attention(q.view(batch, Hkv, H // Hkv, D), cache[0, 0],
                                                                 cache[0, 1], attn_mask=mask)}
    ref = runs["torch SDPA"]().view(batch, H, D).float()
    err = float((runs["triton split-KV"]().float() - ref).norm() / ref.norm())
    for s, block in sorted({(1, 64), (2 * splits, 64), (splits, 32), (splits, 128)} - {(splits, 64)}):
        runs[f"triton, {s} splits, {block}-column tiles"] = (
            lambda s=s, block=block: tritondecode.decode_attention(q, cache, 0, start, col, cols, s, block))
    for name, fn in runs.items():
        ms = median_ms(fn)
        lines.append(f"  {name}: {ms * 1e3:.1f} us, {kv_bytes / ms / 1e6:.0f} GB/s")
    size = 2 ** 30 if bench.GPU else 2 ** 24
    src = torch.empty(size, device=bench.DEVICE, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), iters=20)
    lines.append(f"  device-to-device copy of {size / 2 ** 20:.0f} MiB: {2 * size / ms / 1e6:.0f} GB/s (read + write)")
    lines.append(f"  ||triton - sdpa|| / ||sdpa|| = {err:.2e} ({str(dtype)[6:]})")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profile_decode.txt")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rollout_tokens", type=int, default=512)
    ap.add_argument("--buckets", default="128,256,512")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kernels", default="auto", help="kernel sets, comma-separated; auto = torch and, where it "
                    "runs, triton")
    args = ap.parse_args()
    model = bench.build_model("0.6b" if bench.GPU else "tiny", 0)
    prompt_len = args.prompt_len if bench.GPU else min(args.prompt_len, 32)
    ids, mask = bench.prompts(args.batch, prompt_len, model.config.vocab_size)
    sets = args.kernels.split(",") if args.kernels != "auto" else ["torch"] + (
        ["triton"] if fastdecode.use_triton(model, decode.DecodeConfig(), bench.DEVICE) else [])
    n = args.new_tokens
    lines = [f"{bench.DEVICE} batch {args.batch}, prompt {prompt_len}, {n} new tokens, kernel sets {sets}"]

    def say(new):
        lines.extend(new)
        print("\n".join(new), flush=True)
        with open(args.out, "w") as f:  # rewritten after every part: a timeout keeps what finished
            f.write("\n".join(lines) + "\n")

    timing = SimpleNamespace(new_tokens=n, repeats=3)  # the two fields bench.decode_ms_per_step reads
    for kern in sets:
        fast = decode.DecodeConfig(backend="fast", kernels=kern)
        t0 = time.perf_counter()
        ms, _ = bench.decode_ms_per_step(model, ids, mask, "fast", timing, base=fast)
        graph = "cuda graph" if bench.GPU else "eager (no CUDA graphs on a CPU)"
        step = [f"{kern} kernels:",
                f"  step ms, {graph}, kv_bucket 256: " + ("too noisy" if ms is None else f"{ms:.3f}")]
        say(step + step_profile(model, ids, mask, dataclasses.replace(fast, cuda_graph=False), n)
            + [f"  ({time.perf_counter() - t0:.0f} s)"])
        fastdecode.clear_fast_cache(model)
    rollout = SimpleNamespace(new_tokens=args.rollout_tokens if bench.GPU else min(args.rollout_tokens, 16),
                              repeats=args.repeats)
    say([f"ms per step over a {rollout.new_tokens}-token rollout (prompt {prompt_len}, batch {args.batch}) by "
         "kv_bucket:"])
    buckets = [int(b) for b in args.buckets.split(",")]
    for kern in sets:  # the torch set at the default bucket, for reference; the Triton set at each
        for bucket in buckets if kern == "triton" else [decode.DecodeConfig.kv_bucket]:
            cfg = decode.DecodeConfig(backend="fast", kernels=kern, kv_bucket=bucket)
            ms, peak = bench.decode_ms_per_step(model, ids, mask, "fast", rollout, base=cfg)
            say([f"  {kern} kernels, kv_bucket {bucket}: " + ("too noisy" if ms is None else f"{ms:.3f} ms")
                 + ("" if peak is None else f", peak {peak:.2f} GiB")])
            fastdecode.clear_fast_cache(model)
    if "triton" in sets:
        say(attention_alone(model, args.batch, prompt_len + rollout.new_tokens))


if __name__ == "__main__":
    main()
