"""RPORec data: any source -> one item table + time-split next-item samples (paper Appendix C.1,
official preprocess_2023_cds.py).

Sources: the embedded `toy` bookstore (default, offline, generated in code), Amazon Reviews 2023
(`cds`, `instruments`, `games`; the official preprocess_2023_cds.py: item filter, text cleaning,
a [start, end) window moved back until `min_items` items remain, K-core with K=0, i.e. none),
MovieLens (`ml-100k`, `ml-1m`) and bring-your-own tables (`custom`). Every source ends in the same
form: item ids 1..N in the order of the source's item table (official: meta-file order), keeping
only items that occur in the interactions; id 0 = pad with "" title/text. Per user, interactions
sorted by time (stable) give one sample per position i >= 1 with the previous <= 20 items as
history; all samples are sorted by target time and cut 8:1:1. No paper equation lives here.

Where things live: the raw readers (Amazon, MovieLens, bring-your-own tables, downloads) in
sources.py; the embedded toy bookstore and its toy models (a tiny random Qwen3, a tiny
StaticEmbedding encoder) in toy.py.
"""
import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from plumbing import files, flags, sources, toy
from plumbing.flags import SEED, OneOf, Own, Range, Text, setting

DATASETS = ("toy", *sources.AMAZON, "ml-100k", "ml-1m", "custom")
PROMPT_VERSION = 1  # bump when PROMPT changes: rporec.py keys its reasoning cache on it
PROMPT = ("Analyze briefly and finally recommend next {c} item I might purchase. You should try "
          "to keep all your thoughts and responses as concise as possible and recommend next {c} "
          "I might purchase inside <answer> and </answer> with estimation or guess about its all "
          "attributes (title, average_rating, rating_number and description). You don't need to "
          "utter irrelevant polite remarks or explanatory sentences. For example: "
          "<answer>'title': ... </answer>")


DATES = Own("a date, YYYY-MM-DD, start before end")
SPLIT = Own("0 < train_end < valid_end < 1")


@dataclass
class DataConfig:
    dataset: str = setting("toy", OneOf(*DATASETS))  # toy | cds | instruments | games (Amazon 2023)
    # | ml-100k | ml-1m | custom
    data_dir: str = setting("./data", Text("a folder (not empty)"), place=True)  # processed
    # caches live in <data_dir>/<dataset>-<hash>/
    raw_dir: str | None = setting(None, place=True)  # local copy of the raw files (skips download);
    # default <data_dir>/raw
    interactions: str | None = setting(None, Own("a table file, only with --dataset custom"))
    # custom: user_id, item_id, timestamp[, rating] (.tsv/.csv/.jsonl[.gz])
    items: str | None = setting(None, Own("a table file, only with --dataset custom"))  # custom:
    # item_id, title[, more text columns appended to the item text]
    category: str = setting("item", Text())  # custom: prompt wording of one item ("movie", "book",
    # ...)
    min_items: int = setting(10000, Range(0))  # amazon: move the window start back until this many
    # items remain (official)
    window: int = setting(20, Range(1))  # history length: the latest 20 actions (Appendix C.1)
    start: str = setting("2022-10-01", DATES)  # amazon window start, inclusive (UTC)
    end: str = setting("2023-10-01", DATES)  # amazon window end, exclusive (UTC)
    extend_months: int = setting(3, Range(1))  # amazon: step by which the start moves back
    max_title_words: int = setting(50, Range(1))  # amazon item filter: longer titles are dropped
    max_desc_words: int = setting(100, Range(0))  # amazon: description cut in the item text
    train_end: float = setting(0.8, SPLIT)  # train = time-sorted samples[:int(train_end * n)]
    # (8:1:1)
    valid_end: float = setting(0.9, SPLIT)  # valid = samples[int(train_end * n):int(valid_end *
    # n)], test = the rest
    max_history_chars: int = setting(6000, Range(1))  # character budget of the history text in a
    # prompt (~1.5k tokens)
    force: bool = setting(False, place=True)  # rebuild the cache even if present
    seed: int = setting(0, SEED)  # toy generator seed
    toy_users: int = setting(350, Range(1))  # toy: number of readers
    toy_noise: float = setting(0.1, Range(0, 1))  # toy: chance that a read is a random book instead
    # of the reader's series

    def check(self):
        check_config(self)


