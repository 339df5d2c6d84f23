"""The cost of each phase of a run: wall time (the accelerator synchronised first), peak memory, rates, and the
summary of log.jsonl that metrics.json keeps under "cost"."""
import contextlib
import time

import torch

from plumbing.processes import DEVICE


def sync():
    """Wait for the accelerator, so that a host clock measures the work queued before it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def reset_peak():
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)


def peak_gib():
    """The accelerator's peak allocated memory since reset_peak, in GiB (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(DEVICE) / 2**30, 2) if DEVICE.type == "cuda" else None


@contextlib.contextmanager
def measure(rec, key="s"):
    """Adds to rec the block's wall seconds (rec[key]) and, on a GPU, its peak allocated memory (rec["peak_gib"],
    the larger of the two when rec already holds one). Nothing is added when the block raises."""
    sync()
    reset_peak()
    t0 = time.perf_counter()
    yield rec
    sync()
    rec[key] = round(time.perf_counter() - t0, 3)
    if DEVICE.type == "cuda":
        rec["peak_gib"] = max(rec.get("peak_gib") or 0.0, peak_gib())


def rate(n, seconds):
    """n per second, or None for a block too short to time."""
    return round(n / seconds, 1) if seconds > 0 else None


# the log.jsonl records that cost_summary reads: {"phase": name, "s": seconds, ...}; a GRPO step also splits
# into its parts, each "<part>_s"


# the log.jsonl records that cost_summary reads: {"phase": name, "s": seconds, ...}; a GRPO step also splits
# into its parts, each "<part>_s"
STEP_PARTS = ("rollout", "rewards", "update")


def cost_summary(records):
    """metrics.json's "cost": per phase of log.jsonl (its every run, resumed ones included) the count, the wall
    seconds, the samples and tokens summed, their rates, and the peak memory (max); a GRPO step also by part.
    Tokens are generated tokens; a GRPO step's belong to its rollout."""
    out = {}

    def add(name, s, r):
        c = out.setdefault(name, {"count": 0, "s": 0.0})
        c["count"] += 1
        c["s"] += s
        for k in ("samples", "tokens"):
            if k in r:
                c[k] = c.get(k, 0) + r[k]
        if r.get("peak_gib") is not None:
            c["peak_gib"] = max(c.get("peak_gib", 0.0), r["peak_gib"])

    for r in records:
        if "phase" not in r:
            continue
        add(r["phase"], r["s"], r)
        if r["phase"] == "grpo_step":
            for part in STEP_PARTS:
                add(f"grpo_{part}", r[f"{part}_s"], r if part == "rollout" else {"peak_gib": r.get("peak_gib")})
    for c in out.values():
        c["s"] = round(c["s"], 2)
        for k in ("samples", "tokens"):
            if k in c:
                c[f"{k}_s"] = rate(c[k], c["s"])
    return out
