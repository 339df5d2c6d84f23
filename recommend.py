"""Recommend with a trained run: for each user history, the backbone's reasoning y and answer z
(sampled as the run sampled them) and the Rechead's top-k items (eq. 1-5), in the dataset's own
item ids.

    python recommend.py --run RUN --history 12,7,99 --k 10                     # one user
    python recommend.py --run RUN --input users.jsonl --k 10 --out recs.jsonl  # a batch
    python recommend.py --run RUN --input users.jsonl --nearline --out cots.jsonl  # only the CoTs

The paper's deployment (section 4) has two halves: nearline, the backbone writes each user's CoT
and it is stored; online, the Rechead ranks from the stored text. An input line is {"user": ...,
"history": [item ids, oldest first]}, optionally with "reasoning": a stored completion (CoT and
answer), which is then used instead of generating one; other keys are ignored. --nearline writes
exactly such lines, "reasoning" filled in, to feed back. A batch line out holds user, items,
titles, scores (best first), reasoning (the CoT y) and answer (z, null when none parsed).

Ids are the source's own (MovieLens item_id, Amazon parent_asin, the toy's bk001...), read from
the run folder's items.json. A history longer than the run's window keeps its newest items as the
input, as the data protocol does; every item of the history, the older ones too, is left out of
the recommendations unless --keep_history (evaluation keeps them, as the paper does). A batch is
written one block at a time, each flushed to disk, so a stop loses no finished line: --resume
continues after them, and refuses another command (<out>.command.json records the input's
digest, the run and the flags); <out>.lock, held while a batch writes, gives an output one writer.

The run folder's parts are checked against each other before any work: a run still training (its
run.lock held) or stopped before its end, an items.json other than the table its rechead.pt was
trained on, a config.json with a field missing or unknown, or on other data than rechead.pt's,
are refused, with what to do.
"""
import sys

from plumbing import flags

if __name__ == "__main__":  # --help and flag errors answer at once, before torch loads (flags.py)
    flags.answer_early("recommend", sys.argv[1:], __doc__)

import contextlib
import dataclasses
import hashlib
import json
import math
import numbers
import os
import time
from dataclasses import dataclass, field

import torch

import data
import evaluate
import rechead
import rewards
import rporec
from plumbing import checkpoint, decode, files, seeds
from plumbing.errors import fail
from plumbing.processes import DEVICE, DTYPE, set_threads
from plumbing.report import progress, quiet_library_bars


@dataclass
class RecommendConfig:
    run: str = ""  # the run folder: config.json, rechead.pt, items.json, encoder/, and best/
    # (Stage II) or backbone/
    history: str = ""  # one user: item ids, oldest first, comma-separated
    reasoning: str = ""  # one user: a stored completion (CoT and answer) to rank from instead of
    # generating one
    input: str = ""  # a batch: JSONL, one {"user", "history"[, "reasoning"]} per line
    out: str = ""  # the batch's output JSONL, one line per input line, in input order
    resume: bool = False  # continue an --out that a stop cut short, after the lines it holds
    nearline: bool = False  # only generate each input line's reasoning, written as an input line
    # to feed back later
    k: int = 10  # items per user
    keep_history: bool = False  # history items may be recommended (evaluation keeps them, as the
    # paper does)
    batch: int = 0  # users per written block; 0 = the run's --gen_batch when generating, else its
    # --eval.chunk


@dataclass
class Cli:
    rec: RecommendConfig = field(default_factory=RecommendConfig)


class RunError(ValueError):
    """A run folder that cannot recommend as it is: what does not fit, and the fix."""


@contextlib.contextmanager
def run_errors():
    """The run folder's readers (checkpoint, files) stop a script with an `error:` line; here they
    raise RunError, as a library does."""
    try:
        yield
    except SystemExit as e:
        raise RunError(str(e.code).removeprefix("error: ")) from None


