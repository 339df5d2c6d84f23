"""Infrastructure shared by the scripts, kept out of rporec.py so the train script shows only the method
(as nanochat keeps compute_init in common.py): processes, atomic files, safe loading, the logger and the
plot. Caches and checkpoints live in checkpoint.py, flags in flags.py.
"""
import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import socket
import sys
import threading
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import flags

# ----------------------------------------------------------------------------- processes, decided once
RANK = int(os.environ.get("RANK", 0))
WORLD = max(int(os.environ.get("WORLD_SIZE", 1)), 1)
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
MAIN = RANK == 0  # only rank 0 logs, writes checkpoints and metrics
# launched by torchrun: a process group even of one process, so `--nproc_per_node 1` runs the collectives too
DISTRIBUTED = WORLD > 1 or "TORCHELASTIC_RUN_ID" in os.environ
DEVICE = torch.device("cuda", LOCAL_RANK) if torch.cuda.is_available() else torch.device("cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # backbone weights and autocast


def fail(msg):
    """Stop with a one-line error for the user (no traceback): what is wrong and the fix."""
    raise SystemExit(f"error: {msg}")


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_distributed(backend):
    if not DISTRIBUTED:
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("error: --dist_backend nccl needs CUDA GPUs and none is visible; "
                         "use --dist_backend gloo to run processes on the CPU")
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend)


def shard(items):
    """This rank's strided share of a list (all of it in a single process)."""
    return items[RANK::WORLD]


def unshard(local, n):
    """Inverse of shard for a per-item tensor: every rank's values back in global order, exactly once."""
    if not DISTRIBUTED:
        return local
    parts = [None] * WORLD
    dist.all_gather_object(parts, local.cpu())
    full = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        full[r::WORLD] = part
    return full


def all_sum(*values):
    """Sums of python numbers over all ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=DEVICE)
    if DISTRIBUTED:
        dist.all_reduce(t)
    return t.tolist()


def mean_all(t):
    """Mean of a tensor's elements over every rank."""
    t = t.detach().double().reshape(-1)
    s, n = all_sum(float(t.sum()), t.numel())
    return s / max(n, 1)


