"""What a run keeps on disk so that a kill loses no finished work: the resumable JSONL cache (sampled
reasoning), the frozen-embedding cache, and Stage II's checkpoints and best/ backbone, each written beside
its final place and swapped in whole.
"""
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import random
import shutil
import time

import numpy as np
import torch

from plumbing import decode, seeds
from plumbing.cost import measure, rate
from plumbing.errors import fail
from plumbing.files import (
    atomic_write,
    load_json,
    load_torch,
    save_json,
    save_torch,
    weights_digest,
    writing,
)
from plumbing.processes import DEVICE, MAIN, RANK, WORLD, all_sum, barrier, shard
from plumbing.report import progress


# ----------------------------------------------------------------------------- resumable JSONL cache
def read_cache(path):
    """{sample index: record}. A last line cut short by a kill or a failed write is cut off the file first (under
    the file's lock, so never a line that another run sharing the data folder is appending)."""
    return read_appended(path)[0]


def read_appended(path, start=0):
    """({sample index: record} of the whole lines from byte `start` on, the byte after the last whole line): a
    reader that keeps that offset reads only what was appended since (cached_map, while other runs append)."""
    if not os.path.exists(path):
        return {}, 0
    with open(path, "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _cut_partial_line(f)
        f.seek(start)
        raw = f.read()
    try:
        return {r["i"]: r for r in map(json.loads, raw.decode().splitlines())}, start + len(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: the reasoning cache {path} is corrupt ({e}); delete it and rerun to "
                         "regenerate it") from None


def _cut_partial_line(f):
    """Cut a last line that a kill or a failed write left without its newline off the file f (open binary, under
    its lock), reading back from the end only as far as the last newline."""
    end = f.seek(0, os.SEEK_END)
    pos = end
    while pos > 0:
        step = min(pos, 1 << 16)
        f.seek(pos - step)
        chunk = f.read(step)
        if pos == end and chunk.endswith(b"\n"):
            return
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            f.truncate(pos - step + cut + 1)
            return
        pos -= step
    f.truncate(0)


def append_cache(path, records):
    """One write and an fsync per batch, so a kill loses at most the batch in flight; whole lines under the file's
    lock, after cutting off a line that another process's failed write left half, so runs sharing a data folder can
    append to one cache."""
    with writing(path), open(path, "ab+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _cut_partial_line(f)
        f.write("".join(json.dumps(r) + "\n" for r in records).encode())
        f.flush()
        os.fsync(f.fileno())


def fold_shards(path):
    """Rank 0 appends the per-rank shard files of a distributed run to the one cache (the records it lacks: another
    run sharing the data folder may have written some), once every rank has finished writing."""
    barrier()
    if MAIN:
        for part in sorted(glob.glob(f"{path}.rank*")):
            have = read_cache(path)
            append_cache(path, [r for i, r in read_cache(part).items() if i not in have])
            os.remove(part)
    barrier()


SAMPLER = "row-seeded inverse CDF"  # in the cache key: how a row's seed becomes its tokens (sampling.py)


def reasoning_cache(cfg, model, split, seed, data_key):
    """The reasoning cache of a split, keyed by the weights themselves (not the model's name), the sampler (each row
    draws from its own seed, so not the batch size), the prompt, the resolved sampling, the seed and the data
    (data_key: the prompt's version and the processed data's key, data.PROMPT_VERSION and data.cache_key): a key
    that changes with any of them cannot go stale."""
    version, data_hash = data_key
    key = json.dumps([weights_digest(model), SAMPLER, cfg.run.thinking, cfg.run.prompt_suffix,
                      version, dataclasses.asdict(decode.resolve_sampling(cfg.decode, model)), seed,
                      cfg.data.max_history_chars, data_hash], sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cfg.data.data_dir, "reasoning", f"{cfg.data.dataset}-{digest}", f"{split}.jsonl")


def cached_map(path, order, batch, fn, desc):
    """{i: record} for every index of order, from the JSONL cache at path, computing the missing ones with
    fn(indices) -> (records, tokens). A record depends on its index alone (fn seeds each row by it), so a rerun
    after a kill or a failed write generates only the missing records and ends with the cache an uninterrupted run
    writes. Batches are slices of order, `batch` long, sharded over ranks (each appends to its own <path>.rankR,
    folded into path by rank 0), one fsync'd append each: a kill loses at most the batch in flight.

    Runs sharing the data folder split the work instead of each generating everything: a process claims a slice
    (claim_slice: a lock on the slice's positions in <path>.claims, which the system drops when the process ends
    or dies), reads what the others appended meanwhile, and generates only what is still missing. A slice that
    another process holds is skipped, then waited for once the free ones are done."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fold_shards(path)
    have, seen = read_appended(path)
    todo = shard([(b, order[b:b + batch]) for b in range(0, len(order), batch)
                  if any(i not in have for i in order[b:b + batch])])
    mine = f"{path}.rank{RANK}" if WORLD > 1 else path
    bar = progress(total=sum(i not in have for _, idx in todo for i in idx), desc=desc, unit="sample",
                   disable=not MAIN)
    t0, n_tok, wait = time.time(), 0, False
    with open(f"{path}.claims", "a+b") as claims:
        while todo:
            held = []  # slices another process is generating
            for b, idx in todo:
                with claim_slice(claims, b, len(idx), wait) as claimed:
                    if not claimed:
                        held.append((b, idx))
                        continue
                    before = sum(i in have for i in idx)
                    new, seen = read_appended(path, seen)
                    have.update(new)
                    missing = [i for i in idx if i not in have]
                    if missing:
                        records, tokens = fn(missing)
                        append_cache(mine, records)
                        have.update((r["i"], r) for r in records)
                        n_tok += tokens
                    bar.update(len(idx) - before)
                    bar.set_postfix(tok_s=f"{n_tok / (time.time() - t0):.0f}")
            todo, wait = held, True
    bar.close()
    fold_shards(path)
    return read_cache(path)


@contextlib.contextmanager
def claim_slice(claims, start, length, wait):
    """Holds an exclusive lock on bytes [start, start + length) of the open file claims, one byte per position of
    the order a slice covers (so slices of other batch sizes that overlap it conflict too), and yields True; or
    yields False at once when another process holds part of it and not wait. A POSIX record lock: released when
    the process ends or dies, so a killed run leaves no stale claim."""
    try:
        fcntl.lockf(claims, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), length, start)
    except (BlockingIOError, PermissionError):  # held by another process (EAGAIN or EACCES, by platform)
        yield False
        return
    try:
        yield True
    finally:
        fcntl.lockf(claims, fcntl.LOCK_UN, length, start)


def sample_cached(cfg, model, tok, split, order, prompt, seed, cost, data_key):
    """{i: completion text} for every sample index of order (prompt(i): its chat messages), sampled as the
    backbone's resolved sampling and kept in the split's resumable cache (reasoning_cache, cached_map). Each sample
    draws from its own seed (seeds.row_seed of the seed, the split and its index), so its CoT depends on neither
    its batch nor --gen_batch, a rerun draws the same CoTs, and the run's random stream stays untouched. cost gains
    what this call generated (samples, prompt and completion tokens, over all ranks), its wall time, rate and peak
    memory."""
    sampling = decode.resolve_sampling(cfg.decode, model)
    made = [0, 0, 0]  # samples, prompt tokens, completion tokens generated by this call on this rank

    def generate(idx):
        texts, out, prompt_tokens = decode.complete(model, tok, [prompt(i) for i in idx], sampling, cfg.run.thinking,
                                                    [seeds.row_seed(seed, split, i) for i in idx])
        made[:] = made[0] + len(idx), made[1] + prompt_tokens, made[2] + int(out.mask.sum())
        return [{"i": i, "text": t} for i, t in zip(idx, texts)], int(out.mask.sum())

    with measure(cost) as cost:
        path = reasoning_cache(cfg, model, split, seed, data_key)
        done = cached_map(path, order, cfg.run.gen_batch, generate, f"reasoning {split}")
    n, prompt_tokens, tokens = (int(v) for v in all_sum(*made))
    cost.update(samples=n, prompt_tokens=prompt_tokens, tokens=tokens, tok_s=rate(tokens, cost["s"]))
    if lost := [i for i in order if i not in done]:
        fail(f"{path} lost {len(lost)} of its {len(order)} CoTs while this run wrote it (deleted or cut from "
             "outside?); rerun the same command: what is missing is generated again")
    return {i: r["text"] for i, r in done.items()}


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
    for i in progress(range(0, len(todo), step), desc="embedding texts (frozen encoder)", disable=not MAIN):
        head.encode_frozen(todo[i:i + step])
        if time.time() - saved > EMBED_SAVE_S and i + step < len(todo):
            save(todo[:i + step])
            saved = time.time()
    save(todo)


def embed_frozen(head, texts, folder):
    """Frozen encoders: embed every distinct text once, up front, and keep the embeddings on disk (in folder,
    keyed by the encoder's weights) so that a rerun skips the work. Trainable encoders: nothing to do."""
    if head.cfg.trainable:
        return
    key = f"{weights_digest(head.item_encoder)}-{head.cfg.max_seq_length}"
    embed_cached(os.path.join(folder, f"{key}.pt"), list(dict.fromkeys(texts)), head, 16 * head.cfg.encode_batch)


# ----------------------------------------------------------------------------- rechead.pt, Stage I's result
def save_rechead(out, state, epoch, cfg):
    """<out>/rechead.pt: the Rechead's weights of the best epoch so far, its epoch and the run's config. Not
    finished until Stage I's metrics are saved (finish_stage1)."""
    save_torch(os.path.join(out, "rechead.pt"), {"state": state, "epoch": epoch, "config": dataclasses.asdict(cfg)})


def finish_stage1(out):
    """Mark <out>/rechead.pt finished once Stage I's metrics are saved: Stage II (--init, --resume) refuses a
    Rechead whose training or evaluation was cut short. The mark carries the item table the Rechead was trained
    on (its size and items_digest, from the items.json this run wrote), so recommend.py refuses another table."""
    path = os.path.join(out, "rechead.pt")
    if os.path.exists(path):
        table = load_items(out)
        items = {"n": len(table["keys"]) - 1, "digest": items_digest(table)}
        save_torch(path, {**load_torch(path, "Rechead checkpoint", f"Rerun Stage I into {out}"), "finished": True,
                          "items": items})


def load_rechead(folder):
    """The contents of <folder>/rechead.pt: {"state", "epoch", "config"[, "finished"]}."""
    path = os.path.join(folder, "rechead.pt")
    saved = load_torch(path, "Rechead checkpoint (rechead.pt of a Stage I run)",
                       f"Pass --init a Stage I run folder, or rerun Stage I into {folder}.")
    if not isinstance(saved, dict) or not {"state", "config"} <= set(saved):
        fail(f"{path} lacks the Rechead state or its config; rerun Stage I into {folder}")
    return saved


def finished(saved, folder, flag):
    """saved (a rechead.pt's contents), if its Stage I finished; else the error and how to finish it."""
    if not saved.get("finished"):
        fail(f"{flag} {folder}: its Stage I did not finish (rechead.pt, from epoch {saved.get('epoch')}, is not "
             "marked finished: the run stopped before its end, or older code wrote it). Finish it with "
             f"`python rporec.py --stage 1 --out {folder}` and that run's other flags (its reasoning cache makes the "
             "rerun quick), then rerun this command")
    return saved


def restore_rechead(head, folder, out=None):
    """The finished Stage I's Rechead from <folder>/rechead.pt into head, and a copy into the run folder out, if
    given (which then holds the Rechead it ran with)."""
    try:
        head.load_state_dict(load_rechead(folder)["state"])
    except RuntimeError as e:  # another item table or encoder: the tables' shapes differ
        why = next((line.strip() for line in str(e).splitlines() if "mismatch" in line), str(e).splitlines()[0])
        fail(f"{folder}/rechead.pt does not fit this run's Rechead ({why[:200]}): it was trained on other data or "
             "with another encoder; pass --init a Stage I run on the same data")
    if out and MAIN and not os.path.samefile(folder, out):
        src = os.path.join(folder, "rechead.pt")
        atomic_write(os.path.join(out, "rechead.pt"), lambda tmp: shutil.copyfile(src, tmp))


# ----------------------------------------------------------------------------- Stage II's checkpoints
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


def whole_copy(final, marker):
    """The whole copy among final (whole when it holds `marker`), final.tmp and final.old (whole when marked
    DONE), in that order, or None. Only looks: the checks before a run use it and write nothing."""
    if os.path.exists(os.path.join(final, marker)):
        return final
    return next((c for c in (final + ".tmp", final + ".old") if os.path.exists(os.path.join(c, DONE))), None)


def recover_dir(final, marker):
    """final, or None when no whole copy exists. A kill between swap_in's two renames leaves final.old and a
    complete final.tmp: the newer whole one is promoted to final."""
    found = whole_copy(final, marker)
    if found is None or found == final:
        return found
    if MAIN:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(found, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    barrier()
    return final


def save_pretrained(folder, model, tok, info):
    """folder/: the backbone (save_pretrained) and info.json, written beside and swapped in whole (rank 0)."""
    if MAIN:
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(folder, remove=tmp):
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            save_json(os.path.join(tmp, "info.json"), info)
            swap_in(tmp, folder)
    barrier()


CKPT_MARKER = "trainer_state.pt"  # the file recover looks for in ckpt/, which only ever arrives whole (swap_in)


def save(out, model, tok, opt, state):
    """<out>/ckpt: backbone (save_pretrained), optimizer, trainer state (a dict of plain values), every
    rank's RNG. Written beside the old one and swapped in; recover mends a kill between the
    two renames."""
    final, tmp = os.path.join(out, "ckpt"), os.path.join(out, "ckpt.tmp")
    with writing(final, remove=tmp):  # a full disk keeps the last whole checkpoint
        if MAIN:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        torch.save(_rng_state(), os.path.join(tmp, f"rng{RANK}.pt"))
        if MAIN:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            torch.save({**state, "world": WORLD, "optimizer": opt.state_dict()}, os.path.join(tmp, CKPT_MARKER))
        barrier()
        if MAIN:
            swap_in(tmp, final)
    barrier()


def restart_advice(cfg, fix):
    """What to do after Stage II stopped on a failure that a --resume would only replay (its steps are seeded)."""
    out = cfg.run.out
    kept = (f"{out}/ckpt holds the last checkpoint and {out}/best the best valid step so far"
            if whole_copy(os.path.join(out, "ckpt"), CKPT_MARKER) else "No checkpoint was written yet")
    return (f"{kept}. {fix}, then run Stage II again into a new folder: python rporec.py --stage 2 --init "
            f"{cfg.run.init or out} --out NEW_FOLDER and this run's other flags")


def recover(out):
    """The path of the whole checkpoint in <out> (recover_dir), or None."""
    return recover_dir(os.path.join(out, "ckpt"), CKPT_MARKER)


def load(out, model, opt):
    """Weights, optimizer and this rank's RNG from <out>/ckpt; returns the trainer state dict."""
    from transformers import AutoModelForCausalLM
    path = recover(out)
    if path is None:
        raise SystemExit(f"error: --resume but no checkpoint in {out}/ckpt; drop --resume to start afresh")
    fix = f"Delete {path} and rerun without --resume, or resume from a copy of the run folder."
    st = load_torch(os.path.join(path, CKPT_MARKER), "trainer state", fix)
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


def load_best(out, model):
    """The weights Stage II kept in <out>/best (its best valid step) into model, in fp32."""
    from transformers import AutoModelForCausalLM
    best = recover_dir(os.path.join(out, "best"), "info.json")
    if best is None:
        raise SystemExit(f"error: {out}/best is missing; rerun Stage II (without --resume) to choose the best "
                         "step again")
    try:
        best_model = AutoModelForCausalLM.from_pretrained(best, dtype=torch.float32)
    except Exception as e:  # a truncated or corrupt safetensors file, a missing config
        raise SystemExit(f"error: the best step's backbone in {best} does not load ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); delete {best} and rerun Stage II (without --resume) "
                         "to choose the best step again") from None
    model.load_state_dict(best_model.state_dict())
    return model


# ----------------------------------------------------------------------------- what recommend.py reads
ITEMS = "items.json"  # the item table of a run folder


def keep_for_recommend(cfg, ds, head, model, tok):
    """What recommend.py needs beside config.json and rechead.pt, so that a run folder copied to another machine
    recommends there without the data folder: items.json (the item table with the source's own ids), encoder/
    (the Rechead's pre-trained encoder: rechead.pt holds its weights, not its tokenizer and modules) and, for a
    run without Stage II, backbone/ (the model that wrote the reasoning; Stage II keeps best/). The folders are
    written once, each beside its place and swapped in whole."""
    out = cfg.run.out
    if MAIN:
        save_json(os.path.join(out, ITEMS), {"name": ds.name, "category": ds.category, "keys": ds.item_keys,
                                             "titles": ds.titles, "texts": ds.texts})
        if whole_copy(os.path.join(out, "encoder"), "modules.json") is None:
            tmp = os.path.join(out, "encoder.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            with writing(os.path.join(out, "encoder"), remove=tmp):
                head.item_encoder.save(tmp)
                swap_in(tmp, os.path.join(out, "encoder"))
    backbone = os.path.join(out, "backbone")
    if model is not None and not cfg.run.has_stage2() and whole_copy(backbone, "info.json") is None:
        save_pretrained(backbone, model, tok, {"model": cfg.run.model})
    barrier()


def items_digest(table):
    """A hash of what an item table says of each item id (the source's key, title, text) and the prompt's item
    wording: two tables with one digest rank and label the same items."""
    what = [table["category"], table["keys"], table["titles"], table["texts"]]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()[:16]


def load_items(out):
    """The item table of a run folder: {"name", "category", "keys", "titles", "texts"}."""
    path = os.path.join(out, ITEMS)
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: the run folder lacks its item table (runs written before "
                         "run folders kept it have none). Rerun its Stage I into a new folder")
    t = load_json(path, "rerun its Stage I into a new folder to write it again")
    if not isinstance(t, dict) or {"keys", "titles", "texts", "category"} - set(t) \
            or not len(t["keys"]) == len(t["titles"]) == len(t["texts"]) >= 2:
        raise SystemExit(f"error: {path} is not an item table (keys, titles and texts of one length); rerun its "
                         "Stage I into a new folder to write it again")
    return t