@dataclass
class Dataset:
    name: str  # cache name, e.g. "cds-1a2b3c4d" ("toy" for the toy set)
    category: str  # prompt wording of one item, e.g. "CD or vinyl"
    titles: list[str]  # by item id; [0] = "" (pad)
    texts: list[str]  # by item id; [0] = "" (pad)
    splits: dict[str, list[dict]]  # train/valid/test: {"user", "history" (<= window ids),
    # "target", "time"}
    skipped_users: int = 0  # users with a single interaction (no sample)
    item_keys: list[str] = field(default_factory=list)  # by item id: the source's own id (MovieLens
    # item_id, Amazon parent_asin), which recommend.py reads and writes; [0] = "" (pad)

    @property
    def n_items(self) -> int:
        return len(self.texts) - 1


def _build(cfg, name, category, items, inter, src):
    """One sample builder for all sources: stable per-user time sort, every prefix, global time
    split."""
    if unknown := list(dict.fromkeys(k for _, k, _ in inter if k not in items)):
        raise ValueError(f"{src} names {len(unknown)} item id(s) missing from the items table, "
                         f"e.g. {', '.join(map(str, unknown[:5]))}; add them to the items file or "
                         "drop those rows")
    used = {k for _, k, _ in inter}
    ids = {k: i for i, k in enumerate((k for k in items if k in used), 1)}  # items-table order
    seqs = {}
    for u, k, t in inter:
        seqs.setdefault(str(u), []).append((t, ids[k]))
    samples, skipped = [], 0
    for u, seq in seqs.items():
        seq.sort(key=lambda x: x[0])  # stable: ties keep file order
        skipped += len(seq) == 1
        read = [i for _, i in seq]  # the user's items, oldest first
        samples += [{"user": u, "history": recent(read[:n], cfg.window), "target": read[n],
                     "time": seq[n][0]} for n in range(1, len(seq))]
    samples.sort(key=lambda s: s["time"])
    a, b = int(cfg.train_end * len(samples)), int(cfg.valid_end * len(samples))
    splits = {"train": samples[:a], "valid": samples[a:b], "test": samples[b:]}
    empty = [k for k, v in splits.items() if not v]
    if empty and len(samples) >= 3:  # enough samples: the cut fractions leave a split empty
        raise ValueError(f"--data.train_end {cfg.train_end} and --data.valid_end {cfg.valid_end} "
                         f"leave the {' and '.join(empty)} split(s) of {len(samples)} samples empty; "
                         "widen them (default 0.8, 0.9)")
    if empty:
        raise ValueError(f"{src}: only {len(samples)} samples ({skipped} users with a single "
                         "interaction), too few for non-empty train/valid/test splits; use more "
                         "data or looser filters")
    titles = [""] + [items[k][0] for k in ids]  # id 0 = pad
    texts = [""] + [items[k][1] for k in ids]
    return Dataset(name, category, titles, texts, splits, skipped, [""] + [str(k) for k in ids])


def cache_key(cfg: DataConfig) -> str:
    """Short hash of everything that changes the processed data (custom: the files' path, size,
    mtime)."""
    drop = {"data_dir", "raw_dir", "force", "max_history_chars"} | (
        set() if cfg.dataset == "toy" else {"seed", "toy_users", "toy_noise"})
    key = {k: v for k, v in asdict(cfg).items() if k not in drop}
    for k in ("interactions", "items"):
        if key[k]:
            st = os.stat(sources.need(key[k]))
            key[k] = [os.path.abspath(key[k]), st.st_size, st.st_mtime_ns]
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def reasoning_key(cfg: DataConfig) -> tuple:
    """What the reasoning cache (checkpoint.reasoning_cache) knows of the data: the prompt's version
    and the processed data's key."""
    return PROMPT_VERSION, cache_key(cfg)


