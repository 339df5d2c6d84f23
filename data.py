"""RPORec data: any source -> one item table + time-split next-item samples (paper Appendix C.1, official
preprocess_2023_cds.py).

Sources: the embedded `toy` bookstore (default, offline, generated in code), Amazon Reviews 2023
(`cds`, `instruments`, `games`; the official preprocess_2023_cds.py: item filter, text cleaning,
a [start, end) window moved back until `min_items` items remain, K-core with K=0, i.e. none),
MovieLens (`ml-100k`, `ml-1m`) and bring-your-own tables (`custom`). Every source ends in the same
form: item ids 1..N in the order of the source's item table (official: meta-file order), keeping
only items that occur in the interactions; id 0 = pad with "" title/text. Per user, interactions
sorted by time (stable) give one sample per position i >= 1 with the previous <= 20 items as
history; all samples are sorted by target time and cut 8:1:1. No paper equation lives here.

Also the toy models that go with the toy data (offline, built in code): `build_toy_backbone` (a tiny
random Qwen3) and `build_toy_encoder` (a tiny StaticEmbedding sentence-transformer).
"""
import calendar
import csv
import gzip
import hashlib
import html
import json
import os
import random
import re
import shutil
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.client import HTTPException
from pathlib import Path

from tqdm import tqdm

AMAZON = {"cds": ("CDs_and_Vinyl", "CD or vinyl"), "instruments": ("Musical_Instruments", "musical instrument"),
          "games": ("Video_Games", "video game")}  # name -> (McAuley Lab category, prompt wording)
AMAZON_URL = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/"
ML_URL = "https://files.grouplens.org/datasets/movielens/{}.zip"
ML_MD5 = {"ml-100k": "0e33842e24a9c977be4e0107933c0723",  # GroupLens publishes <name>.zip.md5 next to each zip;
          "ml-1m": "c4d9eecfca2ab87c1945afe126590906"}  # a truncated or altered download must not become a dataset
DOWNLOAD_TIMEOUT = 60  # seconds one connect or one read may stall: without a limit a dead server hangs the run
ML100K_GENRES = ("unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy "
                 "Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western").split()  # u.genre
DATASETS = ("toy", *AMAZON, "ml-100k", "ml-1m", "custom")
MS_CUTOFF = 1e11  # timestamps above this are milliseconds (1e11 seconds is the year 5138)
TS_MAX = MS_CUTOFF * 1000  # larger stamps (the year 5138 in ms) are no date: dataset_stats could not print them
TABLES = (".tsv", ".csv", ".jsonl")  # bring-your-own table formats, each optionally .gz
PROMPT_VERSION = 1  # bump when PROMPT changes: rporec.py keys its reasoning cache on it
PROMPT = ("Analyze briefly and finally recommend next {c} item I might purchase. You should try to keep all "
          "your thoughts and responses as concise as possible and recommend next {c} I might purchase inside "
          "<answer> and </answer> with estimation or guess about its all attributes (title, average_rating, "
          "rating_number and description). You don't need to utter irrelevant polite remarks or explanatory "
          "sentences. For example: <answer>'title': ... </answer>")
