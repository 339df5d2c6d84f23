"""data.py, sources.py, toy.py: Amazon 2023 processing, MovieLens, bring-your-own tables, toy set, cache, prompts,
errors, toy models."""
import csv
import dataclasses
import gzip
import hashlib
import json
import os
import re
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

import data
from plumbing import sources, toy

CAT = "CDs_and_Vinyl"
ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def ms(day, hour=0):
    return int(datetime.fromisoformat(day).replace(hour=hour, tzinfo=timezone.utc).timestamp() * 1000)


def meta(asin, title=None, price=9.99, **kw):
    return {"parent_asin": asin, "title": title or f"Album {asin}", "average_rating": 4.5, "rating_number": 10,
            "description": ["Great record."], "price": price, **kw}


def write_amazon(raw, metas, reviews):
    """Official formats: meta jsonl.gz and a rating-only csv.gz with ms timestamps."""
    raw.mkdir(parents=True, exist_ok=True)
    with gzip.open(raw / f"meta_{CAT}.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(m) + "\n" for m in metas)
    with gzip.open(raw / f"{CAT}.csv.gz", "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "parent_asin", "rating", "timestamp"])
        w.writerows([(u, a, 5.0, t) for u, a, t in reviews])


def amazon_cfg(tmp_path, **kw):
    return data.DataConfig(dataset="cds", data_dir=str(tmp_path / "data"), **{"raw_dir": str(tmp_path / "raw"),
                                                                           "min_items": 1, **kw})


def filler(n_users=4, n_items=4, day="2023-05-01"):
    """Enough in-window reviews of good items A0.. for non-empty splits."""
    metas = [meta(f"A{i}") for i in range(n_items)]
    reviews = [(f"f{u}", f"A{i}", ms(day) + 1000 * (u * n_items + i)) for u in range(n_users) for i in range(n_items)]
    return metas, reviews


def all_samples(ds):
    return ds.splits["train"] + ds.splits["valid"] + ds.splits["test"]


def no_cache(cfg):
    d = Path(cfg.data_dir)
    return not d.exists() or not [p for p in d.rglob("*") if p.is_file() and "raw" not in p.parts]


def write_table(path, rows):
    """rows of dicts -> .tsv/.csv with a header (the first row's keys), or .jsonl."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    return str(path)


MOVIES = [{"item_id": 10, "title": "Toy Story", "year": 1995, "genres": "Animation Children's Comedy"},
          {"item_id": 20, "title": "Heat", "year": 1995, "genres": "Action Crime Thriller"},
          {"item_id": 30, "title": "Fargo", "year": 1996, "genres": "Crime Drama Thriller"},
          {"item_id": 40, "title": "Alien", "year": 1979, "genres": "Horror Sci-Fi"}]
RATINGS = [{"user_id": f"u{u}", "item_id": MOVIES[(u + k) % 4]["item_id"], "rating": 4, "timestamp": 1000 * u + k}
           for u in range(4) for k in range(4)]  # 4 users x 4 = 12 samples


def custom_cfg(tmp_path, ext=".tsv", ratings=RATINGS, movies=MOVIES, **kw):
    inter, items = write_table(tmp_path / f"inter{ext}", ratings), write_table(tmp_path / f"items{ext}", movies)
    return data.DataConfig(dataset="custom", data_dir=str(tmp_path / "data"), interactions=inter, items=items, **kw)


# ---------------------------------------------------------------- Amazon 2023


def test_amazon_item_filter_rules(tmp_path):
    metas, reviews = filler()
    bad = [{"parent_asin": "B_notitle", "price": 1.0}, meta("B_nulltitle", price=1.0) | {"title": None},
           meta("B_span", title='<span id="x">Live</span>'), meta("B_51", title=" ".join(["w"] * 51)),
           meta("B_dollar", price="$12.99"), meta("B_noprice", price=None), meta("B_emptyprice", price="")]
    good = [meta("G_50", title=" ".join(["w"] * 50)), meta("G_str", price="12.50"), meta("G_int", price=3)]
    metas += bad + good
    reviews += [("x", m["parent_asin"], ms("2023-06-01") + k) for k, m in enumerate(bad + good)]
    write_amazon(tmp_path / "raw", metas, reviews)
    ds = data.load_dataset(amazon_cfg(tmp_path))
    assert set(ds.titles[1:]) == {f"Album A{i}" for i in range(4)} | {" ".join(["w"] * 50), "Album G_str",
                                                                      "Album G_int"}
    assert ds.n_items == 7 and len(ds.titles) == len(ds.texts) == 8


def test_amazon_cleaning_and_item_text(tmp_path):
    metas, reviews = filler()
    metas[0] = meta("A0", title="Rock &amp; Roll <b>Live</b>\tin Caf\u00e9 \u2013 Tour",
                    description=["<p>Line one&nbsp;here</p>\nline two", "<p>Line one&nbsp;here</p>\nline two"])
    metas[1] = meta("A1", description=[" ".join(f"w{i}" for i in range(150))])
    write_amazon(tmp_path / "raw", metas, reviews)
    ds = data.load_dataset(amazon_cfg(tmp_path))
    assert ds.titles[1] == "Rock & Roll Live in Caf Tour"  # items keep meta-file order
    assert ds.texts[1] == ("'title': Rock & Roll Live in Caf Tour\n 'average_rating': 4.5\n 'rating_number': 10\n"
                           " 'description': Line one here line two")  # duplicate description entry dropped
    assert ds.texts[2].split("'description': ")[1] == " ".join(f"w{i}" for i in range(100))
    assert all(t.isascii() for t in ds.texts) and ds.category == "CD or vinyl"


def test_amazon_window_start_inclusive_end_exclusive(tmp_path):
    metas, reviews = filler()
    edges = {"S_start": ms("2022-10-01"), "S_before": ms("2022-10-01") - 1, "S_lastms": ms("2023-10-01") - 1,
             "S_end": ms("2023-10-01")}
    metas += [meta(a) for a in edges]
    reviews += [("e", a, t) for a, t in edges.items()]
    write_amazon(tmp_path / "raw", metas, reviews)
    titles = set(data.load_dataset(amazon_cfg(tmp_path)).titles)
    assert {"Album S_start", "Album S_lastms"} <= titles
    assert not {"Album S_before", "Album S_end"} & titles


def test_amazon_start_moves_back_until_min_items_then_stops_at_first_year(tmp_path):
    metas, reviews = filler()  # 4 items inside [2022-10-01, 2023-10-01)
    old = {"O_jul": ms("2022-07-01"), "O_jun": ms("2022-06-30"), "O_2021": ms("2021-05-01")}
    metas += [meta(a) for a in old]
    reviews += [("o", a, t) for a, t in old.items()]
    write_amazon(tmp_path / "raw", metas, reviews)
    ds = data.load_dataset(amazon_cfg(tmp_path, min_items=5))  # one 3-month step: start 2022-07-01
    assert "Album O_jul" in ds.titles and not {"Album O_jun", "Album O_2021"} & set(ds.titles)
    # never enough: the start moves back until its year is the data's first year (2021-10-01) and stops
    ds = data.load_dataset(amazon_cfg(tmp_path, min_items=100))
    assert {"Album O_jul", "Album O_jun"} <= set(ds.titles) and "Album O_2021" not in ds.titles


def test_amazon_download_via_part_file_and_reuse(tmp_path, monkeypatch):
    server = tmp_path / "server"
    metas, reviews = filler()
    write_amazon(tmp_path / "src", metas, reviews)
    for rel, name in (("raw/meta_categories", f"meta_{CAT}.jsonl.gz"),
                      ("benchmark/5core/rating_only", f"{CAT}.csv.gz")):
        (server / rel).mkdir(parents=True)
        (server / rel / name).write_bytes((tmp_path / "src" / name).read_bytes())
    monkeypatch.setattr(sources, "AMAZON_URL", server.as_uri() + "/")
    cfg = data.DataConfig(dataset="cds", data_dir=str(tmp_path / "data"), min_items=1)
    ds = data.load_dataset(cfg)
    raw = tmp_path / "data" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [f"{CAT}.csv.gz", f"meta_{CAT}.jsonl.gz"]  # no .part left
    monkeypatch.setattr(sources, "AMAZON_URL", "file:///nonexistent/")  # complete files are reused, not fetched
    assert data.load_dataset(data.DataConfig(**{**vars(cfg), "force": True})).splits == ds.splits


def test_download_md5_mismatch_deletes_file_and_match_loads(tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    write_ml100k(server / "ml-100k.zip")  # not GroupLens' zip, so the real published md5 cannot match
    monkeypatch.setattr(sources, "ML_URL", server.as_uri() + "/{}.zip")
    cfg = data.DataConfig(dataset="ml-100k", data_dir=str(tmp_path / "data"))
    raw = tmp_path / "data" / "raw"
    with pytest.raises(ValueError, match=rf"ml-100k.zip: the download .* has md5 \w+, not the published "
                                         rf"{sources.ML_MD5['ml-100k']}.*rerun.*or put a verified copy at"):
        data.load_dataset(cfg)
    assert not list(raw.iterdir()) and no_cache(cfg)  # neither the zip nor its .part stays
    md5 = hashlib.md5((server / "ml-100k.zip").read_bytes()).hexdigest()
    monkeypatch.setitem(sources.ML_MD5, "ml-100k", md5)
    assert data.load_dataset(cfg).n_items == 5 and [p.name for p in raw.iterdir()] == ["ml-100k.zip"]


def test_download_has_a_timeout(tmp_path, monkeypatch):
    (tmp_path / "f.bin").write_bytes(b"x" * 10)
    seen, urlopen = [], sources.urllib.request.urlopen

    def spy(url, **kw):
        seen.append(kw.get("timeout"))
        return urlopen(url, **kw)
    monkeypatch.setattr(sources.urllib.request, "urlopen", spy)
    sources.download((tmp_path / "f.bin").as_uri(), str(tmp_path / "out" / "f.bin"))
    assert seen == [sources.DOWNLOAD_TIMEOUT] and 0 < sources.DOWNLOAD_TIMEOUT <= 300

    def stall(url, **kw):
        raise TimeoutError("timed out")
    monkeypatch.setattr(sources.urllib.request, "urlopen", stall)
    with pytest.raises(OSError, match="could not download .*timed out"):
        sources.download("https://example.invalid/g.bin", str(tmp_path / "out" / "g.bin"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f.bin"]


def test_failed_download_leaves_no_part_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "ML_URL", tmp_path.as_uri() + "/missing-{}.zip")
    cfg = data.DataConfig(dataset="ml-1m", data_dir=str(tmp_path / "data"))
    with pytest.raises(OSError, match="could not download .*missing-ml-1m.zip"):
        data.load_dataset(cfg)
    assert no_cache(cfg) and not list((tmp_path / "data").rglob("*.part"))


# ---------------------------------------------------------------- samples and splits


def test_every_prefix_is_a_sample_with_at_most_20_history_items(tmp_path):
    movies = [{"item_id": i, "title": f"Movie {i}"} for i in range(1, 31)]
    ratings = [{"user_id": "long", "item_id": i, "timestamp": 100 + i} for i in range(1, 26)]
    ratings += [{"user_id": f"s{u}", "item_id": 26 + u, "timestamp": 10 + u} for u in range(4)]
    ratings += [{"user_id": f"s{u}", "item_id": 1, "timestamp": 50} for u in range(4)]
    ds = data.load_dataset(custom_cfg(tmp_path, ratings=ratings, movies=movies))
    long = [s for s in all_samples(ds) if s["user"] == "long"]
    ids = {t: i for i, t in enumerate(ds.titles)}
    seq = [ids[f"Movie {i}"] for i in range(1, 26)]
    assert len(long) == 24 and [s["target"] for s in long] == seq[1:]
    assert [len(s["history"]) for s in long] == [min(i, 20) for i in range(1, 25)]
    assert long[-1]["history"] == seq[4:24] and long[0]["history"] == seq[:1]


def test_stable_sort_keeps_file_order_on_time_ties(tmp_path):
    ratings = [{"user_id": "u", "item_id": i, "rating": 3, "timestamp": 5} for i in (30, 10, 20)] + RATINGS
    ds = data.load_dataset(custom_cfg(tmp_path, ratings=ratings))
    u = [s for s in all_samples(ds) if s["user"] == "u"]
    title = lambda i: ds.titles[i]
    assert [title(s["target"]) for s in u] == ["Toy Story", "Heat"] and title(u[0]["history"][0]) == "Fargo"


def test_split_sizes_and_time_order(tmp_path):
    ds = data.load_dataset(data.DataConfig())
    n = len(all_samples(ds))
    assert [len(ds.splits[k]) for k in ("train", "valid", "test")] == [int(0.8 * n), int(0.9 * n) - int(0.8 * n),
                                                                     n - int(0.9 * n)]
    train_max = max(s["time"] for s in ds.splits["train"])
    assert train_max <= min(s["time"] for s in ds.splits["valid"] + ds.splits["test"])
    assert max(s["time"] for s in ds.splits["valid"]) <= min(s["time"] for s in ds.splits["test"])


def test_pad_id_is_never_a_real_item(tmp_path):
    ds = data.load_dataset(custom_cfg(tmp_path))
    assert ds.titles[0] == "" and ds.texts[0] == "" and ds.n_items == 4
    ids = {i for s in all_samples(ds) for i in s["history"] + [s["target"]]}
    assert min(ids) == 1 and max(ids) == ds.n_items


def test_single_interaction_users_are_skipped_and_counted(tmp_path):
    ratings = RATINGS + [{"user_id": "once", "item_id": 40, "timestamp": 7}, {"user_id": "twice", "item_id": 40,
                                                                             "timestamp": 8}]
    cfg = custom_cfg(tmp_path, ratings=ratings)
    ds = data.load_dataset(cfg)
    stats = data.dataset_stats(ds)
    assert stats["skipped_users"] == 2 and stats["users"] == 4 and stats["samples"] == 12
    assert not {"once", "twice"} & {s["user"] for s in all_samples(ds)}
    assert data.dataset_stats(data.load_dataset(cfg))["skipped_users"] == 2  # survives the cache


# ---------------------------------------------------------------- MovieLens and bring-your-own


def ml_ratings():
    return [(u, m, 4, 880000000 + 100 * u + k) for u in (1, 2, 3) for k, m in enumerate((1, 2, 3, 4, 5))]


def write_ml100k(zpath):
    flags = lambda *on: "|".join("1" if g in on else "0" for g in sources.ML100K_GENRES)
    movies = [(1, "Toy Story (1995)", flags("Animation", "Children's", "Comedy")), (2, "GoldenEye (1995)",
              flags("Action")), (3, "Caf\u00e9 M\u00fcller (1996)", flags("Drama")), (4, "Heat (1995)",
              flags("Crime")), (5, "unknown", flags("unknown"))]
    item = "".join(f"{i}|{t}|01-Jan-1995||http://x|{g}\n" for i, t, g in movies)
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("ml-100k/u.data", "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in ml_ratings()))
        z.writestr("ml-100k/u.item", item.encode("latin-1"))


def write_ml1m(folder):
    folder.mkdir(parents=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in ml_ratings()))
    movies = ["1::Toy Story (1995)::Animation|Children's|Comedy", "2::GoldenEye (1995)::Action",
              "3::Caf\u00e9 M\u00fcller (1996)::Drama", "4::Heat (1995)::Crime", "5::Sabrina (1954)::Romance"]
    (folder / "movies.dat").write_bytes("\n".join(movies).encode("latin-1"))


def test_movielens_100k_zip(tmp_path):
    write_ml100k(tmp_path / "ml-100k.zip")
    ds = data.load_dataset(data.DataConfig(dataset="ml-100k", data_dir=str(tmp_path / "data"), raw_dir=str(tmp_path)))
    assert ds.category == "movie" and ds.n_items == 5 and len(all_samples(ds)) == 12
    assert ds.texts[1] == "title: Toy Story; year: 1995; genres: Animation Children's Comedy"
    assert ds.titles[3] == "Caf\u00e9 M\u00fcller" and ds.texts[5] == "title: unknown; genres: unknown"


def test_movielens_1m_extracted_folder_and_zip(tmp_path):
    write_ml1m(tmp_path / "data" / "raw" / "ml-1m")
    ds = data.load_dataset(data.DataConfig(dataset="ml-1m", data_dir=str(tmp_path / "data")))  # <data_dir>/raw default
    assert ds.texts[1] == "title: Toy Story; year: 1995; genres: Animation Children's Comedy"
    assert ds.texts[3] == "title: Caf\u00e9 M\u00fcller; year: 1996; genres: Drama" and len(all_samples(ds)) == 12
    with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w") as z:
        for f in ("ratings.dat", "movies.dat"):
            z.write(tmp_path / "data" / "raw" / "ml-1m" / f, f"ml-1m/{f}")
    cfg = data.DataConfig(dataset="ml-1m", data_dir=str(tmp_path / "data2"), raw_dir=str(tmp_path))
    assert data.load_dataset(cfg).texts == ds.texts


@pytest.mark.parametrize("ext", [".tsv", ".csv", ".jsonl"])
def test_bring_your_own_tables(tmp_path, ext):
    movies = [dict(m, genres=m["genres"].split()) if ext == ".jsonl" else m for m in MOVIES]
    ds = data.load_dataset(custom_cfg(tmp_path, ext, movies=movies, category="film"))
    assert ds.texts[1] == "title: Toy Story; year: 1995; genres: Animation Children's Comedy"
    assert ds.titles[1:] == ["Toy Story", "Heat", "Fargo", "Alien"] and ds.category == "film"
    assert data.dataset_stats(ds) | {"dataset": ""} == {
        "dataset": "", "users": 4, "items": 4, "samples": 12, "train": 9, "valid": 1, "test": 2, "skipped_users": 0,
        "first_date": "1970-01-01", "last_date": "1970-01-01", "mean_history": 2.0}
    (tmp_path / "ref").mkdir()
    ref = data.load_dataset(custom_cfg(tmp_path / "ref"))  # TSV with genres as one string
    assert ds.splits == ref.splits and ds.texts == ref.texts


@pytest.mark.parametrize("ext", [".tsv", ".csv", ".jsonl"])
def test_utf8_bom_tables_load(tmp_path, ext):
    """Excel's 'CSV UTF-8' starts the file with a byte-order mark; it must not become part of 'item_id'."""
    cfg = custom_cfg(tmp_path, ext)
    for path in (cfg.interactions, cfg.items):
        Path(path).write_bytes(b"\xef\xbb\xbf" + Path(path).read_bytes())
    ds = data.load_dataset(cfg)
    (tmp_path / "ref").mkdir()
    ref = data.load_dataset(custom_cfg(tmp_path / "ref", ext))
    assert ds.titles[1:] == ["Toy Story", "Heat", "Fargo", "Alien"] and ds.splits == ref.splits
    assert ds.texts == ref.texts


@pytest.mark.skipif(not ML100K.is_dir(), reason="shared MovieLens-100K copy absent")
def test_shared_ml100k_numbers(tmp_path):
    cfg = data.DataConfig(dataset="custom", data_dir=str(tmp_path), interactions=str(ML100K / "interactions.tsv"),
                       items=str(ML100K / "items.tsv"))
    s = data.dataset_stats(data.load_dataset(cfg))
    assert (s["users"], s["items"], s["samples"], s["train"], s["valid"], s["test"]) == \
        (943, 1682, 99057, 79245, 9906, 9906)


# ---------------------------------------------------------------- cache


def test_cache_reused_atomic_and_keyed_by_settings(tmp_path, monkeypatch):
    metas, reviews = filler()
    write_amazon(tmp_path / "raw", metas, reviews)
    cfg = amazon_cfg(tmp_path)
    ds = data.load_dataset(cfg)
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert [p.relative_to(tmp_path / "data").as_posix() for p in files] == [f"{ds.name}/dataset.json"]
    calls = []
    build = data._build
    monkeypatch.setattr(data, "_build", lambda *a: calls.append(1) or build(*a))
    assert data.load_dataset(cfg) == ds and calls == []  # reused, not rebuilt
    assert data.load_dataset(amazon_cfg(tmp_path, force=True)) == ds and calls == [1]
    other = data.load_dataset(amazon_cfg(tmp_path, window=2))
    assert other.name != ds.name and calls == [1, 1]
    assert max(len(s["history"]) for s in all_samples(other)) == 2


def test_failed_cache_write_leaves_nothing(tmp_path, monkeypatch):
    cfg = custom_cfg(tmp_path)

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(data.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        data.load_dataset(cfg)
    assert no_cache(cfg)


def test_custom_cache_key_follows_file_content(tmp_path):
    cfg = custom_cfg(tmp_path)
    key = data.cache_key(cfg)
    with open(cfg.interactions, "a") as f:
        f.write("u9\t10\t3\t99\n")
    assert data.cache_key(cfg) != key


# ---------------------------------------------------------------- bad inputs (each leaves no cache)


def test_unknown_dataset(tmp_path):
    cfg = data.DataConfig(dataset="cd", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'cd'.*toy, cds, instruments, games, ml-100k, ml-1m, custom"):
        data.load_dataset(cfg)
    assert no_cache(cfg)


@pytest.mark.parametrize("ext", [".tsv", ".jsonl"])
def test_missing_columns(tmp_path, ext):
    ratings = [{k: v for k, v in r.items() if k != "timestamp"} for r in RATINGS]
    cfg = custom_cfg(tmp_path, ext, ratings=ratings)
    with pytest.raises(ValueError, match=rf"inter{ext} lacks column\(s\) timestamp"):
        data.load_dataset(cfg)
    assert no_cache(cfg)


def test_amazon_missing_column(tmp_path):
    metas, reviews = filler()
    write_amazon(tmp_path / "raw", metas, reviews)
    with gzip.open(tmp_path / "raw" / f"{CAT}.csv.gz", "wt") as f:
        f.write("user_id,asin,rating,timestamp\nu,A0,5,1\n")
    cfg = amazon_cfg(tmp_path)
    with pytest.raises(ValueError, match=f"{CAT}.csv.gz lacks column\\(s\\) parent_asin"):
        data.load_dataset(cfg)
    assert no_cache(cfg)


@pytest.mark.parametrize("content", ["", "item_id\ttitle\n"])
def test_empty_file(tmp_path, content):
    cfg = custom_cfg(tmp_path)
    Path(cfg.items).write_text(content)
    with pytest.raises(ValueError, match="items.tsv is empty"):
        data.load_dataset(cfg)
    assert no_cache(cfg)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("raw, fix", [("data/raw", "delete it and rerun to re-download it"),  # our download
                                      ("raw", "copy or compress it again")])  # the user's copy in --data.raw_dir
def test_corrupt_gzip(tmp_path, damage, raw, fix):
    metas, reviews = filler()
    write_amazon(tmp_path / raw, metas, reviews)
    path = tmp_path / raw / f"meta_{CAT}.jsonl.gz"
    path.write_bytes(b"not a gzip file" if damage == "garbage" else path.read_bytes()[:-12])
    cfg = amazon_cfg(tmp_path, raw_dir=None if raw == "data/raw" else str(tmp_path / raw))
    with pytest.raises(ValueError, match=f"meta_{CAT}.jsonl.gz is a corrupt gzip file.*{fix}"):
        data.load_dataset(cfg)
    assert no_cache(cfg)


def test_a_corrupt_custom_gzip_is_not_sent_to_a_download(tmp_path):
    """A custom table is the user's own file: the fix is to make it again, not to 're-download' it."""
    cfg = custom_cfg(tmp_path)
    gz = tmp_path / "inter.tsv.gz"
    gz.write_bytes(gzip.compress(Path(cfg.interactions).read_bytes())[:-12])  # truncated
    cfg.interactions = str(gz)
    with pytest.raises(ValueError, match="inter.tsv.gz is a corrupt gzip file.*copy or compress it again") as e:
        data.load_dataset(cfg)
    assert "download" not in str(e.value)


def test_corrupt_zip(tmp_path):
    (tmp_path / "ml-100k.zip").write_bytes(b"PK not really")
    cfg = data.DataConfig(dataset="ml-100k", data_dir=str(tmp_path / "data"), raw_dir=str(tmp_path))
    with pytest.raises(ValueError, match="ml-100k.zip is corrupt.*delete it"):
        data.load_dataset(cfg)
    assert no_cache(cfg)


def test_interactions_naming_unknown_items(tmp_path):
    cfg = custom_cfg(tmp_path, ratings=RATINGS + [{"user_id": "u0", "item_id": 99, "timestamp": 1},
                                                  {"user_id": "u1", "item_id": 77, "timestamp": 1}])
    with pytest.raises(ValueError, match="inter.tsv names 2 item id.*99, 77"):
        data.load_dataset(cfg)
    assert no_cache(cfg)


def test_other_bad_inputs(tmp_path):
    cfg = custom_cfg(tmp_path, ratings=RATINGS[:3])  # 2 samples: no valid/test split possible
    with pytest.raises(ValueError, match="only 2 samples"):
        data.load_dataset(cfg)
    cfg = custom_cfg(tmp_path, ratings=[dict(r, timestamp="yesterday") for r in RATINGS])
    with pytest.raises(ValueError, match="timestamp 'yesterday' is not a number"):
        data.load_dataset(cfg)
    with pytest.raises(ValueError, match="--data.items .*nope.tsv not found"):
        data.load_dataset(data.DataConfig(**{**vars(cfg), "items": str(tmp_path / "nope.tsv")}))
    with pytest.raises(ValueError, match="needs both tables"):
        data.load_dataset(data.DataConfig(dataset="custom", data_dir=str(tmp_path / "data")))
    assert no_cache(cfg)


def test_duplicate_item_ids_name_both_lines(tmp_path):
    cfg = custom_cfg(tmp_path, movies=MOVIES + [{"item_id": 20, "title": "Heat (remake)", "year": 2030,
                                                 "genres": "Action"}])
    with pytest.raises(ValueError, match=r"items.tsv: item id '20' is on line 3 and again on line 6; keep one row"):
        data.load_dataset(cfg)
    assert no_cache(cfg)
    folder = tmp_path / "raw" / "ml-1m"
    write_ml1m(folder)
    with open(folder / "movies.dat", "a") as f:
        f.write("\n2::Other (2000)::Drama")
    with pytest.raises(ValueError, match=r"movies.dat: item id '2' is on line 2 and again on line 6"):
        data.load_dataset(data.DataConfig(dataset="ml-1m", data_dir=str(tmp_path / "d1"),
                                          raw_dir=str(tmp_path / "raw")))


@pytest.mark.parametrize("ext", [".tsv", ".jsonl"])
def test_custom_interactions_given_twice_are_refused(tmp_path, ext):
    """Every row twice would double the samples, each copy a phantom whose target is its own history's newest item;
    the same read with another rating is the same interaction too. A re-read at another time is kept."""
    cfg = custom_cfg(tmp_path, ext, ratings=RATINGS + RATINGS)
    first, again = (2, 18) if ext == ".tsv" else (1, 17)  # the header is line 1 of a .tsv
    with pytest.raises(ValueError, match=rf"inter{ext}: line {again} repeats line {first} \(user 'u0', item '10', "
                                         r"timestamp 0\): an interaction given twice"):
        data.load_dataset(cfg)
    assert no_cache(cfg)
    (tmp_path / "r").mkdir(), (tmp_path / "ok").mkdir()
    other_rating = RATINGS + [dict(RATINGS[5], rating=1)]
    with pytest.raises(ValueError, match="repeats line"):
        data.load_dataset(custom_cfg(tmp_path / "r", ext, ratings=other_rating))
    reread = RATINGS + [dict(RATINGS[0], timestamp=RATINGS[3]["timestamp"] + 1)]
    ds = data.load_dataset(custom_cfg(tmp_path / "ok", ext, ratings=reread))
    u0 = [s for s in all_samples(ds) if s["user"] == "u0"]
    assert len(u0) == 4 and u0[-1]["target"] == u0[0]["history"][0]  # the re-read is its own sample


@pytest.mark.parametrize("table, row, message", [
    ("inter", {"user_id": "", "item_id": 10, "timestamp": 5}, r"inter.jsonl, line 17: user_id is \"\"; give every row"),
    ("inter", {"user_id": None, "item_id": 10, "timestamp": 5}, r"inter.jsonl, line 17: user_id is null"),
    ("inter", {"user_id": "u9", "item_id": " ", "timestamp": 5}, r"inter.jsonl, line 17: item_id is \" \""),
    ("items", {"item_id": "", "title": "Nameless"}, r"items.jsonl, line 5: item_id is \"\""),
    ("items", {"item_id": 50, "title": "  "}, r"items.jsonl, line 5: item '50' has an empty title"),
    ("items", {"item_id": 50, "title": None, "year": 1990}, r"items.jsonl, line 5: item '50' has an empty title"),
])
def test_custom_empty_ids_and_titles_are_refused(tmp_path, table, row, message):
    """An empty id would merge every such row into one user or item named "" (the pad item's key in items.json);
    an item without a title cannot be named in a prompt or a recommendation."""
    ratings, movies = (RATINGS + [row], MOVIES) if table == "inter" else (RATINGS, MOVIES + [row])
    cfg = custom_cfg(tmp_path, ".jsonl", ratings=ratings, movies=movies)
    with pytest.raises(ValueError, match=message):
        data.load_dataset(cfg)
    assert no_cache(cfg)


@pytest.mark.parametrize("ext,value,error", [
    (".tsv", "inf", "out of range"), (".tsv", "nan", "out of range"), (".tsv", "-5", "out of range"),
    (".tsv", "1e300", "out of range"), (".jsonl", float("inf"), "out of range"), (".jsonl", True, "not a number"),
    (".jsonl", None, "not a number")])
def test_bad_timestamp_names_file_and_line(tmp_path, ext, value, error):
    ratings = [dict(r) for r in RATINGS]
    ratings[2]["timestamp"] = value  # the third data row: line 4 under a header, line 3 in JSONL
    cfg = custom_cfg(tmp_path, ext, ratings=ratings)
    line = 4 if ext == ".tsv" else 3
    with pytest.raises(ValueError, match=rf"inter{ext}, line {line}: timestamp .* {error}; give Unix seconds"):
        data.load_dataset(cfg)
    assert no_cache(cfg)


@pytest.mark.parametrize("bad,kind", [("[1, 2]", "list"), ("3", "int"), ('"x"', "str")])
def test_jsonl_line_that_is_not_an_object(tmp_path, bad, kind):
    cfg = custom_cfg(tmp_path, ".jsonl")
    lines = Path(cfg.items).read_text().splitlines()
    Path(cfg.items).write_text("\n".join(lines[:1] + ["", bad] + lines[1:]) + "\n")  # a blank line still counts
    with pytest.raises(ValueError, match=rf"items.jsonl: line 3 is a JSON {kind} .*, not an object; each line must "
                                         r"be one object with the keys item_id, title"):
        data.load_dataset(cfg)
    assert no_cache(cfg)


def test_row_missing_a_field_names_the_line(tmp_path):
    ratings = [dict(r) for r in RATINGS]
    del ratings[4]["timestamp"]
    cfg = custom_cfg(tmp_path, ".jsonl", ratings=ratings)
    with pytest.raises(ValueError, match=r"inter.jsonl lacks column\(s\) timestamp on line 5 \(that line has "
                                         r"user_id, item_id, rating\); every line needs user_id, item_id, timestamp"):
        data.load_dataset(cfg)
    cfg = custom_cfg(tmp_path, ".csv")
    lines = Path(cfg.interactions).read_text().splitlines()
    for row, width in (("u9,10,4", 3), ("u9,10,4,5,extra", 5)):
        Path(cfg.interactions).write_text("\n".join(lines[:3] + [row] + lines[3:]) + "\n")
        with pytest.raises(ValueError, match=rf"inter.csv: line 4 has {width} fields but the header has 4; give every "
                                             "row one value per column .*comma"):
            data.load_dataset(cfg)
    assert no_cache(cfg)


def test_movielens_damaged_line_names_file_and_line(tmp_path):
    write_ml100k(tmp_path / "ml-100k.zip")
    with zipfile.ZipFile(tmp_path / "ml-100k.zip") as z:
        udata, item = z.read("ml-100k/u.data").decode(), z.read("ml-100k/u.item")
    lines = udata.splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0]  # a line cut short
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as z:
        z.writestr("ml-100k/u.data", "\n".join(lines))
        z.writestr("ml-100k/u.item", item)
    cfg = data.DataConfig(dataset="ml-100k", data_dir=str(tmp_path / "data"), raw_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"ml-100k.zip \(ml-100k/u.data\), line 2 has 3 '\\t'-separated fields, "
                                         r"not 4 .*damaged: delete .*ml-100k.zip and rerun"):
        data.load_dataset(cfg)
    assert no_cache(cfg)
    folder = tmp_path / "raw" / "ml-1m"
    write_ml1m(folder)
    (folder / "ratings.dat").write_text("1::1::5::880000000\n2::3\n")
    with pytest.raises(ValueError, match=r"ml-1m/ratings.dat, line 2 has 2 '::'-separated fields, not 4"):
        data.load_dataset(data.DataConfig(dataset="ml-1m", data_dir=str(tmp_path / "d1"),
                                          raw_dir=str(tmp_path / "raw")))


@pytest.mark.parametrize("kw,error", [
    ({"window": 0}, r"--data.window must be >= 1, got 0"),
    ({"extend_months": 0}, r"--data.extend_months must be >= 1"),
    ({"max_history_chars": 0}, r"--data.max_history_chars must be >= 1"),
    ({"train_end": 0.9, "valid_end": 0.8}, r"--data.train_end 0.9 and --data.valid_end 0.8 must satisfy "
                                           r"0 < train_end < valid_end < 1"),
    ({"valid_end": 1.0}, r"--data.valid_end 1.0 must satisfy 0 < train_end < valid_end < 1"),
    ({"train_end": 0.0}, r"--data.train_end 0.0 and"),
    ({"toy_noise": 1.5}, r"--data.toy_noise must be a finite number in \[0, 1\], got 1.5"),
    ({"start": "2023-13-01"}, r"--data.start '2023-13-01' is not a date; use YYYY-MM-DD"),
    ({"start": "2023-10-01"}, r"--data.start 2023-10-01 must be before --data.end 2023-10-01"),
    ({"interactions": "i.tsv"}, r"--data.interactions is read only with --dataset custom \(got --dataset toy\); "
                                r"add --dataset custom"),
    ({"dataset": "ml-100k", "interactions": "i.tsv", "items": "m.tsv"},
     r"--data.interactions and --data.items are read only with --dataset custom \(got --dataset ml-100k\)"),
    ({"dataset": "custom", "interactions": "i.tsv"}, r"needs both tables: .*\(--data.items missing\)"),
    ({"dataset": "custom", "interactions": "i.xlsx", "items": "m.tsv"}, r"--data.interactions i.xlsx: unknown table "
                                                                         r"format; use .tsv, .csv, .jsonl"),
    ({"dataset": "cd"}, r"unknown dataset 'cd' \(--dataset\)")])
def test_check_config_names_the_flag(tmp_path, kw, error):
    cfg = data.DataConfig(**{"data_dir": str(tmp_path / "data"), **kw})
    with pytest.raises(ValueError, match=error):
        data.check_config(cfg)
    with pytest.raises(ValueError, match=error):  # load_dataset checks before any work
        data.load_dataset(cfg)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("edge,past", [
    ({"window": 1}, {"window": 0}),
    ({"train_end": 0.5, "valid_end": 0.6}, {"train_end": 0.6, "valid_end": 0.6}),
    ({"toy_noise": 0.0}, {"toy_noise": -0.1}),
    ({"toy_noise": 1.0}, {"toy_noise": 1.5}),
    ({"max_history_chars": 1}, {"max_history_chars": 0}),
])
def test_check_config_draws_each_line_at_the_edge(tmp_path, edge, past):
    """A value at the edge of what a field allows passes, and the next one past it is refused."""
    assert data.check_config(custom_cfg(tmp_path, **edge)) is None
    with pytest.raises(ValueError, match=f"--data.{next(iter(past))}"):
        data.check_config(custom_cfg(tmp_path, **past))


def test_check_config_takes_a_one_day_amazon_window():
    assert data.check_config(data.DataConfig(dataset="cds", start="2020-01-01", end="2020-01-02",
                                             min_items=0)) is None
    with pytest.raises(ValueError, match="must be before --data.end"):
        data.check_config(data.DataConfig(dataset="cds", start="2020-01-02", end="2020-01-02"))


# ---------------------------------------------------------------- toy, prompts, stats, CLI


def test_toy_builds_fast_deterministic_and_realistic():
    t = time.process_time()  # this process's CPU seconds: a loaded machine cannot fail it, a slow build can
    ds = data.load_dataset(data.DataConfig())
    assert time.process_time() - t < 1.0
    assert 150 <= ds.n_items <= 250 and 2000 <= len(all_samples(ds)) <= 4000 and ds.category == "book"
    assert data.load_dataset(data.DataConfig()) == ds and data.load_dataset(data.DataConfig(seed=1)) != ds
    assert all(re.fullmatch(r"The \w+ \w+, Book \d", t) for t in ds.titles[1:])
    assert ds.texts[1].startswith(f"'title': {ds.titles[1]}\n 'average_rating': ")


def test_toy_readers_alternate_two_series():
    """The bookstore's rule, read from the titles: most next books continue the series read before the last
    one, almost none the last one's; and the toy prompts' history budget holds exactly the newest two books."""
    from tokenizers import pre_tokenizers
    ds = data.load_dataset(data.DataConfig())
    key = {t: i for i, t in enumerate(ds.titles)}

    def next_of(i):
        series, k = ds.titles[i].rsplit(", Book ", 1)
        return key.get(f"{series}, Book {int(k) + 1}")
    for split in ds.splits.values():
        before_last = sum(len(s["history"]) > 1 and s["target"] == next_of(s["history"][-2]) for s in split)
        last = sum(s["target"] == next_of(s["history"][-1]) for s in split)
        assert before_last > 0.5 * len(split) and last < 0.01 * len(split)
    pre = pre_tokenizers.BertPreTokenizer()
    assert len({len(pre.pre_tokenize_str(t.lower())) for t in ds.texts[1:]}) == 1  # one length in tokens
    for s in ds.splits["train"][:300]:
        shown = data.history_text(ds, s["history"], toy.HISTORY_CHARS)
        assert shown.count("'title': ") == min(2, len(s["history"]))


def test_toy_lessons_parse_and_are_right_as_often_as_asked():
    """The toy backbone's lessons: every completion has the paper's format, names the series to continue and
    its next book (the one read before the last for a share `right` of them, else the last one's), answers
    with its genre; other data gets none."""
    import rewards
    ds = data.load_dataset(data.DataConfig())
    train = [s for s in ds.splits["train"] if len(s["history"]) > 1]
    lessons = toy.lessons(ds, train, lambda s: [{"role": "user", "content": str(s["target"])}], right=0.6)
    assert [m[0]["content"] for m, _ in lessons] == [str(s["target"]) for s in train]

    def says(i):  # what a lesson continuing book i's series says
        series, k = ds.titles[i].rsplit(", Book ", 1)
        genre = ds.texts[i].split("'description': ")[1].split(",")[0]
        return f"next in the {series.split()[-1]} series: book {int(k) + 1}", f"'description': {genre}"
    right = 0
    for s, (_, text) in zip(train, lessons):
        assert rewards.format_reward(text) == 1.0
        said = rewards.parse_completion(text)
        assert said in (says(s["history"][-2]), says(s["history"][-1]))
        right += said == says(s["history"][-2])
    assert abs(right / len(train) - 0.6) < 0.04
    assert toy.lessons(dataclasses.replace(ds, name="custom-1"), train, lambda s: []) == []


def test_history_text_budget_keeps_latest():
    ds = data.Dataset("t", "item", ["", "a", "b", "c"], ["", "x" * 10, "y" * 10, "z" * 10], {})
    assert data.history_text(ds, [1, 2, 3], 100) == f"{'x' * 10}\n{'y' * 10}\n{'z' * 10}"
    assert data.history_text(ds, [1, 2, 3], 21) == f"{'y' * 10}\n{'z' * 10}"  # oldest dropped first
    assert data.history_text(ds, [1, 2, 3], 20) == "z" * 10
    assert data.history_text(ds, [1, 2, 3], 4) == "zzzz"  # the latest alone is too long: truncated, not empty
    with pytest.raises(ValueError, match="empty history"):
        data.history_text(ds, [], 100)


def test_build_messages_official_prompt(tmp_path):
    metas, reviews = filler()
    write_amazon(tmp_path / "raw", metas, reviews)
    cfg = amazon_cfg(tmp_path)
    ds = data.load_dataset(cfg)
    sample = ds.splits["test"][0]
    (msg,) = data.build_messages(ds, sample, cfg)
    assert msg["role"] == "user"
    assert msg["content"].startswith("Analyze briefly and finally recommend next CD or vinyl item I might purchase.")
    assert "recommend next CD or vinyl I might purchase inside <answer> and </answer>" in msg["content"]
    assert msg["content"].endswith("\n" + data.history_text(ds, sample["history"], cfg.max_history_chars))
    assert "next book item" in data.build_messages(data.load_dataset(data.DataConfig()), sample, cfg)[0]["content"]
    with pytest.raises(ValueError, match="empty history"):
        data.build_messages(ds, dict(sample, history=[]), cfg)


def test_cli_table_and_json(capsys):
    data.main(["--dataset", "toy", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(out[-1])
    assert {"users", "items", "samples", "train", "valid", "test"} <= set(stats)
    assert any(re.fullmatch(rf"samples\s+{stats['samples']:,}", line) for line in out[:-1])
    with pytest.raises(SystemExit, match="unknown dataset 'nope'"):
        data.main(["--dataset", "nope"])


def test_cli_rejects_bad_flags_with_the_named_spelling(tmp_path):
    with pytest.raises(SystemExit, match="--data.window must be >= 1"):
        data.main(["--window", "0"])
    with pytest.raises(SystemExit, match="--data.window must be >= 1"):
        data.main(["--data.window", "0"])  # the spelling the error names works here too
    with pytest.raises(SystemExit, match="--data.interactions is read only with --dataset custom"):
        data.main(["--interactions", write_table(tmp_path / "i.tsv", RATINGS)])


def test_cli_spellings_of_readme_and_rporec(tmp_path, capsys):
    """Bare flags (--raw-dir, --raw_dir), rporec's --data.field (also =VALUE), --force and --json all parse."""
    write_ml100k(tmp_path / "ml-100k.zip")
    inter, items = write_table(tmp_path / "i.tsv", RATINGS), write_table(tmp_path / "v.tsv", MOVIES)
    runs = [["--dataset", "ml-100k", "--raw-dir", str(tmp_path), "--data-dir", str(tmp_path / "a"), "--json"],
            ["--data.dataset=ml-100k", "--data.raw_dir", str(tmp_path), "--data_dir", str(tmp_path / "a"), "--force",
             "--cli.json"],
            ["--dataset", "custom", "--interactions", inter, "--items", items, "--data.data-dir", str(tmp_path / "b"),
             "--json=true"]]
    for argv, name in zip(runs, ("ml-100k-", "ml-100k-", "custom-")):
        data.main(argv)
        stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert stats["dataset"].startswith(name) and stats["samples"] == 12
    data.main(["--dataset", "toy", "--json", "false"])
    assert not capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
    with pytest.raises(SystemExit, match="unknown flag --bogus"):
        data.main(["--bogus", "1"])
    with pytest.raises(SystemExit, match="--window takes a int, got 'x'"):
        data.main(["--window", "x"])


def test_cli_help_lists_every_field_with_its_comment(capsys):
    data.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(data.DataConfig):
        line = next(t for t in out.splitlines() if t.startswith(f"  --{f.name} {f.default!r}"))
        assert line == f"  --{f.name} {f.default!r}" or line.startswith(f"  --{f.name} {f.default!r}  (")
    assert "processed caches live in <data_dir>/<dataset>-<hash>/" in out
    assert "--cli.json False\n      also print the statistics as one JSON line (also spelled --json)" in out


# ---------------------------------------------------------------- toy models


def test_toy_words_follow_the_given_pre_tokenizer():
    from tokenizers import pre_tokenizers
    texts = ["Wait... The END", "the end"]
    assert toy.words(texts, pre_tokenizers.Whitespace()) == ["...", "end", "the", "wait"]
    assert toy.words(texts, pre_tokenizers.BertPreTokenizer()) == [".", "end", "the", "wait"]


def test_toy_builders_load_are_seeded_and_build_once(tmp_path):
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    texts = ["A red Jazz album...", "blue rock, live"]
    for build, kw in ((toy.build_backbone, {}), (toy.build_encoder, {"dim": 8})):
        a, b, c = (build(texts, str(tmp_path / f"{build.__name__}{n}"), seed=s, **kw) for n, s in enumerate((0, 0, 1)))
        wa, wb, wc = (load_file(f"{p}/model.safetensors") for p in (a, b, c))
        assert all((wa[k] == wb[k]).all() for k in wa) and any((wa[k] != wc[k]).any() for k in wa)
        files = {f: (tmp_path / a / f).read_bytes() for f in sorted(os.listdir(a))}
        assert build(["other words"], a, seed=5, **kw) == a  # already there: nothing rebuilt
        assert {f: (tmp_path / a / f).read_bytes() for f in sorted(os.listdir(a))} == files
    tok = AutoTokenizer.from_pretrained(tmp_path / "build_backbone0")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "build_backbone0")
    ids = tok("RED jazz, live")["input_ids"]  # (T,)
    assert tok.unk_token_id not in ids and tok.decode(ids) == "red jazz, live"  # lowercased words, not [UNK]
    assert model(input_ids=torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))
    assert "..." not in tok.get_vocab() and "." in tok.get_vocab()  # BertPreTokenizer: one token per mark
    enc = SentenceTransformer(str(tmp_path / "build_encoder0"), device="cpu")
    assert enc.encode(["red jazz", "never seen"]).shape == (2, 8)
    assert "..." in enc[0].tokenizer.get_vocab()  # Whitespace: a run of marks is one word
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="delete it"):
        toy.build_encoder(texts, str(tmp_path / "junk"))


def test_a_toy_cot_is_sorted_by_the_book_it_names():
    """tools.toy_cots' classes: the next book of the series read before the last, of the last one's, another, none."""
    ds = data.load_dataset(data.DataConfig())
    s = next(s for s in ds.splits["test"] if len(s["history"]) > 1
             and ds.titles[s["history"][-1]].split(",")[0] != ds.titles[s["history"][-2]].split(",")[0])

    def cot(book, step=1):
        series, k = ds.titles[book].rsplit(", Book ", 1)
        return f"<think> next in the {series.split()[-1].lower()} series : book {int(k) + step} </think>"
    assert toy.cot_kind(ds, s["history"], cot(s["history"][-2])) == "before the last"
    assert toy.cot_kind(ds, s["history"], cot(s["history"][-1])) == "the last"
    assert toy.cot_kind(ds, s["history"], cot(s["history"][-1], step=2)) == "another book"
    assert toy.cot_kind(ds, s["history"], "<think> fantasy </think>") == "none"
    assert toy.cot_kind(ds, s["history"][-1:], cot(s["history"][-2])) == "another book"


def test_a_taught_toy_backbone_writes_the_papers_format(tmp_path, monkeypatch):
    """Eighty steps of the lessons (a run takes 250) already give greedy completions in the paper's format
    that name a series of the store; the untaught backbone's do not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import rewards
    monkeypatch.setitem(toy.PRETRAIN, "steps", 80)
    ds, cfg = data.load_dataset(data.DataConfig()), data.DataConfig(max_history_chars=toy.HISTORY_CHARS)
    lessons = toy.lessons(ds, ds.splits["train"][:400], lambda s: data.build_messages(ds, s, cfg))
    nouns = {t.rsplit(", Book ", 1)[0].split()[-1].lower() for t in ds.titles[1:]}
    for taught, where in ((lessons, tmp_path / "taught"), ((), tmp_path / "random")):
        toy.build_backbone(ds.texts[1:], str(where), lessons=taught)
        tok = AutoTokenizer.from_pretrained(where, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(where)
        prompts = [tok.apply_chat_template(data.build_messages(ds, s, cfg), tokenize=False, add_generation_prompt=True)
                   for s in ds.splits["valid"][:8]]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)  # (8,)
        named = [re.search(r"next in the (\w+) series", t) for t in texts]
        ok = [rewards.format_reward(t) == 1.0 and m is not None and m.group(1) in nouns for t, m in zip(texts, named)]
        assert all(ok) if taught else not any(ok), texts


def test_toy_builders_leave_the_callers_rng_alone(tmp_path):
    """Building a toy model draws from its own seeded RNG: a run is the same from a fresh data folder and a
    warm one."""
    import torch
    torch.manual_seed(123)
    before = torch.get_rng_state()
    toy.build_backbone(["a red jazz album"], str(tmp_path / "b"))
    toy.build_encoder(["a red jazz album"], str(tmp_path / "e"), dim=8)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("build", [toy.build_backbone, toy.build_encoder])
def test_a_toy_build_that_loses_the_race_keeps_the_winners_copy(tmp_path, monkeypatch, build):
    """Two runs building the same fresh data folder: the one renaming its copy second keeps the first's
    (identical) model instead of dying on 'Directory not empty'."""
    real, out = toy._save_whole, str(tmp_path / "m")

    def lose_the_race(out_dir, save, *rest):
        real(out_dir, save, *rest)  # the other run renamed its copy in first
        return real(out_dir, save, *rest)

    monkeypatch.setattr(toy, "_save_whole", lose_the_race)
    assert build(["a red jazz album"], out) == out
    assert not [p for p in os.listdir(tmp_path) if p != "m"]  # no temporary folder left behind