def check_config(cfg: DataConfig):
    """ValueError naming the flag (rporec's --data.field spelling) for settings that cannot work. No
    IO beyond checking that the given tables exist, so callers can run it before any work."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r} (--dataset); choose one of "
                         f"{', '.join(DATASETS)}")
    if errors := flags.range_errors(cfg, "data"):
        raise ValueError(errors[0])
    tables = {"--data.interactions": cfg.interactions, "--data.items": cfg.items}
    if cfg.dataset != "custom" and (given := [k for k, v in tables.items() if v]):
        raise ValueError(f"{' and '.join(given)} {'are' if len(given) > 1 else 'is'} read only "
                         f"with --dataset custom (got --dataset {cfg.dataset}); add --dataset "
                         "custom to use your tables, or drop them")
    if cfg.dataset == "custom":
        if missing := [k for k, v in tables.items() if not v]:
            raise ValueError("dataset 'custom' needs both tables: --data.interactions FILE "
                             f"--data.items FILE ({' and '.join(missing)} missing)")
        for flag, path in tables.items():
            if not sources.table_ext(path):
                raise ValueError(f"{flag} {path}: unknown table format; use "
                                 f"{', '.join(sources.TABLES)} (optionally .gz)")
            if not os.path.isfile(path):
                raise ValueError(f"{flag} {path} not found; check the path")
    if not 0 < cfg.train_end < cfg.valid_end < 1:
        raise ValueError(f"--data.train_end {cfg.train_end} and --data.valid_end {cfg.valid_end} "
                         "must satisfy 0 < train_end < valid_end < 1: train, valid and test are "
                         "the time-sorted samples cut at those fractions (default 0.8, 0.9)")
    dates = {}
    for name in ("start", "end"):
        try:
            dates[name] = datetime.fromisoformat(getattr(cfg, name)).replace(tzinfo=timezone.utc)
        except (TypeError, ValueError):
            raise ValueError(f"--data.{name} {getattr(cfg, name)!r} is not a date; use "
                             "YYYY-MM-DD") from None
    if dates["start"] >= dates["end"]:
        raise ValueError(f"--data.start {cfg.start} must be before --data.end {cfg.end} (the "
                         "amazon window)")


def load_dataset(cfg: DataConfig) -> Dataset:
    """Build cfg.dataset, or read it from <data_dir>/<name>/dataset.json (written atomically; toy:
    no cache)."""
    check_config(cfg)
    if cfg.dataset == "toy":
        return _build(cfg, "toy", *toy.source(cfg))
    name = f"{cfg.dataset}-{cache_key(cfg)}"
    path = os.path.join(cfg.data_dir, name, "dataset.json")
    if os.path.isfile(path) and not cfg.force:
        try:
            with open(path) as f:
                saved = json.load(f)
            if saved.get("item_keys"):
                return Dataset(**saved)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is unreadable ({e}); delete it or rerun with "
                             "--force") from None
        # a cache without the source's ids: the same build again, ids included; the samples and
        # internal ids come out identical, so reasoning caches keyed on this data stay valid
        print(f"note: {path} predates the source's item ids; rebuilding it from the source")
    reader = sources.amazon if cfg.dataset in sources.AMAZON else \
        sources.movielens if cfg.dataset.startswith("ml-") else sources.custom
    ds = _build(cfg, name, *reader(cfg))
    files.save_bytes(path, json.dumps(vars(ds), separators=(",", ":")).encode())  # the C encoder
    return ds


def history_text(ds: Dataset, history: list[int], max_chars: int) -> str:
    """History item texts, oldest first, one per line; over budget the oldest go first (the latest
    stays)."""
    if not history:
        raise ValueError("empty history: a prompt needs at least one history item (samples start "
                         "at i >= 1)")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}; raise max_history_chars")
    out, left = [], max_chars
    for text in reversed([ds.texts[i] for i in history]):
        cost = len(text) + (1 if out else 0)  # +1 for the joining newline
        if cost > left:
            out = out or [text[:max_chars]]  # the latest item alone is too long: keep its beginning
            break
        out.append(text)
        left -= cost
    return "\n".join(reversed(out))


def recent(history: list, n: int) -> list:
    """The newest n items of a history, oldest first (all of it for n = 0): the data window
    (--data.window) and the Rechead's history window (--rechead.history_items) are both cut here."""
    return history[-n:] if n else history


