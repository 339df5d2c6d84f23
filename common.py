"""Infrastructure shared by the scripts, kept out of rporec.py so the train script shows only the method
(as nanochat keeps compute_init and checkpointing in common.py): processes, atomic files, safe loading,
the logger, the resumable JSONL cache, the frozen-embedding cache, checkpoints and the plot. Flags live in
flags.py.
"""
import glob
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import time

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
    if WORLD == 1:
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
    if WORLD == 1:
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
    if WORLD > 1:
        dist.all_reduce(t)
    return t.tolist()


def mean_all(t):
    """Mean of a tensor's elements over every rank."""
    t = t.detach().double().reshape(-1)
    s, n = all_sum(float(t.sum()), t.numel())
    return s / max(n, 1)


def barrier():
    if WORLD > 1:
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
    try:
        old = json.load(open(path))
    except ValueError as e:
        raise SystemExit(f"error: {path} is corrupt ({e}); pass a new --out, or delete that folder") from None
    stage1_only = old.get("run", {}).get("stage") == "1" or old.get("run", {}).get("ablate") in ("I", "II")
    diff = flags.config_diff(old, new, ok_stage1 if stage1_only else ok)
    if diff:
        raise SystemExit(f"error: {out} holds a run with another config ({'; '.join(diff[:6])}). Pass a new --out, "
                         "or rerun with that folder's flags (add --resume to continue its Stage II)")


# ----------------------------------------------------------------------------- files
def atomic_write(path, write):
    """write(tmp_path) then rename over path: a kill leaves the old file or the new one, never half."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_bytes(path, raw):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(raw)
    atomic_write(path, write)


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
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def records(self):
        return [json.loads(line) for line in open(self.path)] if os.path.exists(self.path) else []

    def drop_after(self, step):
        """Resume: Stage II lines logged after the checkpoint's step will be logged again; drop them."""
        if MAIN and os.path.exists(self.path):
            keep = [r for r in self.records() if r["stage"] != 2 or r["step"] <= step]
            save_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())


# ----------------------------------------------------------------------------- resumable JSONL cache
def read_cache(path):
    """{sample index: record}. A last line cut short by a kill is cut off the file first."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb+") as f:
        raw = f.read()
        if raw and not raw.endswith(b"\n"):
            f.truncate(raw.rfind(b"\n") + 1)
    try:
        return {r["i"]: r for r in map(json.loads, raw[:raw.rfind(b"\n") + 1].decode().splitlines())}
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: the reasoning cache {path} is corrupt ({e}); delete it and rerun to "
                         "regenerate it") from None


def append_cache(path, records):
    """One write and an fsync per batch, so a kill loses at most the batch in flight."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def fold_shards(path):
    """Rank 0 appends the per-rank shard files of a distributed run to the one cache, once every rank
    has finished writing."""
    barrier()
    if MAIN:
        for part in sorted(glob.glob(f"{path}.rank*")):
            append_cache(path, list(read_cache(part).values()))
            os.remove(part)
    barrier()


def cached_map(path, order, batch, fn, desc):
    """{i: record} for every index of order, from the JSONL cache at path, computing the missing ones with
    fn(indices) -> (records, tokens), `batch` at a time, in order, sharded over ranks (each appends to
    its own <path>.rankR, folded into path by rank 0), one fsync'd append per batch: a kill loses at most
    the batch in flight, and a rerun computes only what is missing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fold_shards(path)
    have = read_cache(path)
    todo = shard([i for i in order if i not in have])
    mine = f"{path}.rank{RANK}" if WORLD > 1 else path
    bar = tqdm(total=len(todo), desc=desc, unit="sample", disable=not MAIN)
    t0, n_tok = time.time(), 0
    for b in range(0, len(todo), batch):
        records, tokens = fn(todo[b:b + batch])
        append_cache(mine, records)
        n_tok += tokens
        bar.update(len(records))
        bar.set_postfix(tok_s=f"{n_tok / (time.time() - t0):.0f}")
    bar.close()
    fold_shards(path)
    return read_cache(path)


# ----------------------------------------------------------------------------- frozen-embedding cache
def load_embeddings(path):
    """(texts, vecs) saved by save_embeddings, or ([], None) when there is none yet."""
    if not os.path.exists(path):
        return [], None
    fix = "Delete it; the next run embeds the texts again."
    saved = load_torch(path, "frozen-embedding cache", fix)
    texts, vecs = (saved.get("texts"), saved.get("vecs")) if isinstance(saved, dict) else (None, None)
    if not isinstance(texts, list) or not torch.is_tensor(vecs) or vecs.dim() != 2 or len(texts) != vecs.shape[0]:
        n = None if vecs is None or not torch.is_tensor(vecs) else tuple(vecs.shape)
        raise SystemExit(f"error: {path} holds {len(texts) if isinstance(texts, list) else 'no'} texts but vectors of "
                         f"shape {n}; the cache is corrupt. {fix}")
    return texts, vecs


def save_embeddings(path, texts, vecs):
    save_torch(path, {"texts": list(texts), "vecs": vecs.cpu()})


EMBED_SAVE_S = 300  # embed_cached writes its progress to disk at least this often (seconds)


def embed_cached(path, texts, head, step):
    """head.encode_frozen over texts, `step` at a time, seeded from and saved to the disk cache at path
    (atomically, at least every EMBED_SAVE_S seconds), so a killed run loses minutes, not the lot."""
    known, vecs = load_embeddings(path)
    head.remember(known, vecs)
    todo = [t for t in texts if not head.knows(t)]

    def save(done):
        if done and MAIN:
            save_embeddings(path, known + done, head.encode_frozen(known + done))

    saved = time.time()
    for i in tqdm(range(0, len(todo), step), desc="embedding texts (frozen encoder)", disable=not MAIN):
        head.encode_frozen(todo[i:i + step])
        if time.time() - saved > EMBED_SAVE_S and i + step < len(todo):
            save(todo[:i + step])
            saved = time.time()
    save(todo)


# ----------------------------------------------------------------------------- checkpoints
def _rng_state():
    """Every RNG as tensors and plain numbers, so the file loads with weights_only=True."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()),
                                                           *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(DEVICE) if DEVICE.type == "cuda" else None}


