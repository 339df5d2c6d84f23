"""Where grpo.update spends its time, before and after the autocast output head, on the card:

    python -m tools.profile_update --out profile_update.txt [--micro_batches 8,16]

A synthetic rollout batch at bench.py's GRPO setting (8 prompts x G = 8, 256-token prompts, 512-token
completions: EOS off, so no padding), Qwen3-0.6B's config with random weights, updated as rporec.stage2 does:
fp32 master policy, bf16 reference, bf16 autocast, AdamW. Variants: "before" = the output head in fp32
(head_fp32, as the update was), "after" = its matmuls in bf16 with fp32 logits, at each --micro_batches. Per
variant: a warm-up update (AdamW state, cuBLAS handles), a timed one whose phases are synchronised and timed
(reference log-probs, policy forward and, inside them, the output head; backward and its head part; gradient
clip; optimizer step), and for the first micro-batch size one under torch.profiler (GPU time by kernel). The
synchronisation adds a little to each phase; "total" is the whole update. On CPU it runs a tiny config in
seconds (a smoke test of the script, not a measurement).
"""
import argparse
import copy
import threading
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import grpo
from plumbing import sampling
from speed import chunked_head
from tools import bench


class Phases:
    """Synchronised wall time of nested phases, keyed "outer > inner"; the autograd thread shares the stack."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.stack = []
        self.lock = threading.Lock()

    def wrap(self, fn, name):
        def timed(*args, **kwargs):
            label = name(*args) if callable(name) else name
            bench.sync()
            with self.lock:
                self.stack.append(label)
                key = " > ".join(self.stack)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                bench.sync()
                self.seconds[key] += time.perf_counter() - t0
                with self.lock:
                    self.stack.pop()
        return timed


def instrument(phases, optimizer):
    """Wrap the update's parts (module attributes, restored by the returned function)."""
    head = chunked_head._ChunkedHead
    saved = [(grpo, "sequence_logprobs"), (head, "forward"), (head, "backward"),
             (torch.Tensor, "backward"), (torch.nn.utils, "clip_grad_norm_"), (optimizer, "step")]
    saved = [(obj, attr, obj.__dict__[attr] if isinstance(obj, type) else getattr(obj, attr)) for obj, attr in saved]
    grpo.sequence_logprobs = phases.wrap(saved[0][2], lambda *a: "policy forward" if torch.is_grad_enabled()
                                         else "reference forward")
    chunked_head._ChunkedHead.forward = staticmethod(phases.wrap(chunked_head._ChunkedHead.forward, "output head"))
    chunked_head._ChunkedHead.backward = staticmethod(phases.wrap(chunked_head._ChunkedHead.backward, "output head"))
    torch.Tensor.backward = phases.wrap(saved[3][2], "backward")
    torch.nn.utils.clip_grad_norm_ = phases.wrap(saved[4][2], "grad clip")
    optimizer.step = phases.wrap(saved[5][2], "optimizer step")

    def restore():
        for obj, attr, value in saved:
            setattr(obj, attr, value)
    return restore


def synthetic_batch(model, n_prompts, group, prompt_len, tokens, seed=0):
    """A make_batch of random prompts and full-length random completions with random entropies and advantages."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = bench.prompts(n_prompts, prompt_len, model.config.vocab_size, seed=seed)
    B = n_prompts * group
    ro = sampling.Rollout(tokens=torch.randint(1, model.config.vocab_size, (B, tokens), generator=g).to(bench.DEVICE),
                            mask=torch.ones(B, tokens, dtype=torch.bool, device=bench.DEVICE),
                            logp=torch.zeros(B, tokens, device=bench.DEVICE),
                            entropy=torch.rand(B, tokens, generator=g).to(bench.DEVICE))
    return grpo.make_batch(ids, mask, ro, torch.randn(B, generator=g), group)


def kernel_lines(prof, top=20):
    """Total GPU kernel time and count, and the top kernels by GPU time."""
    rows = [(a.key, getattr(a, "self_device_time_total", 0) / 1e3, a.count) for a in prof.key_averages()
            if str(getattr(a, "device_type", "")).endswith("CUDA")]
    total = sum(ms for _, ms, _ in rows)
    lines = [f"  profiled update: GPU kernel time {total:.1f} ms, {sum(c for *_, c in rows)} kernels; "
             "top kernels (ms, share, calls, name):"]
    for key, ms, calls in sorted(rows, key=lambda r: -r[1])[:top]:
        lines.append(f"    {ms:9.2f}  {ms / max(total, 1e-9):5.1%}  {calls:6d}  {key[:100]}")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profile_update.txt")
    ap.add_argument("--micro_batches", default="8,16", help="micro-batch sizes of the 'after' variant")
    ap.add_argument("--profile", default=True, action=argparse.BooleanOptionalAction)
    args = ap.parse_args()
    gpu = bench.GPU
    n_prompts, group, prompt_len, tokens = (8, 8, 256, 512) if gpu else (2, 2, 8, 8)
    model = bench.build_model("0.6b" if gpu else "tiny", 0)  # the bf16 reference on a GPU
    batch = synthetic_batch(model, n_prompts, group, prompt_len, tokens)
    amp = torch.bfloat16 if gpu else None
    micro = [int(m) for m in args.micro_batches.split(",")]
    variants = [("before: fp32 output head", True, micro[0])] + [
        (f"after: autocast output head, micro_batch {m}", False, m) for m in micro]
    setting = "Qwen3-0.6B config, fp32 policy, bf16 reference, bf16 autocast" if gpu else "tiny config"
    gemm = "available" if hasattr(torch.ops.aten.mm, "dtype") else "missing: the head falls back to fp32 math"
    lines = [f"{bench.DEVICE}: grpo.update on {n_prompts} prompts x G = {group}, prompt {prompt_len}, {tokens} "
             f"completion tokens, {setting}; torch {torch.__version__}, bf16 GEMM with fp32 output (torch.mm "
             f"out_dtype) {gemm}"]

    def say(new):
        lines.extend(new)
        print("\n".join(new), flush=True)
        with open(args.out, "w") as f:  # rewritten after every variant: a timeout keeps what finished
            f.write("\n".join(lines) + "\n")

    for i, (name, head_fp32, mb) in enumerate(variants):
        policy = copy.deepcopy(model).float().train()
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        cfg = grpo.GRPOConfig(group_size=group, prompts_per_step=n_prompts, micro_batch=mb, head_fp32=head_fp32)
        grpo.update(policy, model, opt, batch, cfg, amp)  # warm-up
        phases = Phases()
        restore = instrument(phases, opt)
        bench.reset_peak()
        bench.sync()
        t0 = time.perf_counter()
        try:
            grpo.update(policy, model, opt, batch, cfg, amp)
            bench.sync()
        finally:
            restore()
        total = time.perf_counter() - t0
        peak = bench.peak_gib()
        out = [f"{name}: update {total:.3f} s" + ("" if peak is None else f", peak {peak:.2f} GiB")]
        out += [f"  {k}: {s:.3f} s" for k, s in sorted(phases.seconds.items())]
        top = sum(s for k, s in phases.seconds.items() if " > " not in k)
        out.append(f"  other (masks, losses, stats, host): {total - top:.3f} s")
        if args.profile and gpu and mb == micro[0]:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                grpo.update(policy, model, opt, batch, cfg, amp)
                bench.sync()
            out += kernel_lines(prof)
        say(out)
        del policy, opt
        if gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