WHOLE = "copy the run folder again, whole"


def load_config(run_dir):
    """The run's config.json as rporec.Config. Every field must be there, and no other: a missing
    one would take this code's default and score with another config than the run's. Only the
    fields of how far and where a run goes (setting rerun= or place=) may be missing."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise RunError(f"{path} not found: the run folder lacks its config; {WHOLE}")
    with run_errors():
        saved = files.load_json(path, WHOLE)
    cfg = rporec.Config()
    want = {f"{s}.{k}" for s, section in dataclasses.asdict(cfg).items() for k in section}
    have = {f"{s}.{k}": v for s, section in saved.items() if isinstance(section, dict)
            for k, v in section.items()} if isinstance(saved, dict) else {}
    fix = f"{WHOLE}, or rerun the run with this code"
    how_far = flags.marked(cfg, "rerun") | flags.marked(cfg, "place")  # no part of what a run is
    if missing := sorted(want - set(have) - how_far):
        raise RunError(f"{path} lacks {len(missing)} field(s): {', '.join(missing[:6])}; a "
                       "default in their place could score with another config than the run's "
                       f"(older code or an edit?): {fix}")
    if unknown := sorted(set(have) - want):
        raise RunError(f"{path} has field(s) this code does not know: {', '.join(unknown[:6])} "
                       f"(another version of the code wrote it?): {fix}")
    flags.apply(cfg, {k: tuple(v) if isinstance(v, list) else v for k, v in have.items()})
    if errors := flags.range_errors(cfg):
        raise RunError(f"{path} holds a value no run has: {errors[0][2:]}; {fix}")
    return cfg


def check_parts(run_dir, cfg, saved, table):
    """RunError unless the run folder's parts fit each other: its Stage II finished (when it has
    one), config.json is on the data and with the Rechead of rechead.pt, and items.json is the
    item table that rechead.pt was trained on (its size and checkpoint.items_digest)."""
    if cfg.run.has_stage2():
        path = os.path.join(run_dir, "metrics.json")
        with run_errors():
            m = files.load_json(path, "finish its Stage II: rerun its command with --resume") \
                if os.path.isfile(path) else {}
        if not isinstance(m, dict) or "stage2" not in m:
            raise RunError(f"{run_dir}: its Stage II did not finish ({path} holds no stage2 "
                           "result), so best/ holds the best step so far, not the run's choice; "
                           "finish it: rerun its command with --resume")
    ok = flags.marked(cfg, "rerun") | flags.marked(cfg, "place")
    parts = ("data", "rechead")
    diff = flags.config_diff({s: saved["config"].get(s, {}) for s in parts},
                             {s: dataclasses.asdict(getattr(cfg, s)) for s in parts}, ok)
    if diff:
        raise RunError(f"{run_dir}/config.json and rechead.pt are of different runs "
                       f"({'; '.join(diff[:4])}); {WHOLE}")
    keys, items = table["keys"], saved.get("items")
    if not isinstance(items, dict) or {"n", "digest"} - set(items):
        raise RunError(f"{run_dir}/rechead.pt does not say which item table it was trained on "
                       "(older code finished it), so items.json cannot be checked against it; "
                       f"rerun its Stage I into {run_dir} (its reasoning cache makes that quick)")
    if not all(isinstance(k, str) for k in keys) or keys[0] != "" or "" in keys[1:]:
        raise RunError(f"{run_dir}/items.json: its keys must be the pad \"\" and then one "
                       f"non-empty id per item; {WHOLE}")
    seen = set()
    for k in keys:
        if k in seen:
            raise RunError(f"{run_dir}/items.json names item {k!r} twice; {WHOLE}")
        seen.add(k)
    n = len(keys) - 1
    if n != items["n"] or checkpoint.items_digest(table) != items["digest"]:
        what = f"{n} items against {items['n']}" if n != items["n"] else \
            "the same number of items, but other ids, titles or texts, or another order"
        raise RunError(f"{run_dir}/items.json is not the item table rechead.pt was trained on "
                       f"({what}): its rankings would be over the wrong items or mislabel them; "
                       f"{WHOLE}")


class Recommender:
    """A trained run, ready to recommend: its config, item table, Rechead and backbone (None for
    --model none)."""

    def __init__(self, cfg, items, head, model, tok):
        self.cfg, self.items, self.head, self.model, self.tok = cfg, items, head.eval(), model, tok
        # the source's id -> internal id
        self.index = {key: i for i, key in enumerate(items.item_keys) if i}
        self.sampling = None if model is None else \
            decode.resolve_sampling(cfg.decode, model)  # as the run's
        self.run_dir = self.backbone = None  # from_run: the folder, and the backbone's in it

    @classmethod
    def from_run(cls, run_dir):
        """The run in folder run_dir, once its parts are checked against each other
        (check_parts). RunError (a ValueError) names what does not fit and the fix."""
        if not os.path.isdir(run_dir):
            raise RunError(f"--run {run_dir} is not a folder; pass a run folder "
                           "(runs/<dataset>-<time>/)")
        if holder := files.lock_holder(os.path.join(run_dir, "run.lock")):
            raise RunError(f"{run_dir} is in use by a running run (pid {holder}): its Rechead or "
                           "backbone may still change; wait for it to end, then recommend")
        cfg = load_config(run_dir)
        path = os.path.join(run_dir, "rechead.pt")
        if not os.path.exists(path):
            why = "an --ablate I run has no Rechead" if cfg.run.ablate == "I" else \
                "its Stage I has not finished a Rechead epoch"
            raise RunError(f"{path} not found: {why}. Pass a run whose Stage I finished, or rerun "
                           f"that Stage I into {run_dir}")
        with run_errors():
            saved = checkpoint.finished(checkpoint.load_rechead(run_dir), run_dir, "--run")
            t = checkpoint.load_items(run_dir)
        check_parts(run_dir, cfg, saved, t)
        items = data.Dataset(t.get("name", ""), t["category"], t["titles"], t["texts"], {},
                             item_keys=t["keys"])
        # read-only: no renames
        encoder = checkpoint.whole_copy(os.path.join(run_dir, "encoder"), "modules.json")
        if encoder is None:
            raise RunError(f"{run_dir}/encoder is missing or incomplete: the run folder lacks the "
                           "Rechead's encoder (runs written before run folders kept it have "
                           "none). Rerun its Stage I into a new folder")
        rc = dataclasses.replace(rechead.RecheadConfig(**saved["config"]["rechead"]),
                                 encoder=encoder)
        try:
            head = rechead.Rechead(rc, items.texts, DEVICE)
        except Exception as e:  # a truncated or foreign encoder: all the same to the user
            raise RunError(f"{encoder} does not load as the Rechead's encoder "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                           f"{WHOLE}") from None
        try:
            head.load_state_dict(saved["state"])
        except RuntimeError as e:  # the shapes of another encoder or item table
            raise RunError(f"{path} does not fit the run's encoder and items.json "
                           f"({str(e).splitlines()[0][:160]}); {WHOLE}") from None
        model = tok = folder = None
        if cfg.run.model != "none":
            # Stage II: the best valid step, in fp32 as its final evaluation ran it; else the
            # Stage I backbone
            name, dtype = ("best", torch.float32) if cfg.run.has_stage2() else ("backbone", DTYPE)
            folder = checkpoint.whole_copy(os.path.join(run_dir, name), "info.json")
            if folder is None:
                fix = ("finish its Stage II: rerun its command with --resume" if name == "best"
                       else "runs written before run folders kept their backbone have none; "
                       "rerun its Stage I into a new folder")
                raise RunError(f"{run_dir}/{name} is missing or incomplete, and this run reasons "
                               f"with it; {fix}")
            with run_errors():
                model, tok = decode.load_model(folder, dtype, DEVICE)
        rec = cls(cfg, items, head, model, tok)
        rec.run_dir, rec.backbone = run_dir, folder
        return rec

    def identity(self):
        """What a batch's lines depend on in the run folder: rechead.pt's digest (its weights,
        config and item table) and the backbone's info.json (best/: the step kept)."""
        with open(os.path.join(self.run_dir, "rechead.pt"), "rb") as f:
            out = {"rechead": hashlib.file_digest(f, "sha256").hexdigest()[:16], "backbone": None}
        if self.backbone:
            with run_errors():
                out["backbone"] = files.load_json(os.path.join(self.backbone, "info.json"), WHOLE)
        return out

    def encode(self, history, where):
        """The internal ids of a history of the source's ids, oldest first; the newest
        --data.window are kept."""
        return data.recent(self.ids(history, where), self.cfg.data.window)

    def ids(self, history, where):
        """The internal ids of every item of a history of the source's ids, oldest first."""
        if not isinstance(history, list) or not history:
            what = "empty" if history == [] else repr(history)[:60]
            raise ValueError(f"{where}: the history is {what}; give a list of one or more item "
                             "ids, oldest first")
        unknown = [h for h in history if str(h) not in self.index]
        if unknown:
            raise ValueError(f"{where}: item id(s) {', '.join(map(repr, unknown[:5]))} are not in "
                             f"the run's item table ({len(self.index)} items, e.g. "
                             f"{', '.join(self.items.item_keys[1:4])}); use the dataset's own ids, "
                             "or drop items the run never saw")
        return [self.index[str(h)] for h in history]

    @torch.no_grad()
    def reason(self, histories, seed=None):
        """The backbone's completion (CoT and answer) for each history of the source's ids: the
        run's prompt, thinking mode and sampling, in batches of --gen_batch. Each history draws from
        its own seed, made from seed (default the run's --seed) and the items its prompt shows, so a
        user's CoT depends neither on the batch or block it comes in nor on the users beside it."""
        if self.model is None:
            raise ValueError("this run has no backbone (--model none): its Rechead ranks from the "
                             "history alone")
        hs = [self.encode(h, f"history {i + 1}") for i, h in enumerate(histories)]
        seed, out, b = self.cfg.run.seed if seed is None else seed, [], self.cfg.run.gen_batch
        for i in range(0, len(hs), b):
            batch = hs[i:i + b]
            messages = [data.build_messages(self.items, {"history": h}, self.cfg.data,
                                            self.cfg.run.prompt_suffix) for h in batch]
            keys = [json.dumps([self.items.item_keys[j] for j in h]) for h in batch]
            row_seeds = [seeds.row_seed(seed, "recommend", key) for key in keys]
            out += decode.complete(self.model, self.tok, messages, self.sampling,
                                   self.cfg.run.thinking, row_seeds)[0]
        return out

    @torch.no_grad()
    def recommend(self, histories, k=10, reasoning=None, keep_history=False, seed=None):
        """[{"items", "titles", "scores" (best first), "reasoning" (y), "answer" (z or None)}] for
        each history of the source's ids. reasoning[i], when given and not None, is a stored
        completion used instead of generating one; the rest are generated (reason). Items of the
        whole history, not only of the window the run reads, are not recommended unless
        keep_history. Bad arguments raise ValueError."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k={k!r}; ask for a whole number of items, at least 1")
        if not isinstance(histories, (list, tuple)):
            raise ValueError(f"histories is a {type(histories).__name__}; give a list of "
                             "histories, each a list of item ids, oldest first")
        full = [self.ids(h, f"history {i + 1}") for i, h in enumerate(histories)]
        hs = [data.recent(h, self.cfg.data.window) for h in full]
        if reasoning is not None and not isinstance(reasoning, (list, tuple)):
            raise ValueError(f"reasoning is a {type(reasoning).__name__}; give a list with one "
                             "stored completion (text) or None per history")
        texts = list(reasoning) if reasoning is not None else [None] * len(hs)
        if len(texts) != len(hs):
            raise ValueError(f"{len(texts)} reasonings for {len(hs)} histories; give one per "
                             "history (None: generate)")
        for i, t in enumerate(texts):
            if not (t is None or isinstance(t, str)):
                raise ValueError(f"reasoning[{i}] is {t!r}; give the stored completion as text, "
                                 "or None to generate one")
        if self.model is None:
            if any(t is not None for t in texts):
                raise ValueError("a reasoning was given, but this run has no backbone (--model "
                                 "none): its Rechead was trained on histories alone; drop the "
                                 "reasoning")
            rs = [("", None)] * len(hs)  # as rporec.generate_reasoning without a backbone
        else:
            todo = [i for i, t in enumerate(texts) if t is None]
            for i, t in zip(todo, self.reason([histories[i] for i in todo], seed) if todo else []):
                texts[i] = t
            rs = [rewards.split_reasoning(t) for t in texts]
        out, chunk = [], self.cfg.eval.chunk
        for i in range(0, len(hs), chunk):
            samples = [{"history": h} for h in hs[i:i + chunk]]
            x, y, z = data.rechead_inputs(self.cfg, self.items, samples, rs[i:i + len(samples)])
            s = self.head.scores(self.head.user_vecs(x, y, z))  # (b, N+1)
            if not keep_history:  # the whole history; target 0 (the pad) masks every item
                s = evaluate.mask_history_scores(s, [{"history": h, "target": 0}
                                                     for h in full[i:i + len(samples)]])
            s[:, 0] = -math.inf  # the pad item
            top = torch.topk(s, min(k, self.items.n_items), dim=1)
            for row, (vals, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                kept = [(v, j) for v, j in zip(vals, idx) if v > -math.inf]
                y_, z_ = rs[i + row]
                out.append({"items": [self.items.item_keys[j] for _, j in kept],
                            "titles": [self.items.titles[j] for _, j in kept],
                            "scores": [round(v, 6) for v, _ in kept], "reasoning": y_,
                            "answer": z_})
            self.head.forget()  # the per-text caches would grow with every user
        return out


# ----------------------------------------------------------------------------- the CLI
def read_input(path, nearline):
    """(the file's bytes, [{"user", "history", "reasoning"?}]) of a JSONL file, every line
    checked before any work."""
    if not os.path.isfile(path):
        fail(f"--input {path} not found; check the path")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (a UTF-8 export) is no line's part
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        fail(f"{path}, line {line} is not UTF-8 text ({e.reason} at byte {e.start}); re-save "
             "the file as UTF-8")
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path}, line {n} is not valid JSON ({e}); fix or remove that line")
        if not isinstance(rec, dict) or "user" not in rec or "history" not in rec:
            fail(f"{path}, line {n} is not an object with \"user\" and \"history\" "
                 f"({line.strip()[:60]}); write each line as "
                 '{"user": ..., "history": [item ids, oldest first]}')
        if not (rec.get("reasoning") is None or isinstance(rec["reasoning"], str)) \
                and not nearline:
            fail(f"{path}, line {n}: \"reasoning\" must be the stored completion text (or null), "
                 f"got {type(rec['reasoning']).__name__}")
        lines.append({**rec, "line": n})
    if not lines:
        fail(f"--input {path} has no lines; give one JSON object per user")
    return raw, lines


RECORD, LOCK = ".command.json", ".lock"  # beside --out: the command that writes it; its lock


def command(rec, c, raw):
    """What the lines of a batch depend on: the input's digest, the run (Recommender.identity)
    and the flags. Not the block size: each user's CoT draws from its own seed."""
    return {"input": hashlib.sha256(raw).hexdigest()[:16], "run": rec.identity(), "k": c.k,
            "keep_history": c.keep_history, "nearline": c.nearline}


def done_lines(path, lines, resume, cmd):
    """How many lines of an earlier run --out already holds (a last line cut short by a stop is
    cut off), once <out>.command.json shows that this command wrote them."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return 0
    if not resume:
        fail(f"--out {path} exists; pass --resume to continue after the lines it holds, or a new "
             "--out")
    if not os.path.isfile(path + RECORD):
        fail(f"--out {path} has no {path + RECORD}, the record of the command that wrote it, so "
             "a resume cannot check that it continues the same; pass a new --out")
    old = files.load_json(path + RECORD, "pass a new --out")
    if old != cmd:
        names = {"input": "--input's content", "run": "the run (its rechead.pt or backbone)"}
        old = old if isinstance(old, dict) else {}
        diff = [names.get(k) or f"--{k} {old.get(k)} -> {v}" for k, v in cmd.items()
                if old.get(k) != v]
        fail(f"--out {path} was written by another command ({'; '.join(diff)}); resume with the "
             "command that wrote it, or pass a new --out")
    with open(path, "rb+") as f:
        raw = f.read()
        f.truncate(raw.rfind(b"\n") + 1)
    have = raw[:raw.rfind(b"\n") + 1].decode(errors="replace").splitlines()
    try:
        users = [json.loads(t)["user"] for t in have]
    except (ValueError, KeyError, TypeError):
        fail(f"--out {path} is not this script's output; pass a new --out")
    if len(users) > len(lines) or users != [r["user"] for r in lines[:len(users)]]:
        fail(f"--out {path} holds lines for other users than the first {len(users)} of --input; "
             "pass a new --out")
    return len(users)


def run_batch(rec, c):
    """Every input line into --out, one flushed block at a time, while this process alone holds
    <out>.lock; returns the number of users written now."""
    if not c.out:
        fail("--input needs --out, the output JSONL")
    if problem := files.check_out_file("--out", c.out):
        fail(problem)
    if c.nearline and rec.model is None:
        fail("--nearline writes the backbone's reasoning, and this run has no backbone (--model "
             "none)")
    raw, lines = read_input(c.input, c.nearline)
    if os.path.exists(c.out) and os.path.samefile(c.input, c.out):
        fail(f"--out {c.out} is the --input file; pass another --out")
    for r in lines:  # every id checked before any work, each error naming its line
        try:
            rec.encode(r["history"], f"{c.input}, line {r['line']} (user {r['user']!r})")
        except ValueError as e:
            fail(str(e))
        if rec.model is None and r.get("reasoning") is not None:
            fail(f"{c.input}, line {r['line']} has \"reasoning\", but this run has no backbone "
                 "(--model none): its Rechead was trained on histories alone; drop the field")
    lock = files.lock_file(c.out + LOCK, f"--out {c.out}",
                           "wait for it to end, or pass another --out")
    try:
        return write_blocks(rec, c, raw, lines)
    finally:
        files.unlock_file(lock)


def write_blocks(rec, c, raw, lines):
    """run_batch's blocks, after those a resume finds in --out (done_lines); a fresh --out first
    gets its <out>.command.json."""
    generating = rec.model is not None and \
        (c.nearline or any(r.get("reasoning") is None for r in lines))
    size = c.batch or (rec.cfg.run.gen_batch if generating else rec.cfg.eval.chunk)
    cmd = command(rec, c, raw)
    start = done_lines(c.out, lines, c.resume, cmd)
    if start == 0:  # before any line: a resume finds the command that wrote them
        files.save_json(c.out + RECORD, cmd)
    for b in progress(range(start, len(lines), size), desc="recommend", unit="block"):
        block = lines[b:b + size]
        histories = [r["history"] for r in block]  # a user's CoT: its own seed, whatever the block
        if c.nearline:
            out = [{"user": r["user"], "history": r["history"], "reasoning": t}
                   for r, t in zip(block, rec.reason(histories))]
        else:
            out = [{"user": r["user"], **o} for r, o in zip(block, rec.recommend(
                histories, c.k, [r.get("reasoning") for r in block], c.keep_history))]
        checkpoint.append_cache(c.out, out)
    return len(lines) - start


def print_one(rec, c):
    """One user's reasoning, answer and table of items."""
    history = [h.strip() for h in c.history.split(",") if h.strip()]
    try:
        kept = rec.encode(history, "--history")
        r = rec.recommend([history], c.k, [c.reasoning or None], c.keep_history)[0]
    except ValueError as e:
        fail(str(e))
    if len(kept) < len(history):
        print(f"note: the history has {len(history)} items; the run's window keeps the newest "
              f"{len(kept)}")
    print("history (oldest first): " + "; ".join(f"{rec.items.item_keys[i]} {rec.items.titles[i]}"
                                                 for i in kept))
    if rec.model is None:
        print("reasoning: none (a history-only run, --model none: the Rechead reads the history "
              "alone)")
    else:
        print(f"reasoning: {r['reasoning'] or '(empty)'}")
        none = "(none parsed: eq. 2 uses the history instead)"
        print(f"answer: {r['answer'] if r['answer'] is not None else none}")
    width = max(len("item"), *(len(i) for i in r["items"]))
    print(f"{'rank':>4}  {'item':<{width}}  {'score':>8}  title")
    for n, (i, t, s) in enumerate(zip(r["items"], r["titles"], r["scores"]), 1):
        print(f"{n:>4}  {i:<{width}}  {s:>8.4f}  {t}")


HEADER = "\nFlags (--field VALUE or --rec.field VALUE; a bare boolean flag means true):"


def main(argv):
    cli = Cli()
    if flags.load_table("recommend") is None:  # the table that answers the next --help at once
        flags.save_table("recommend", cli, {}, sys.modules[__name__], HEADER, bare="rec")
    if "--help" in argv or "-h" in argv:
        print(__doc__ + HEADER)
        print(flags.help_text(cli, bare="rec"))
        return
    c = flags.apply(cli, flags.parse_flags(cli, argv, bare="rec")).rec
    if not c.run:
        fail("pass --run RUN_FOLDER, the run to recommend with")
    if bool(c.history) == bool(c.input):
        fail("pass either --history ID,ID,... (one user) or --input FILE.jsonl --out FILE.jsonl "
             "(a batch)")
    if c.k < 1 or c.batch < 0:
        fail(f"--k must be >= 1 and --batch >= 0, got --k {c.k} --batch {c.batch}")
    if c.history and (c.nearline or c.out or c.resume):
        fail("--nearline, --out and --resume go with --input (a batch); drop them for one "
             "--history")
    if c.input and not c.out:
        fail("--input needs --out, the output JSONL")
    if c.out and (problem := files.check_out_file("--out", c.out)):
        fail(problem)
    t0 = time.time()
    quiet_library_bars()
    try:
        rec = Recommender.from_run(c.run)
    except ValueError as e:
        fail(str(e))
    set_threads(rec.cfg.run.threads)  # as the run: the same scores on any machine
    if c.history:
        return print_one(rec, c)
    t1 = time.time()
    n = run_batch(rec, c)
    t2 = time.time()
    if n == 0:
        print(f"nothing left to do: {c.out} holds a line for every user", file=sys.stderr)
        return
    r = n / (t2 - t1) if t2 - t1 >= 0.01 else None  # a shorter time is no measure of a rate
    rate = "too quick to time" if r is None else \
        f"{r:,.0f} users/s" if r >= 100 else f"{r:.3g} users/s"
    print(f"{n} users in {t2 - t1:.1f} s ({rate}; loading the run took {t1 - t0:.1f} s) -> "
          f"{c.out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
