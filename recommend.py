"""Recommend with a trained run: for each user history, the backbone's reasoning y and answer z (sampled as the
run sampled them) and the Rechead's top-k items (eq. 1-5), in the dataset's own item ids.

    python recommend.py --run RUN --history 12,7,99 --k 10                          # one user: CoT, answer, table
    python recommend.py --run RUN --input users.jsonl --k 10 --out recs.jsonl       # a batch
    python recommend.py --run RUN --input users.jsonl --nearline --out cots.jsonl   # only the CoTs, to feed back

The paper's deployment (section 4) has two halves: nearline, the backbone writes each user's CoT and it is stored;
online, the Rechead ranks from the stored text. An input line is {"user": ..., "history": [item ids, oldest
first]}, optionally with "reasoning": a stored completion (CoT and answer), which is then used instead of
generating one; other keys are ignored. --nearline writes exactly such lines, "reasoning" filled in. A batch line
out holds user, items, titles, scores (best first), reasoning (the CoT y) and answer (z, null when none parsed).

Ids are the source's own (MovieLens item_id, Amazon parent_asin, the toy's bk001...), read from the run folder's
items.json. A history longer than the run's window keeps its newest items, as the data protocol does. Items in the
history are not recommended unless --keep_history (evaluation keeps them, as the paper does). A batch is written
one block at a time, each flushed to disk, so a stop loses no finished line: --resume continues after them.
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data
import evaluate
import rechead
import rewards
import rporec
from plumbing import checkpoint, decode, files, flags, seeds
from plumbing.errors import fail
from plumbing.processes import DEVICE, DTYPE


@dataclass
class RecommendConfig:
    run: str = ""  # the run folder: config.json, rechead.pt, items.json, encoder/, and best/ (Stage II) or backbone/
    history: str = ""  # one user: item ids, oldest first, comma-separated
    reasoning: str = ""  # one user: a stored completion (CoT and answer) to rank from instead of generating one
    input: str = ""  # a batch: JSONL, one {"user", "history"[, "reasoning"]} per line
    out: str = ""  # the batch's output JSONL, one line per input line, in input order
    resume: bool = False  # continue an --out that a stop cut short, after the lines it holds
    nearline: bool = False  # only generate each input line's reasoning, written as an input line to feed back later
    k: int = 10  # items per user
    keep_history: bool = False  # history items may be recommended (evaluation keeps them, as the paper does)
    batch: int = 0  # users per written block; 0 = the run's --gen_batch when generating, else its --eval.chunk


@dataclass
class Cli:
    rec: RecommendConfig = field(default_factory=RecommendConfig)


def load_config(run_dir):
    """The run's config.json as rporec.Config; a field the file lacks keeps its default."""
    saved = files.load_json(os.path.join(run_dir, "config.json"), "copy the run folder again, whole")
    cfg = rporec.Config()
    return flags.apply(cfg, {f"{s}.{k}": tuple(v) if isinstance(v, list) else v for s, section in saved.items()
                             if dataclasses.is_dataclass(getattr(cfg, s, None))
                             for k, v in section.items() if hasattr(getattr(cfg, s), k)})


