"""RPORec raw data sources: the readers of Amazon Reviews 2023 (official preprocess_2023_cds.py), MovieLens and
bring-your-own tables. Each source returns (category, {item key: (title, text)} in item-table order,
[(user, item key, time)], source name for errors); data.py turns that into samples and splits. Also the table
readers (.tsv/.csv/.jsonl, optionally .gz) and the download with its size and md5 checks.
"""
import calendar
import csv
import gzip
import hashlib
import html
import json
import os
import re
import urllib.request
import zipfile
import zlib
from datetime import datetime, timezone
from http.client import HTTPException
from pathlib import Path
from plumbing.report import progress


AMAZON = {"cds": ("CDs_and_Vinyl", "CD or vinyl"), "instruments": ("Musical_Instruments", "musical instrument"),
          "games": ("Video_Games", "video game")}  # name -> (McAuley Lab category, prompt wording)
AMAZON_URL = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/"
ML_URL = "https://files.grouplens.org/datasets/movielens/{}.zip"
ML_MD5 = {"ml-100k": "0e33842e24a9c977be4e0107933c0723",  # GroupLens publishes <name>.zip.md5 next to each zip;
          "ml-1m": "c4d9eecfca2ab87c1945afe126590906"}  # a truncated or altered download must not become a dataset
DOWNLOAD_TIMEOUT = 60  # seconds one connect or one read may stall: without a limit a dead server hangs the run
ML100K_GENRES = ("unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy "
                 "Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western").split()  # u.genre
MS_CUTOFF = 1e11  # timestamps above this are milliseconds (1e11 seconds is the year 5138)
TS_MAX = MS_CUTOFF * 1000  # larger stamps (the year 5138 in ms) are no date: dataset_stats could not print them
TABLES = (".tsv", ".csv", ".jsonl")  # bring-your-own table formats, each optionally .gz


def need(path):
    """path, if it is a file (else FileNotFoundError naming it)."""
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


def table_ext(path):
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


def _rows(path, required, downloaded=False):
    """(line, dict row) of a .tsv/.csv (with header) or .jsonl file, gzipped or not; checks required columns.
    utf-8-sig: a byte-order mark (Excel's UTF-8 export) is dropped instead of hiding in the first column name.
    downloaded: the file came from a download, so a corrupt one is fixed by fetching it again."""
    if not (ext := table_ext(path)):
        raise ValueError(f"{path}: unknown table format; use {', '.join(TABLES)} (optionally .gz)")
    n = 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(need(path), "rt", encoding="utf-8-sig", newline="") as f:
            rows = _jsonl_rows(f, path, required) if ext == ".jsonl" else \
                _csv_rows(f, path, required, "\t" if ext == ".tsv" else ",")
            for n, row in enumerate(progress(rows, desc=os.path.basename(path), unit=" rows", leave=False,
                                         disable=not path.endswith(".gz")), 1):  # bars for the big raw files
                yield row
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        fix = "delete it and rerun to re-download it" if downloaded else \
            f"it is not a whole gzip file (gzip -t {path} shows it): copy or compress it again"
        raise ValueError(f"{path} is a corrupt gzip file ({e}); {fix}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8") from None
    if n == 0:
        raise ValueError(f"{path} is empty (no data rows); fill it or point to the right file")