TOY_GENRES = {  # genre: "series nouns|story hook|story hook"
    "Mystery": "Harbor Ledger Chapel Orchard Cipher Lantern|a retired inspector reopens a cold case|a locked "
               "library hides a second body|a village baker finds a letter that should not exist",
    "Fantasy": "Crown Dragon Tower Forest Blade Throne|an apprentice mage steals a forbidden map|two rival "
               "kingdoms wake an old dragon|a blind queen hunts the thief of her crown",
    "Science Fiction": "Station Orbit Signal Colony Engine Horizon|a mining crew hears a signal from a dead star|"
                       "the last colony ship wakes a century early|an android pilot questions her orders",
    "Romance": "Cottage Vineyard Letters Summer Bakery Island|a chef returns home and meets her first love|two "
               "wedding planners compete for one client|a letter lost for forty years finds its reader",
    "Thriller": "Protocol Witness Dossier Border Target Cartel|an analyst uncovers a mole inside the agency|a "
                "juror learns the trial is rigged|a courier carries a package everyone wants",
    "History": "Empire Frontier Dynasty Republic Voyage Siege|a Roman engineer builds a bridge under siege|a "
               "merchant family survives the fall of Constantinople|sailors chart the unknown Pacific",
    "Horror": "Manor Hollow Asylum Well Marsh Attic|a family inherits a house that remembers|a night nurse hears "
              "voices on the empty ward|a fishing village makes its yearly offering",
    "Cooking": "Kitchen Table Pantry Harvest Oven Garden|simple weeknight dinners from one pan|slow breads and the "
               "science of sourdough|seasonal vegetables from market to plate",
}
TOY_WORDS = ("Silent Crimson Hollow Golden Broken Northern Last Hidden Iron Paper Winter Glass".split(),
             "Mara Elias Nora Tobias Ivy Felix Clara Jonah Lena Arthur Rosa Milo".split(),
             "Quill Hartley Vance Okafor Lindqvist Marsh Delacroix Brennan Sato Whitlock".split())
TOY_SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]  # the toy backbone's first token ids
TOY_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class DataConfig:
    dataset: str = "toy"  # toy | cds | instruments | games (Amazon 2023) | ml-100k | ml-1m | custom
    data_dir: str = "./data"  # processed caches live in <data_dir>/<dataset>-<hash>/
    raw_dir: str | None = None  # local copy of the raw files (skips download); default <data_dir>/raw
    interactions: str | None = None  # custom: user_id, item_id, timestamp[, rating] (.tsv/.csv/.jsonl[.gz])
    items: str | None = None  # custom: item_id, title[, more text columns appended to the item text]
    category: str = "item"  # custom: prompt wording of one item ("movie", "book", ...)
    min_items: int = 10000  # amazon: move the window start back until this many items remain (official)
    window: int = 20  # history length: the latest 20 actions (Appendix C.1)
    start: str = "2022-10-01"  # amazon window start, inclusive (UTC)
    end: str = "2023-10-01"  # amazon window end, exclusive (UTC)
    extend_months: int = 3  # amazon: step by which the start moves back
    max_title_words: int = 50  # amazon item filter: longer titles are dropped
    max_desc_words: int = 100  # amazon: description cut in the item text
    train_end: float = 0.8  # train = time-sorted samples[:int(train_end * n)] (8:1:1)
    valid_end: float = 0.9  # valid = samples[int(train_end * n):int(valid_end * n)], test = the rest
    max_history_chars: int = 6000  # character budget of the history text in a prompt (~1.5k tokens)
    force: bool = False  # rebuild the cache even if present
    seed: int = 0  # toy generator seed
    toy_users: int = 350  # toy: number of readers
    toy_noise: float = 0.1  # toy: chance that a read is a random book instead of the reader's series


@dataclass
class Dataset:
    name: str  # cache name, e.g. "cds-1a2b3c4d" ("toy" for the toy set)
    category: str  # prompt wording of one item, e.g. "CD or vinyl"
    titles: list[str]  # by item id; [0] = "" (pad)
    texts: list[str]  # by item id; [0] = "" (pad)
    splits: dict[str, list[dict]]  # train/valid/test: {"user", "history" (<= window ids), "target", "time"}
    skipped_users: int = 0  # users with a single interaction (no sample)

    @property
    def n_items(self) -> int:
        return len(self.texts) - 1