class Preemption:
    """While active (a `with` block): the first SIGTERM (a scheduler's notice before it kills a job) or Ctrl-C
    only asks the loop to stop at its next step boundary (`requested`, agreed by every rank); a second one stops
    at once."""

    def __init__(self):
        self.signum, self.old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping "
                   "(send it again to stop at once)")

    def requested(self):
        return all_sum(float(self.signum is not None))[0] > 0

    def stop(self, out, step, total):
        """Exit after the checkpoint of `step` is saved, with how to go on; 128 + the signal, as a killed job."""
        name = signal.Signals(self.signum or signal.SIGTERM).name
        if MAIN:
            print(f"stopped by {name} after step {step} of {total}; {out}/ckpt holds it. To go on, rerun the same "
                  f"command with --out {out} --resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + (self.signum or signal.SIGTERM))


def barrier():
    if DISTRIBUTED:
        dist.barrier()


def main_first(fn, *args):
    """fn(*args) on rank 0, then on the other ranks: rank 0 builds a cache, the others read it."""
    out = fn(*args) if MAIN else None
    barrier()
    return out if MAIN else fn(*args)


def refuse_other_config(out, new, ok, ok_stage1):
    """A run folder never mixes results of two configs: stop if <out>/config.json differs from new outside
    the `ok` fields (outside `ok_stage1` when that run had no Stage II), naming the fields and the fix."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    old = load_json(path, "pass a new --out, or delete that folder")
    stage1_only = old.get("run", {}).get("stage") == "1" or old.get("run", {}).get("ablate") in ("I", "II")
    diff = flags.config_diff(old, new, ok_stage1 if stage1_only else ok)
    if diff:
        raise SystemExit(f"error: {out} holds a run with another config ({'; '.join(diff[:6])}). Pass a new --out, "
                         "or rerun with that folder's flags (add --resume to continue its Stage II)")


# ----------------------------------------------------------------------------- cost: time, rate, memory
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


def print_cost(cost):
    """One line per phase of cost_summary."""
    for name, c in cost.items():
        extra = "".join(f"  {c[k]:,} {k} ({c[k + '_s']:,} /s)" for k in ("samples", "tokens")
                        if c.get(k) and c.get(k + "_s"))
        peak = f"  peak {c['peak_gib']} GiB" if "peak_gib" in c else ""
        print(f"{name:>16}  {c['count']:>4} x  {c['s']:>9,.1f} s{extra}{peak}")


# ----------------------------------------------------------------------------- seeded choices
def batch_seed(seed, split, first):
    """The sampling seed of one generation batch: a rerun draws the same CoTs."""
    return int(hashlib.sha1(f"{seed}|{split}|{first}".encode()).hexdigest()[:8], 16)


@functools.lru_cache(maxsize=4)
def _perm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def step_batch(step, n_train, per_step, seed):
    """Global train indices of one GRPO step: epoch-wise permutations, a pure function of the step,
    so a resumed run sees exactly the prompts it would have seen."""
    js = range(step * per_step, (step + 1) * per_step)
    return [int(_perm(n_train, seed + j // n_train)[j % n_train]) for j in js]


def eval_subset(valid, n, seed):
    """The fixed, seeded valid subset that Stage II's model selection scores."""
    idx = sorted(torch.randperm(len(valid), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [valid[i] for i in idx]


# ----------------------------------------------------------------------------- files
FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # no space left, a file-size limit (ulimit -f), a disk quota
REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
SHORT_WRITE = ("unexpected pos", "file write failed", "os error 28", "os error 27", "os error 122")  # torch.save and
# safetensors report a short write with these words, not as an OSError


def write_error(path, e):
    """The `error:` line for a failed write under path, or None when e is no failed write."""
    if isinstance(e, OSError) and e.errno in REFUSED:
        return (f"cannot write {e.filename or path} ({e.strerror}); pass an --out and a --data.data_dir that are "
                "folders you can write to")
    if (isinstance(e, OSError) and e.errno in FULL) or any(w in str(e) for w in SHORT_WRITE):
        return (f"could not write {path}: the disk is full or a file-size limit (ulimit -f) was hit "
                f"({str(e).splitlines()[0][:160]}). Free space (df -h) or raise the limit, then rerun the same "
                "command: finished work is kept (Stage II continues with --resume when a checkpoint exists)")
    return None


@contextlib.contextmanager
def writing(path, remove=None):
    """Writes to path inside: a full disk, a file-size limit or a folder that cannot be written stops the run with
    one `error:` line naming path (removing the half-written `remove` first), not a traceback."""
    try:
        yield
    except Exception as e:
        msg = write_error(path, e)
        if msg is None:
            raise
        if remove:
            shutil.rmtree(remove, ignore_errors=True)
        raise SystemExit(f"error: {msg}") from e


@contextlib.contextmanager
def plain_errors():
    """ValueError and OSError raised inside become one `error:` line: the data readers raise them for bad tables
    and failed downloads, with the file and the fix in the message."""
    try:
        yield
    except (ValueError, OSError) as e:
        msg = write_error(e.filename or "a file", e) if isinstance(e, OSError) and e.errno else None
        raise SystemExit(f"error: {msg or e}") from e


def atomic_write(path, write):
    """write(tmp_path) then rename over path: a kill leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with writing(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_LOCKS = {}  # run folder -> its open lock file: this process holds the folder


def lock_run(out):
    """One run per folder: out is created and its run.lock locked (flock) for the life of this process, with the
    pid written in. A second run on the folder stops at once naming the holder; the kernel drops the lock of a
    run that ended or was killed, so a stale run.lock is simply taken over."""
    if os.path.realpath(out) in _LOCKS:  # this process holds it already (main called twice)
        return
    path = os.path.join(out, "run.lock")
    with writing(path):
        os.makedirs(out, exist_ok=True)
        f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().split() or ["?"]
        f.close()
        raise SystemExit(f"error: {out} is in use by another run (pid {' on '.join(holder)}, see {path}); wait for "
                         "it to end, or pass another --out") from None
    with writing(path):
        f.truncate(0)
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
        f.flush()
    _LOCKS[os.path.realpath(out)] = f


def unlock_run(out):
    f = _LOCKS.pop(os.path.realpath(out), None)
    if f:
        f.close()


def save_bytes(path, raw):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(raw)
    atomic_write(path, write)


def load_json(path, fix):
    """The JSON in path; a corrupt file stops the run with its name and the fix."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise SystemExit(f"error: {path} is corrupt ({e}); {fix}") from None


def save_json(path, obj):
    save_bytes(path, json.dumps(obj, indent=2).encode())


def save_torch(path, obj):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path, what, fix):
    """torch.load with weights_only=True (a crafted file cannot run code), and an error that names the
    file, what it should be and the fix."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found; it should hold {what}. {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # lazy: reading the config is cheap
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # garbage bytes, not a refused object (torch: "unsupported GLOBAL ...")
            raise SystemExit(f"error: {path} is not a valid {what} (it does not unpickle). {fix}") from None
        # a refused object: do not pass on torch's advice to retry with weights_only=False
        raise SystemExit(f"error: {path} is not a valid {what}: it holds Python objects other than tensors and plain "
                         f"values, which could run code when loaded, so it was refused. {fix}") from None
    except Exception as e:  # truncated zip, garbage bytes: all the same to the user
        raise SystemExit(f"error: {path} is not a valid {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                         f"{fix}") from None


def weights_digest(module):
    """A short hash of a module's parameters and buffers: caches keyed on it cannot outlive the weights."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in module.state_dict().items():
        t = t.detach().float() if t.is_floating_point() else t.detach()  # bf16 weights == their fp32 masters
        h.update(name.encode())
        h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Logger:
    """One fixed-key line per record on stdout, and the same record appended to log.jsonl."""

    def __init__(self, out):
        self.path = os.path.join(out, "log.jsonl")

    def __call__(self, rec):
        if MAIN:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def records(self):
        """Every record of log.jsonl. A last line cut short (an append that met a full disk) is left out."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines()
        out = []
        for k, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                if k < len(lines) - 1:
                    raise SystemExit(f"error: {self.path} is corrupt on line {k + 1}; delete that line") from None
        return out

    def restart(self, stage, step=0):
        """Before a stage runs (again) from `step`: drop that stage's lines logged after step (all of them at
        step 0), so a rerun or a resume logs no line twice; a line cut short goes too."""
        if MAIN and os.path.exists(self.path):
            keep = [r for r in self.records() if r["stage"] != stage or (step and r.get("step", 0) <= step)]
            save_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())


# ----------------------------------------------------------------------------- plot
def plot_curves(path, recs, keys, curve=None):
    """One panel per key over the records' steps, plus an optional (title, steps, values) curve, into path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: matplotlib is missing; pip install -r requirements.txt") from None
    panels = list(keys) + ([curve[0]] if curve else [])
    fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(3.6 * ((len(panels) + 1) // 2), 6))
    for ax, k in zip(axes.flat, keys):
        ax.plot([r["step"] for r in recs], [r[k] for r in recs])
        ax.set_title(k)
        ax.set_xlabel("step")
    if curve:
        ax = axes.flat[len(keys)]
        ax.plot(curve[1], curve[2], marker="o")
        ax.set_title(curve[0])
        ax.set_xlabel("step")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80, format="png")
    plt.close(fig)
    save_bytes(path, buf.getvalue())


def plot_stage2(out, records, terms):
    """Reward parts, KL, entropy, CoT length per step (cf. the paper's Fig. 4) and the valid curve: stage2.png."""
    recs = [r for r in records if r["stage"] == 2]
    evals = [r for r in recs if "valid_ndcg@10" in r]
    plot_curves(os.path.join(out, "stage2.png"), [r for r in recs if "reward" in r],
                ("reward", *terms, "kl", "entropy", "cot_len"),
                ("valid ndcg@10", [r["step"] for r in evals], [r["valid_ndcg@10"] for r in evals]))


def print_metrics(metrics, keys=("hr@10", "ndcg@10", "hr@20", "parse_rate")):
    """One line per (method, split) of metrics.json, then one per phase of its cost."""
    for name, m in metrics.items():
        if name == "cost":
            continue
        for split, v in m.items():
            if isinstance(v, dict):
                print(f"{name:>10} {split:>5}  " + "  ".join(f"{k}={v[k]:.4f}" for k in keys if v.get(k) is not None))
    if metrics.get("cost"):
        print('cost (metrics.json "cost"; a line per step and phase in log.jsonl):')
        print_cost(metrics["cost"])


DEBUG = os.environ.get("RPOREC_DEBUG", "") not in ("", "0")  # RPOREC_DEBUG=1: tracebacks behind the error lines


def run_main(main, argv):
    """main(argv), with every error a user can cause as one `error:` line and no traceback (RPOREC_DEBUG=1 adds
    the traceback): the checks' own lines, a CUDA out-of-memory error, a failed write anywhere, Ctrl-C."""
    try:
        try:
            return main(argv)
        except torch.cuda.OutOfMemoryError as e:
            raise SystemExit(f"error: CUDA out of memory ({e}).\nFinished work is kept (reasoning cache, rechead.pt, "
                             "ckpt/): lower --gen_batch, --grpo.micro_batch or --grpo.logit_chunk, or turn on "
                             "--grpo.grad_checkpointing, then rerun (Stage II with --resume).") from e
        except KeyboardInterrupt as e:
            print("error: interrupted. Finished work is kept (reasoning cache, rechead.pt, ckpt/): rerun the same "
                  "command to go on (Stage II with --resume)", file=sys.stderr)
            raise SystemExit(130) from e
        except OSError as e:
            msg = write_error(e.filename or "a file", e)
            if msg is None:
                raise
            raise SystemExit(f"error: {msg}") from e
    except SystemExit as e:
        if DEBUG and e.code not in (0, None):
            traceback.print_exception(e.__cause__ or e.__context__ or e)
        raise