class Recommender:
    """A trained run, ready to recommend: its config, item table, Rechead and backbone (None for --model none)."""

    def __init__(self, cfg, items, head, model, tok):
        self.cfg, self.items, self.head, self.model, self.tok = cfg, items, head.eval(), model, tok
        self.index = {key: i for i, key in enumerate(items.item_keys) if i}  # the source's id -> internal id
        self.sampling = None if model is None else decode.resolve_sampling(cfg.decode, model)  # as the run's

    @classmethod
    def from_run(cls, run_dir):
        if not os.path.isdir(run_dir):
            fail(f"--run {run_dir} is not a folder; pass a run folder (runs/<dataset>-<time>/)")
        cfg = load_config(run_dir)
        path = os.path.join(run_dir, "rechead.pt")
        if not os.path.exists(path):
            why = "an --ablate I run has no Rechead" if cfg.run.ablate == "I" else \
                "its Stage I has not finished a Rechead epoch"
            fail(f"{path} not found: {why}. Pass a run whose Stage I finished, or rerun that Stage I into {run_dir}")
        saved = checkpoint.load_rechead(run_dir)
        t = checkpoint.load_items(run_dir)
        items = data.Dataset(t.get("name", ""), t["category"], t["titles"], t["texts"], {}, item_keys=t["keys"])
        encoder = checkpoint.whole_copy(os.path.join(run_dir, "encoder"), "modules.json")  # read-only: no renames
        if encoder is None:
            fail(f"{run_dir}/encoder is missing or incomplete: the run folder lacks the Rechead's encoder (runs "
                 "written before run folders kept it have none). Rerun its Stage I into a new folder")
        rc = dataclasses.replace(rechead.RecheadConfig(**saved["config"]["rechead"]), encoder=encoder)
        head = rechead.Rechead(rc, items.texts, DEVICE)
        head.load_state_dict(saved["state"])
        model = tok = None
        if cfg.run.model != "none":
            # Stage II: the best valid step, in fp32 as its final evaluation ran it; else the Stage I backbone
            name, dtype = ("best", torch.float32) if cfg.run.has_stage2() else ("backbone", DTYPE)
            folder = checkpoint.whole_copy(os.path.join(run_dir, name), "info.json")
            if folder is None:
                fix = ("finish its Stage II: rerun its command with --resume" if name == "best" else
                       "runs written before run folders kept their backbone have none; rerun its Stage I into a "
                       "new folder")
                fail(f"{run_dir}/{name} is missing or incomplete, and this run reasons with it; {fix}")
            model, tok = decode.load_model(folder, dtype, DEVICE)
        return cls(cfg, items, head, model, tok)

    def encode(self, history, where):
        """The internal ids of a history of the source's ids, oldest first; the newest --data.window are kept."""
        if not isinstance(history, list) or not history:
            raise ValueError(f"{where}: the history is {'empty' if history == [] else repr(history)[:60]}; give a "
                             "list of one or more item ids, oldest first")
        unknown = [h for h in history if str(h) not in self.index]
        if unknown:
            raise ValueError(f"{where}: item id(s) {', '.join(map(repr, unknown[:5]))} are not in the run's item "
                             f"table ({len(self.index)} items, e.g. {', '.join(self.items.item_keys[1:4])}); use the "
                             "dataset's own ids, or drop items the run never saw")
        return [self.index[str(h)] for h in data.recent(history, self.cfg.data.window)]

    @torch.no_grad()
    def reason(self, histories, seed=None):
        """The backbone's completion (CoT and answer) for each history of the source's ids: the run's prompt,
        thinking mode and sampling, in batches of --gen_batch. Each history draws from its own seed, made from seed
        (default the run's --seed) and the items its prompt shows, so a user's CoT does not depend on the batch or
        the block it comes in, nor on the users beside it."""
        if self.model is None:
            raise ValueError("this run has no backbone (--model none): its Rechead ranks from the history alone")
        hs = [self.encode(h, f"history {i + 1}") for i, h in enumerate(histories)]
        seed, out, b = self.cfg.run.seed if seed is None else seed, [], self.cfg.run.gen_batch
        for i in range(0, len(hs), b):
            messages = [data.build_messages(self.items, {"history": h}, self.cfg.data, self.cfg.run.prompt_suffix)
                        for h in hs[i:i + b]]
            row_seeds = [seeds.row_seed(seed, "recommend", json.dumps([self.items.item_keys[j] for j in h]))
                         for h in hs[i:i + b]]
            out += decode.complete(self.model, self.tok, messages, self.sampling, self.cfg.run.thinking, row_seeds)[0]
        return out

    @torch.no_grad()
    def recommend(self, histories, k=10, reasoning=None, keep_history=False, seed=None):
        """[{"items", "titles", "scores" (best first), "reasoning" (y), "answer" (z or None)}] for each history of
        the source's ids. reasoning[i], when given and not None, is a stored completion used instead of generating
        one; the rest are generated (reason). History items are not recommended unless keep_history."""
        if k < 1:
            raise ValueError(f"k={k}; ask for at least one item")
        hs = [self.encode(h, f"history {i + 1}") for i, h in enumerate(histories)]
        texts = list(reasoning) if reasoning is not None else [None] * len(hs)
        if len(texts) != len(hs):
            raise ValueError(f"{len(texts)} reasonings for {len(hs)} histories; give one per history (None: generate)")
        if self.model is None:
            if any(t is not None for t in texts):
                raise ValueError("a reasoning was given, but this run has no backbone (--model none): its Rechead "
                                 "was trained on histories alone; drop the reasoning")
            rs = [("", None)] * len(hs)  # as rporec.generate_reasoning without a backbone
        else:
            todo = [i for i, t in enumerate(texts) if t is None]
            for i, t in zip(todo, self.reason([histories[i] for i in todo], seed) if todo else []):
                texts[i] = t
            rs = [rewards.split_reasoning(t) for t in texts]
        out = []
        for i in range(0, len(hs), self.cfg.eval.chunk):
            samples = [{"history": h, "target": 0} for h in hs[i:i + self.cfg.eval.chunk]]  # target 0: mask all
            x, y, z = data.rechead_inputs(self.cfg, self.items, samples, rs[i:i + len(samples)])
            s = self.head.scores(self.head.user_vecs(x, y, z))  # (b, N+1)
            if not keep_history:
                s = evaluate.mask_history_scores(s, samples)
            s[:, 0] = -math.inf  # the pad item
            top = torch.topk(s, min(k, self.items.n_items), dim=1)
            for row, (vals, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                kept = [(v, j) for v, j in zip(vals, idx) if v > -math.inf]
                y_, z_ = rs[i + row]
                out.append({"items": [self.items.item_keys[j] for _, j in kept],
                            "titles": [self.items.titles[j] for _, j in kept],
                            "scores": [round(v, 6) for v, _ in kept], "reasoning": y_, "answer": z_})
            self.head.forget()  # the per-text caches would grow with every user
        return out


# ----------------------------------------------------------------------------- the CLI
def read_input(path, nearline):
    """[{"user", "history", "reasoning"?}] of a JSONL file, every line checked before any work."""
    if not os.path.isfile(path):
        fail(f"--input {path} not found; check the path")
    lines = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                fail(f"{path}, line {n} is not valid JSON ({e}); fix or remove that line")
            if not isinstance(rec, dict) or "user" not in rec or "history" not in rec:
                fail(f"{path}, line {n} is not an object with \"user\" and \"history\" ({text.strip()[:60]}); "
                     'write each line as {"user": ..., "history": [item ids, oldest first]}')
            if not (rec.get("reasoning") is None or isinstance(rec["reasoning"], str)) and not nearline:
                fail(f"{path}, line {n}: \"reasoning\" must be the stored completion text (or null), got "
                     f"{type(rec['reasoning']).__name__}")
            lines.append({**rec, "line": n})
    if not lines:
        fail(f"--input {path} has no lines; give one JSON object per user")
    return lines


def done_lines(path, lines, resume):
    """How many lines of an earlier run --out already holds (a last line cut short by a stop is cut off)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return 0
    if not resume:
        fail(f"--out {path} exists; pass --resume to continue after the lines it holds, or a new --out")
    with open(path, "rb+") as f:
        raw = f.read()
        f.truncate(raw.rfind(b"\n") + 1)
    have = raw[:raw.rfind(b"\n") + 1].decode().splitlines()
    try:
        users = [json.loads(t)["user"] for t in have]
    except (ValueError, KeyError, TypeError):
        fail(f"--out {path} is not this script's output; pass a new --out")
    if len(users) > len(lines) or users != [r["user"] for r in lines[:len(users)]]:
        fail(f"--out {path} holds lines for other users than the first {len(users)} of --input; pass a new --out")
    return len(users)


def run_batch(rec, c):
    """Every input line into --out, one flushed block at a time; returns the number of users written now."""
    if not c.out:
        fail("--input needs --out, the output JSONL")
    if c.nearline and rec.model is None:
        fail("--nearline writes the backbone's reasoning, and this run has no backbone (--model none)")
    lines = read_input(c.input, c.nearline)
    for r in lines:  # every id checked before any work, each error naming its line
        try:
            rec.encode(r["history"], f"{c.input}, line {r['line']} (user {r['user']!r})")
        except ValueError as e:
            fail(str(e))
        if rec.model is None and r.get("reasoning") is not None:
            fail(f"{c.input}, line {r['line']} has \"reasoning\", but this run has no backbone (--model none): its "
                 "Rechead was trained on histories alone; drop the field")
    start = done_lines(c.out, lines, c.resume)
    generating = rec.model is not None and (c.nearline or any(r.get("reasoning") is None for r in lines))
    size = c.batch or (rec.cfg.run.gen_batch if generating else rec.cfg.eval.chunk)
    for b in tqdm(range(start, len(lines), size), desc="recommend", unit="block"):
        block = lines[b:b + size]
        histories = [r["history"] for r in block]  # each drawn from its own seed: a resumed block draws the same
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
        print(f"note: the history has {len(history)} items; the run's window keeps the newest {len(kept)}")
    print("history (oldest first): " + "; ".join(f"{rec.items.item_keys[i]} {rec.items.titles[i]}" for i in kept))
    if rec.model is None:
        print("reasoning: none (a history-only run, --model none: the Rechead reads the history alone)")
    else:
        print(f"reasoning: {r['reasoning'] or '(empty)'}")
        print(f"answer: {r['answer'] if r['answer'] is not None else '(none parsed: eq. 2 uses the history instead)'}")
    width = max(len("item"), *(len(i) for i in r["items"]))
    print(f"{'rank':>4}  {'item':<{width}}  {'score':>8}  title")
    for n, (i, t, s) in enumerate(zip(r["items"], r["titles"], r["scores"]), 1):
        print(f"{n:>4}  {i:<{width}}  {s:>8.4f}  {t}")


def main(argv):
    cli = Cli()
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\nFlags (--field VALUE or --rec.field VALUE; a bare boolean flag means true):")
        print(flags.help_text(cli, bare="rec"))
        return
    c = flags.apply(cli, flags.parse_flags(cli, argv, bare="rec")).rec
    if not c.run:
        fail("pass --run RUN_FOLDER, the run to recommend with")
    if bool(c.history) == bool(c.input):
        fail("pass either --history ID,ID,... (one user) or --input FILE.jsonl --out FILE.jsonl (a batch)")
    if c.k < 1 or c.batch < 0:
        fail(f"--k must be >= 1 and --batch >= 0, got --k {c.k} --batch {c.batch}")
    if c.history and (c.nearline or c.out or c.resume):
        fail("--nearline, --out and --resume go with --input (a batch); drop them for one --history")
    t0 = time.time()
    rec = Recommender.from_run(c.run)
    if c.history:
        return print_one(rec, c)
    t1 = time.time()
    n = run_batch(rec, c)
    t2 = time.time()
    print(f"{n} users in {t2 - t1:.1f} s ({n / max(t2 - t1, 1e-9):.0f} users/s; loading the run took {t1 - t0:.1f} s)"
          f" -> {c.out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