def _need(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; check the path (or pass --raw-dir with a local copy)")
    return path


def _clean(text):
    """Official cleaning: html-unescape, strip tags, tabs/newlines and non-ASCII to spaces, collapse."""
    text = re.sub(r"<[^>]+>", "", html.unescape(str(text)))
    return re.sub(r" +", " ", re.sub(r"[^\x00-\x7F]|[\n\t\r]", " ", text)).strip()


def _ts(value, src, line):
    """Unix seconds or milliseconds as an int; line is where value stands in src (for the error)."""
    fix = "give Unix seconds or milliseconds since 1970"
    try:
        t = float(value) if not isinstance(value, bool) else None  # JSON true would pass as 1.0
    except (TypeError, ValueError):
        t = None
    if t is None:
        raise ValueError(f"{src}, line {line}: timestamp {value!r} is not a number; {fix}")
    if not 0 <= t < TS_MAX:  # nan fails every comparison
        raise ValueError(f"{src}, line {line}: timestamp {value!r} is out of range; {fix} (0 <= t < {TS_MAX:.0e})")
    return int(t)


def _table_ext(path):
    """.tsv/.csv/.jsonl of a table path (a .gz suffix is looked through), or None for other formats."""
    ext = os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower()
    return ext if ext in TABLES else None


def _jsonl_rows(f, path, required):
    """(line, dict) per non-blank line of a .jsonl file."""
    for line, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {line} is not valid JSON ({e}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {line} is a JSON {type(row).__name__} ({text.strip()[:40]}), not an "
                             f"object; each line must be one object with the keys {', '.join(required)}")
        if missing := [c for c in required if c not in row]:
            raise ValueError(f"{path} lacks column(s) {', '.join(missing)} on line {line} (that line has "
                             f"{', '.join(row) or 'no keys'}); every line needs {', '.join(required)}")
        yield line, row


def _csv_rows(f, path, required, delimiter):
    """(line, dict) per data row of a .tsv/.csv file with a header; a row of another width is an error."""
    reader = csv.DictReader(f, delimiter=delimiter)
    if reader.fieldnames and (missing := [c for c in required if c not in reader.fieldnames]):
        raise ValueError(f"{path} lacks column(s) {', '.join(missing)} (its header has "
                         f"{', '.join(reader.fieldnames)}); the file needs {', '.join(required)}")
    for row in reader:
        if None in row or None in row.values():  # DictReader: extra fields under None, missing ones are None
            width = sum(row[c] is not None for c in reader.fieldnames) + len(row.get(None, ()))
            sep = "tab" if delimiter == "\t" else "comma"
            raise ValueError(f"{path}: line {reader.line_num} has {width} fields but the header has "
                             f"{len(reader.fieldnames)}; give every row one value per column (an empty value "
                             f"still needs its {sep}; quote a value that contains a {sep})")
        yield reader.line_num, row


def _rows(path, required):
    """(line, dict row) of a .tsv/.csv (with header) or .jsonl file, gzipped or not; checks required columns.
    utf-8-sig: a byte-order mark (Excel's UTF-8 export) is dropped instead of hiding in the first column name."""
    if not (ext := _table_ext(path)):
        raise ValueError(f"{path}: unknown table format; use {', '.join(TABLES)} (optionally .gz)")
    n = 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(_need(path), "rt", encoding="utf-8-sig", newline="") as f:
            rows = _jsonl_rows(f, path, required) if ext == ".jsonl" else \
                _csv_rows(f, path, required, "\t" if ext == ".tsv" else ",")
            for n, row in enumerate(tqdm(rows, desc=os.path.basename(path), unit=" rows", leave=False,
                                         disable=not path.endswith(".gz")), 1):  # bars for the big raw files
                yield row
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is a corrupt gzip file ({e}); delete it and rerun to re-download it") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8") from None
    if n == 0:
        raise ValueError(f"{path} is empty (no data rows); fill it or point to the right file")