def rechead_inputs(cfg, ds: Dataset, samples: list[dict], reasoning: list[tuple]) -> tuple:
    """The Rechead's three texts per sample (eq. 1): the history x from its newest
    --rechead.history_items items (all by default) within a character budget, the CoT y and the
    answer z (None: not parsed) of reasoning[i]."""
    budget = cfg.rechead.history_chars or cfg.data.max_history_chars  # short encoders: the newest
    x = [history_text(ds, recent(s["history"], cfg.rechead.history_items), budget) for s in samples]
    return x, [r[0] for r in reasoning], [r[1] for r in reasoning]


def build_messages(ds: Dataset, sample: dict, cfg: DataConfig, suffix: str = "") -> list[dict]:
    """Chat messages of the official prompt (category wording of the dataset) followed by the
    history, then the optional suffix on a line of its own (rporec's --prompt_suffix, e.g. a format
    hint)."""
    history = history_text(ds, sample["history"], cfg.max_history_chars)
    prompt = PROMPT.format(c=ds.category) + "\n" + history
    return [{"role": "user", "content": f"{prompt}\n{suffix}" if suffix else prompt}]


def dataset_stats(ds: Dataset) -> dict:
    """Counts, skipped users, first/last target date (UTC) and the mean history length."""
    samples = [s for k in ("train", "valid", "test") for s in ds.splits[k]]
    times = [s["time"] for s in samples]
    day = lambda t: datetime.fromtimestamp(t / 1000 if t > sources.MS_CUTOFF else t,
                                           timezone.utc).date().isoformat()
    return {"dataset": ds.name, "users": len({s["user"] for s in samples}), "items": ds.n_items,
            "samples": len(samples), **{k: len(ds.splits[k]) for k in ("train", "valid", "test")},
            "skipped_users": ds.skipped_users, "first_date": day(min(times)),
            "last_date": day(max(times)),
            "mean_history": round(sum(len(s["history"]) for s in samples) / len(samples), 2)}


@dataclass
class CliFlags:
    json: bool = False  # also print the statistics as one JSON line (also spelled --json)


@dataclass
class DataCli:
    """The flags of `python data.py`: the data section as in rporec.py, plus this script's own."""
    data: DataConfig = field(default_factory=DataConfig)
    cli: CliFlags = field(default_factory=CliFlags)


def main(argv=None):
    """CLI: every DataConfig field is a flag, bare (--dataset cds, --raw-dir D, --force) or spelled
    as in rporec.py (--data.raw_dir D), since check_config's errors name that spelling."""
    argv = sys.argv[1:] if argv is None else argv
    cli = DataCli()
    if "--help" in argv or "-h" in argv:
        print("Prepare an RPORec dataset (cached) and print its statistics.")
        print("Flags (--field VALUE or --data.field VALUE; a bare boolean flag means true):")
        print(flags.help_text(cli, bare="data"))
        return
    argv = [re.sub(r"^--json(?=$|=)", "--cli.json", a) for a in argv]  # --json: --cli.json
    flags.apply(cli, flags.parse_flags(cli, argv, bare="data"))
    try:
        stats = dataset_stats(load_dataset(cli.data))  # load_dataset runs check_config first
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    for k, v in stats.items():
        print(f"{k:<14} {v:>16,}" if isinstance(v, int) else f"{k:<14} {v:>16}")
    if cli.cli.json:
        print(json.dumps(stats))


if __name__ == "__main__":
    main()
