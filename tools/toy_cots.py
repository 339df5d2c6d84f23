"""What the toy backbone's CoTs say, before and after Stage II: the share that names the next book of the series
read before the last one (what the bookstore's readers do), of the last one's series, some other book, or none.

    python -m tools.toy_cots RUN [--split test|valid]

Reads the CoTs a finished toy run scored its split with, from its reasoning cache: Stage I's backbone's and,
after Stage II, those of the backbone it kept (best/). Needs the run's data folder, as rporec.py left it.
"""
import argparse
import collections
import os
import sys

import torch

import data
import recommend
import rporec
from plumbing import checkpoint, decode, toy
from plumbing.processes import DEVICE


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.toy_cots")
    p.add_argument("run")
    p.add_argument("--split", default="test", choices=("test", "valid"))
    a = p.parse_args(argv)
    cfg = recommend.load_config(a.run)
    if cfg.data.dataset != "toy" or cfg.run.model != "toy":
        sys.exit(f"error: {a.run} is not a run of the toy backbone on the bookstore (--dataset toy --model toy)")
    ds = data.load_dataset(cfg.data)
    samples = ds.splits[a.split][:cfg.run.limit or None]
    models = {"Stage I backbone": rporec.load_backbone(cfg, ds)[0]}
    if os.path.isdir(os.path.join(a.run, "best")):
        models["Stage II, kept step"] = decode.load_model(os.path.join(a.run, "best"), torch.float32, DEVICE)[0]
    for name, model in models.items():
        path = checkpoint.reasoning_cache(cfg, model, a.split, cfg.run.seed, data.reasoning_key(cfg.data))
        cache = checkpoint.read_cache(path)
        if len(cache) < len(samples):
            sys.exit(f"error: {path} holds {len(cache)} of {len(samples)} {a.split} CoTs; run the toy to the end")
        kinds = collections.Counter(toy.cot_kind(ds, s["history"], cache[i]["text"]) for i, s in enumerate(samples))
        shares = ", ".join(f"{k} {kinds[k] / len(samples):.1%}" for k in toy.COT_KINDS)
        print(f"{name}, {len(samples)} {a.split} CoTs: {shares}")


if __name__ == "__main__":
    main()