def _download(url, path, md5=None):
    """Fetch url to path via <path>.part (renamed only when complete and, given md5, matching); an existing file
    is reused. Any failure removes the .part file."""
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part, digest = path + ".part", hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r, open(part, "wb") as f:
            size = int(r.headers.get("Content-Length") or 0)
            with tqdm(total=size or None, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := r.read(1 << 20):
                    digest.update(chunk)
                    bar.update(f.write(chunk))
        if size and os.path.getsize(part) != size:
            raise OSError(f"got {os.path.getsize(part)} of {size} bytes")
        if md5 and digest.hexdigest() != md5:
            raise ValueError(f"{path}: the download from {url} has md5 {digest.hexdigest()}, not the published "
                             f"{md5}, so it was deleted; rerun to fetch it again, or put a verified copy at {path}")
        os.replace(part, path)
    except (OSError, HTTPException) as e:
        raise OSError(f"could not download {url} ({e}); check the network, or put the file at {path} "
                      "(or in --raw-dir) yourself") from None
    finally:
        if os.path.exists(part):
            os.remove(part)
    return path


def _item_table(rows, src):
    """{item id: (title, text)} in table order from (line, id, (title, text)); a repeated id is an error, as
    which of its rows is meant cannot be known."""
    items, lines = {}, {}
    for line, key, item in rows:
        if key in lines:
            raise ValueError(f"{src}: item id {key!r} is on line {lines[key]} and again on line {line}; keep one "
                             "row per item")
        lines[key], items[key] = line, item
    return items


def _item_text(title, rating, number, desc):
    return f"'title': {title}\n 'average_rating': {rating}\n 'rating_number': {number}\n 'description': {desc}"


def _table_item(row):
    """(title, text) of a table row: 'title: X; year: 1995; genres: ...' from its non-empty columns."""
    vals = {k: " ".join(map(str, v)) if isinstance(v, list) else str(v).strip()
            for k, v in row.items() if k != "item_id" and v not in (None, "", [])}
    return vals.get("title", ""), "; ".join(f"{k}: {v}" for k, v in vals.items())


def _amazon(cfg):
    """Official preprocess_2023_cds.py: item filter + cleaning, then the widening time window."""
    cat, raw = AMAZON[cfg.dataset][0], cfg.raw_dir or os.path.join(cfg.data_dir, "raw")
    meta = _download(f"{AMAZON_URL}raw/meta_categories/meta_{cat}.jsonl.gz", os.path.join(raw, f"meta_{cat}.jsonl.gz"))
    rev = _download(f"{AMAZON_URL}benchmark/5core/rating_only/{cat}.csv.gz", os.path.join(raw, f"{cat}.csv.gz"))
    items = {}
    for _, m in _rows(meta, ("parent_asin",)):  # a repeated asin: the last row wins (official dict)
        title, desc = str(m.get("title") or ""), m.get("description") or []
        if not title or "<span id" in title or len(title.split(" ")) > cfg.max_title_words:
            continue
        try:
            float(m.get("price"))
        except (TypeError, ValueError):
            continue
        desc = " ".join(dict.fromkeys(map(str, desc))) if isinstance(desc, list) else str(desc)
        desc = " ".join(_clean(desc).split()[:cfg.max_desc_words])
        title = _clean(title)
        text = _item_text(title, m.get("average_rating", ""), m.get("rating_number", ""), desc)
        items[m["parent_asin"]] = (title, text)
    reviews = [(r["user_id"], r["parent_asin"], _ts(r["timestamp"], rev, line))
               for line, r in _rows(rev, ("user_id", "parent_asin", "timestamp")) if r["parent_asin"] in items]
    if not reviews:
        raise ValueError(f"{rev} has no review of an item kept from {meta}; check that both files are {cat}")
    first_year = datetime.fromtimestamp(min(r[2] for r in reviews) / 1000, timezone.utc).year
    start, end = (datetime.fromisoformat(d).replace(tzinfo=timezone.utc) for d in (cfg.start, cfg.end))
    while True:  # timestamps are ms; the start is inclusive, the end exclusive
        lo, hi = start.timestamp() * 1000, end.timestamp() * 1000
        window = [r for r in reviews if lo <= r[2] < hi]
        if len({r[1] for r in window}) >= cfg.min_items or start.year <= first_year:
            return AMAZON[cfg.dataset][1], items, window, rev
        y, m = divmod(start.year * 12 + start.month - 1 - cfg.extend_months, 12)
        start = start.replace(year=y, month=m + 1, day=min(start.day, calendar.monthrange(y, m + 1)[1]))


def _ml_lines(text, sep, width, where, src):
    """(line, fields) per non-blank line of a MovieLens file; a line of another width means a damaged file."""
    out = []
    for line, row in enumerate(text.splitlines(), 1):
        if row.strip():
            if len(fields := row.split(sep)) != width:
                raise ValueError(f"{where}, line {line} has {len(fields)} {sep!r}-separated fields, not {width} "
                                 f"({row[:60]!r}); the file is damaged: delete {src} and rerun to re-download it")
            out.append((line, fields))
    if not out:
        raise ValueError(f"{where} is empty; delete {src} and rerun to re-download it")
    return out


def _movielens(cfg):
    """GroupLens zip (or its extracted folder) in raw_dir; item text = title, year, genres."""
    name, raw = cfg.dataset, cfg.raw_dir or os.path.join(cfg.data_dir, "raw")
    folder, src = os.path.join(raw, name), os.path.join(raw, f"{name}.zip")
    members, seps, widths = (("u.data", "u.item"), ("\t", "|"), (4, 5 + len(ML100K_GENRES))) \
        if name == "ml-100k" else (("ratings.dat", "movies.dat"), ("::", "::"), (4, 3))
    try:
        if os.path.isdir(folder):
            src, texts = folder, [Path(_need(os.path.join(folder, m))).read_text("latin-1") for m in members]
            where = [os.path.join(folder, m) for m in members]
        else:
            with zipfile.ZipFile(_download(ML_URL.format(name), src, ML_MD5.get(name))) as z:
                texts = [z.read(f"{name}/{m}").decode("latin-1") for m in members]
            where = [f"{src} ({name}/{m})" for m in members]
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{src} is corrupt or incomplete ({e}); delete it and rerun to re-download it") from None
    ratings, movies = (_ml_lines(*a, src) for a in zip(texts, seps, widths, where))
    inter = [(u, i, _ts(t, where[0], line)) for line, (u, i, _, t) in ratings]
    if name == "ml-100k":
        movies = [(line, r[0], r[1], " ".join(g for g, on in zip(ML100K_GENRES, r[5:]) if on == "1"))
                  for line, r in movies]
    else:
        movies = [(line, r[0], r[1], r[2].replace("|", " ")) for line, r in movies]
    year = re.compile(r"\s*\((\d{4})\)\s*$")
    items = _item_table(((line, i, _table_item({"title": year.sub("", t), "year": (m := year.search(t)) and m.group(1),
                                                "genres": g})) for line, i, t, g in movies), where[1])
    return "movie", items, inter, src


def _custom(cfg):
    rows = _rows(cfg.items, ("item_id", "title"))
    items = _item_table(((line, str(r["item_id"]), _table_item(r)) for line, r in rows), cfg.items)
    inter = [(str(r["user_id"]), str(r["item_id"]), _ts(r["timestamp"], cfg.interactions, line))
             for line, r in _rows(cfg.interactions, ("user_id", "item_id", "timestamp"))]
    return cfg.category, items, inter, cfg.interactions


def _toy(cfg):
    """Fictional bookstore: readers keep to 1-2 genres and read series in order (learnable from the text)."""
    rng, items, series = random.Random(cfg.seed), {}, []  # series: (genre, [item keys, book 1 first])
    for genre, spec in TOY_GENRES.items():
        nouns, *hooks = spec.split("|")
        for noun in rng.sample(nouns.split(), 5):
            name, n = f"The {rng.choice(TOY_WORDS[0])} {noun}", rng.randint(4, 6)
            author = f"{rng.choice(TOY_WORDS[1])} {rng.choice(TOY_WORDS[2])}"
            series.append((genre, [f"{name}, Book {k}" for k in range(1, n + 1)]))
            for k, title in enumerate(series[-1][1], 1):
                desc = f"{genre}, book {k} of {n} in the series {name} by {author}: {rng.choice(hooks)}."
                items[title] = (title, _item_text(title, round(rng.uniform(3.4, 4.9), 1), rng.randint(12, 4000), desc))
    keys, pop = list(items), [1 / (1 + j % 5) for j in range(len(series))]  # popular and niche series per genre
    t0, day, inter = int(datetime(2023, 1, 1, tzinfo=timezone.utc).timestamp()), 86400, []
    for u in range(cfg.toy_users):
        fav = rng.sample(list(TOY_GENRES), rng.choice((1, 1, 2)))
        t, j, k = t0 + rng.randrange(365 * day), -1, 0
        for _ in range(rng.randint(4, 14)):
            if rng.random() < cfg.toy_noise:
                key = rng.choice(keys)
            else:
                if j < 0 or k >= len(series[j][1]):  # series finished: start another one in a favourite genre
                    pool = [p for p, (g, _) in enumerate(series) if g in fav and p != j]
                    j, k = rng.choices(pool, [pop[p] for p in pool])[0], 0
                key, k = series[j][1][k], k + 1
            inter.append((f"reader{u}", key, t))
            t += rng.randint(1, 12) * day
    return "book", items, inter, "toy generator"


def toy_words(texts, pre_tokenizer):
    """The sorted lowercase words of texts as pre_tokenizer splits them: a toy model's vocabulary."""
    return sorted({w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(t.lower())})


def build_toy_backbone(texts, out_dir, seed=0):
    """A 2-layer random Qwen3 with a word-level tokenizer over `texts`, saved as a normal HF folder
    so that the toy run loads it exactly like a real checkpoint."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch  # here, not at the top: `import data` stays light
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    pre = pre_tokenizers.BertPreTokenizer()
    vocab = {w: i for i, w in enumerate(TOY_SPECIALS + toy_words(texts, pre))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre
    tk.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|im_end|>",
                                  additional_special_tokens=TOY_SPECIALS[2:], chat_template=TOY_TEMPLATE)
    tok.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])  # not special: kept when decoding, as Qwen3's
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    with torch.no_grad():  # zero (tied) rows: decoding then emits words, not control tokens
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids(TOY_SPECIALS)] = 0
    tmp = f"{out_dir}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def build_toy_encoder(texts: list[str], out_dir: str, dim: int = 64, seed: int = 0) -> str:
    """Write a tiny random StaticEmbedding sentence-transformer with a lowercase word-level vocabulary
    from `texts` ([PAD], [UNK] first), loadable offline by SentenceTransformer(out_dir). Deterministic
    for a seed; a no-op if out_dir already holds a model."""
    if os.path.isfile(os.path.join(out_dir, "modules.json")):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} exists and holds no sentence-transformer; delete it or pick another out_dir")
    import torch  # here, not at the top: `import data` stays light
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    pre = pre_tokenizers.Whitespace()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(toy_words(texts, pre))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    weights = torch.randn(len(vocab), dim, generator=torch.Generator().manual_seed(seed))  # (V, dim)
    model = SentenceTransformer(modules=[StaticEmbedding(tok, embedding_weights=weights)], device="cpu")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".toy_encoder_")
    try:
        model.save(tmp)
        os.replace(tmp, out_dir)  # atomic; replaces an empty out_dir too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _build(cfg, name, category, items, inter, src):
    """One sample builder for all sources: stable per-user time sort, every prefix, global time split."""
    if unknown := list(dict.fromkeys(k for _, k, _ in inter if k not in items)):
        raise ValueError(f"{src} names {len(unknown)} item id(s) missing from the items table, e.g. "
                         f"{', '.join(map(str, unknown[:5]))}; add them to the items file or drop those rows")
    used = {k for _, k, _ in inter}
    ids = {k: i for i, k in enumerate((k for k in items if k in used), 1)}  # items-table order
    seqs = {}
    for u, k, t in inter:
        seqs.setdefault(str(u), []).append((t, ids[k]))
    samples, skipped = [], 0
    for u, seq in seqs.items():
        seq.sort(key=lambda x: x[0])  # stable: ties keep file order
        skipped += len(seq) == 1
        samples += [{"user": u, "history": [i for _, i in seq[max(0, n - cfg.window):n]], "target": seq[n][1],
                     "time": seq[n][0]} for n in range(1, len(seq))]
    samples.sort(key=lambda s: s["time"])
    a, b = int(cfg.train_end * len(samples)), int(cfg.valid_end * len(samples))
    splits = {"train": samples[:a], "valid": samples[a:b], "test": samples[b:]}
    if not all(splits.values()):
        raise ValueError(f"{src}: only {len(samples)} samples ({skipped} users with a single interaction), too "
                         "few for non-empty train/valid/test splits; use more data or looser filters")
    titles, texts = [""] + [items[k][0] for k in ids], [""] + [items[k][1] for k in ids]  # id 0 = pad
    return Dataset(name, category, titles, texts, splits, skipped)


def cache_key(cfg: DataConfig) -> str:
    """Short hash of everything that changes the processed data (custom: the files' path, size, mtime)."""
    drop = {"data_dir", "raw_dir", "force", "max_history_chars"} | (
        set() if cfg.dataset == "toy" else {"seed", "toy_users", "toy_noise"})
    key = {k: v for k, v in asdict(cfg).items() if k not in drop}
    for k in ("interactions", "items"):
        if key[k]:
            st = os.stat(_need(key[k]))
            key[k] = [os.path.abspath(key[k]), st.st_size, st.st_mtime_ns]
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def check_config(cfg: DataConfig):
    """ValueError naming the flag (rporec's --data.field spelling) for settings that cannot work. No IO beyond
    checking that the given tables exist, so callers can run it before any work."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r} (--dataset); choose one of {', '.join(DATASETS)}")
    tables = {"--data.interactions": cfg.interactions, "--data.items": cfg.items}
    if cfg.dataset != "custom" and (given := [k for k, v in tables.items() if v]):
        raise ValueError(f"{' and '.join(given)} {'are' if len(given) > 1 else 'is'} read only with --dataset "
                         f"custom (got --dataset {cfg.dataset}); add --dataset custom to use your tables, or drop them")
    if cfg.dataset == "custom":
        if missing := [k for k, v in tables.items() if not v]:
            raise ValueError(f"dataset 'custom' needs both tables: --data.interactions FILE --data.items FILE "
                             f"({' and '.join(missing)} missing)")
        for flag, path in tables.items():
            if not _table_ext(path):
                raise ValueError(f"{flag} {path}: unknown table format; use {', '.join(TABLES)} (optionally .gz)")
            if not os.path.isfile(path):
                raise ValueError(f"{flag} {path} not found; check the path")
    for name, low in (("window", 1), ("min_items", 0), ("extend_months", 1), ("max_title_words", 1),
                      ("max_desc_words", 0), ("max_history_chars", 1), ("toy_users", 1)):
        if (value := getattr(cfg, name)) < low:  # extend_months < 1 would move the amazon window start forever
            raise ValueError(f"--data.{name} must be >= {low}, got {value}")
    if not 0 < cfg.train_end < cfg.valid_end < 1:
        raise ValueError(f"--data.train_end {cfg.train_end} and --data.valid_end {cfg.valid_end} must satisfy "
                         "0 < train_end < valid_end < 1: train, valid and test are the time-sorted samples cut at "
                         "those fractions (default 0.8, 0.9)")
    if not 0 <= cfg.toy_noise <= 1:
        raise ValueError(f"--data.toy_noise is a probability, got {cfg.toy_noise}; use a value in [0, 1]")
    dates = {}
    for name in ("start", "end"):
        try:
            dates[name] = datetime.fromisoformat(getattr(cfg, name)).replace(tzinfo=timezone.utc)
        except (TypeError, ValueError):
            raise ValueError(f"--data.{name} {getattr(cfg, name)!r} is not a date; use YYYY-MM-DD") from None
    if dates["start"] >= dates["end"]:
        raise ValueError(f"--data.start {cfg.start} must be before --data.end {cfg.end} (the amazon window)")


def load_dataset(cfg: DataConfig) -> Dataset:
    """Build cfg.dataset, or read it from <data_dir>/<name>/dataset.json (written atomically; toy: no cache)."""
    check_config(cfg)
    if cfg.dataset == "toy":
        return _build(cfg, "toy", *_toy(cfg))
    name = f"{cfg.dataset}-{cache_key(cfg)}"
    path = os.path.join(cfg.data_dir, name, "dataset.json")
    if os.path.isfile(path) and not cfg.force:
        try:
            with open(path) as f:
                return Dataset(**json.load(f))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} is unreadable ({e}); delete it or rerun with --force") from None
    reader = _amazon if cfg.dataset in AMAZON else _movielens if cfg.dataset.startswith("ml-") else _custom
    ds = _build(cfg, name, *reader(cfg))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(vars(ds), separators=(",", ":")))  # dumps: the C encoder
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return ds


def history_text(ds: Dataset, history: list[int], max_chars: int) -> str:
    """History item texts, oldest first, one per line; over budget the oldest go first (the latest stays)."""
    if not history:
        raise ValueError("empty history: a prompt needs at least one history item (samples start at i >= 1)")
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


def build_messages(ds: Dataset, sample: dict, cfg: DataConfig) -> list[dict]:
    """Chat messages of the official prompt (category wording of the dataset) followed by the history."""
    prompt = PROMPT.format(c=ds.category) + "\n" + history_text(ds, sample["history"], cfg.max_history_chars)
    return [{"role": "user", "content": prompt}]


def dataset_stats(ds: Dataset) -> dict:
    """Counts, skipped users, first/last target date (UTC) and the mean history length."""
    samples = [s for k in ("train", "valid", "test") for s in ds.splits[k]]
    times = [s["time"] for s in samples]
    day = lambda t: datetime.fromtimestamp(t / 1000 if t > MS_CUTOFF else t, timezone.utc).date().isoformat()
    return {"dataset": ds.name, "users": len({s["user"] for s in samples}), "items": ds.n_items,
            "samples": len(samples), **{k: len(ds.splits[k]) for k in ("train", "valid", "test")},
            "skipped_users": ds.skipped_users, "first_date": day(min(times)), "last_date": day(max(times)),
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
    """CLI: every DataConfig field is a flag, bare (--dataset cds, --raw-dir D, --force) or spelled as in rporec.py
    (--data.raw_dir D), since check_config's errors name that spelling."""
    import flags  # here, not at the top: only the CLI needs it
    argv = sys.argv[1:] if argv is None else argv
    cli = DataCli()
    if "--help" in argv or "-h" in argv:
        print("Prepare an RPORec dataset (cached) and print its statistics.")
        print("Flags (--field VALUE or --data.field VALUE; a bare boolean flag means true):")
        print(flags.help_text(cli, bare="data"))
        return
    argv = [re.sub(r"^--json(?=$|=)", "--cli.json", a) for a in argv]  # --json: short for --cli.json
    for key, value in flags.parse_flags(cli, argv, bare="data").items():
        section, name = key.split(".")
        setattr(getattr(cli, section), name, value)
    try:
        check_config(cli.data)
        stats = dataset_stats(load_dataset(cli.data))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    for k, v in stats.items():
        print(f"{k:<14} {v:>16,}" if isinstance(v, int) else f"{k:<14} {v:>16}")
    if cli.cli.json:
        print(json.dumps(stats))


if __name__ == "__main__":
    main()