def download(url, path, md5=None):
    """Fetch url to path via <path>.part (renamed only when complete and, given md5, matching); an existing file
    is reused. Any failure removes the .part file."""
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part, digest = path + ".part", hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r, open(part, "wb") as f:
            size = int(r.headers.get("Content-Length") or 0)
            with progress(total=size or None, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
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


def item_text(title, rating, number, desc):
    """The official Amazon item text (toy.py writes its books the same way)."""
    return f"'title': {title}\n 'average_rating': {rating}\n 'rating_number': {number}\n 'description': {desc}"


def _table_item(row):
    """(title, text) of a table row: 'title: X; year: 1995; genres: ...' from its non-empty columns."""
    vals = {k: " ".join(map(str, v)) if isinstance(v, list) else str(v).strip()
            for k, v in row.items() if k != "item_id" and v not in (None, "", [])}
    return vals.get("title", ""), "; ".join(f"{k}: {v}" for k, v in vals.items())


def amazon(cfg):
    """Official preprocess_2023_cds.py: item filter + cleaning, then the widening time window."""
    cat, raw = AMAZON[cfg.dataset][0], cfg.raw_dir or os.path.join(cfg.data_dir, "raw")
    meta = download(f"{AMAZON_URL}raw/meta_categories/meta_{cat}.jsonl.gz", os.path.join(raw, f"meta_{cat}.jsonl.gz"))
    rev = download(f"{AMAZON_URL}benchmark/5core/rating_only/{cat}.csv.gz", os.path.join(raw, f"{cat}.csv.gz"))
    items = {}
    got = cfg.raw_dir is None  # the default raw folder holds only downloads; --data.raw_dir the user's own copies
    for _, m in _rows(meta, ("parent_asin",), got):  # a repeated asin: the last row wins (official dict)
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
        text = item_text(title, m.get("average_rating", ""), m.get("rating_number", ""), desc)
        items[m["parent_asin"]] = (title, text)
    reviews = [(r["user_id"], r["parent_asin"], _ts(r["timestamp"], rev, line))
               for line, r in _rows(rev, ("user_id", "parent_asin", "timestamp"), got) if r["parent_asin"] in items]
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


def movielens(cfg):
    """GroupLens zip (or its extracted folder) in raw_dir; item text = title, year, genres."""
    name, raw = cfg.dataset, cfg.raw_dir or os.path.join(cfg.data_dir, "raw")
    folder, src = os.path.join(raw, name), os.path.join(raw, f"{name}.zip")
    members, seps, widths = (("u.data", "u.item"), ("\t", "|"), (4, 5 + len(ML100K_GENRES))) \
        if name == "ml-100k" else (("ratings.dat", "movies.dat"), ("::", "::"), (4, 3))
    try:
        if os.path.isdir(folder):
            src, texts = folder, [Path(need(os.path.join(folder, m))).read_text("latin-1") for m in members]
            where = [os.path.join(folder, m) for m in members]
        else:
            with zipfile.ZipFile(download(ML_URL.format(name), src, ML_MD5.get(name))) as z:
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


def _key(value, column, src, line):
    """A custom table's id as text. A missing or empty one is an error: every such row would become one user or
    item named "", and "" is the pad item's key in a run's items.json."""
    if value is None or isinstance(value, (bool, list, dict)) or not str(value).strip():
        raise ValueError(f"{src}, line {line}: {column} is {json.dumps(value)}; give every row a {column}")
    return str(value)


def custom(cfg):
    """Bring-your-own tables: items (item_id, title[, more]) and interactions (user_id, item_id, timestamp). What
    makes no sense is refused, naming the line: an empty id or title, an item id twice (_item_table), and an
    interaction given twice (the same user, item and timestamp, whatever its other columns say), which would make
    a phantom sample whose target is its own history's newest item and count that read twice in the split. A user
    reading an item again at another time is kept (a re-read; evaluation keeps such a target's score)."""
    def item(line, r):
        key, (title, text) = _key(r["item_id"], "item_id", cfg.items, line), _table_item(r)
        if not title:
            raise ValueError(f"{cfg.items}, line {line}: item {key!r} has an empty title; the prompt and the "
                             "recommendations name items by title: give it one, or drop the row")
        return line, key, (title, text)

    items = _item_table((item(line, r) for line, r in _rows(cfg.items, ("item_id", "title"))), cfg.items)
    inter, seen = [], {}
    for line, r in _rows(cfg.interactions, ("user_id", "item_id", "timestamp")):
        row = (_key(r["user_id"], "user_id", cfg.interactions, line), _key(r["item_id"], "item_id",
               cfg.interactions, line), _ts(r["timestamp"], cfg.interactions, line))
        if row in seen:
            raise ValueError(f"{cfg.interactions}: line {line} repeats line {seen[row]} (user {row[0]!r}, item "
                             f"{row[1]!r}, timestamp {row[2]}): an interaction given twice makes a sample whose "
                             "target is its own history's newest item; keep one row per interaction")
        seen[row] = line
        inter.append(row)
    return cfg.category, items, inter, cfg.interactions