def _set_rng_state(st):
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    np.random.set_state((st["numpy"][0], st["numpy"][1].numpy(), *st["numpy"][2:]))
    torch.set_rng_state(st["torch"])
    if st["cuda"] is not None:
        torch.cuda.set_rng_state(st["cuda"], DEVICE)


DONE = "COMPLETE"  # written last into a <folder>.tmp: its presence marks a whole folder


def swap_in(tmp, final):
    """Mark tmp whole, then put it in final's place (the old one renamed aside first, removed last): a kill
    at any moment leaves a whole folder among final, final.tmp and final.old, which recover_dir finds."""
    open(os.path.join(tmp, DONE), "w").close()
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)


def recover_dir(final, marker):
    """final, or None when no whole copy exists. final is whole when it holds `marker`; a kill between
    swap_in's two renames leaves final.old and a complete final.tmp, and the newer one is promoted."""
    if os.path.exists(os.path.join(final, marker)):
        return final
    for cand in (final + ".tmp", final + ".old"):
        if os.path.exists(os.path.join(cand, DONE)):
            if MAIN:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(cand, final)
                shutil.rmtree(final + ".old", ignore_errors=True)
            barrier()
            return final
    return None


def save_pretrained(folder, model, tok, info):
    """folder/: the backbone (save_pretrained) and info.json, written beside and swapped in whole (rank 0)."""
    if MAIN:
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_json(os.path.join(tmp, "info.json"), info)
        swap_in(tmp, folder)
    barrier()


def save_checkpoint(out, model, tok, opt, state):
    """<out>/ckpt: backbone (save_pretrained), optimizer, trainer state (a dict of plain values), every
    rank's RNG. Written beside the old one and swapped in; recover_checkpoint mends a kill between the
    two renames."""
    final, tmp = os.path.join(out, "ckpt"), os.path.join(out, "ckpt.tmp")
    if MAIN:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    torch.save(_rng_state(), os.path.join(tmp, f"rng{RANK}.pt"))
    if MAIN:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        torch.save({**state, "world": WORLD, "optimizer": opt.state_dict()}, os.path.join(tmp, "trainer_state.pt"))
    barrier()
    if MAIN:
        swap_in(tmp, final)
    barrier()


def recover_checkpoint(out):
    """The path of the whole checkpoint in <out> (recover_dir), or None."""
    return recover_dir(os.path.join(out, "ckpt"), "trainer_state.pt")


def load_checkpoint(out, model, opt):
    """Weights, optimizer and this rank's RNG from <out>/ckpt; returns the trainer state dict."""
    from transformers import AutoModelForCausalLM
    path = recover_checkpoint(out)
    if path is None:
        raise SystemExit(f"error: --resume but no checkpoint in {out}/ckpt; drop --resume to start afresh")
    fix = f"Delete {path} and rerun without --resume, or resume from a copy of the run folder."
    st = load_torch(os.path.join(path, "trainer_state.pt"), "trainer state", fix)
    if st["world"] != WORLD:
        raise SystemExit(f"error: the checkpoint was written by {st['world']} processes; resume with as many")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:
        raise SystemExit(f"error: the backbone in {path} does not load ({type(e).__name__}: {e}). {fix}") from None
    model.load_state_dict(loaded.state_dict())
    opt.load_state_dict(st["optimizer"])
    _set_rng_state(load_torch(os.path.join(path, f"rng{RANK}.pt"), "RNG state", fix))
    return st


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
