"""Manual check: recommend.py's batch mode reproduces a run's own test metrics, and how fast it is.

    python -m tools.recommend_check RUN [--stage 1|2] [--work DIR]

Writes every test sample's history (the dataset's own ids) as an input line, with the run's cached CoT of that
sample as "reasoning" when the run has a backbone (the Stage II backbone's by default, --stage 1 for the Stage I
backbone's), runs `python recommend.py --run RUN --input ... --out ... --k 10 --keep_history`, and scores its
output: HR@10 and NDCG@10 from the target's place in the 10 items, printed beside metrics.json's test figures.
Needs the run's data folder (the test split and the reasoning cache); recommend.py itself needs only the run.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

import data
import recommend
import rporec
from plumbing import checkpoint, decode
from plumbing.processes import DEVICE


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--stage", default="", help="whose CoTs: 1 or 2 (default 2 when the run has a Stage II)")
    p.add_argument("--work", default="", help="folder for users.jsonl and recs.jsonl (default RUN/check)")
    a = p.parse_args()
    cfg = recommend.load_config(a.run)
    ds = data.load_dataset(cfg.data)
    samples = ds.splits["test"][:cfg.run.limit or None]
    stage = a.stage or ("2" if cfg.run.model != "none" and cfg.run.has_stage2() else "1")
    key = ds.item_keys
    lines = [{"user": s["user"], "history": [key[i] for i in s["history"]], "target": key[s["target"]]}
             for s in samples]
    if cfg.run.model != "none":  # the CoTs the run scored its test split with, from its reasoning cache
        if stage == "2":
            model = decode.load_model(os.path.join(a.run, "best"), torch.float32, DEVICE)[0]  # the run's fp32 masters
        else:
            model = rporec.load_backbone(cfg, ds)[0]
        path = checkpoint.reasoning_cache(cfg, model, "test", cfg.run.seed, data.reasoning_key(cfg.data))
        cache = checkpoint.read_cache(path)
        if len(cache) < len(samples):
            sys.exit(f"error: {path} holds {len(cache)} of {len(samples)} test CoTs")
        for i, line in enumerate(lines):
            line["reasoning"] = cache[i]["text"]
    work = a.work or os.path.join(a.run, "check")
    os.makedirs(work, exist_ok=True)
    users, recs = os.path.join(work, "users.jsonl"), os.path.join(work, "recs.jsonl")
    with open(users, "w") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
    if os.path.exists(recs):
        os.remove(recs)
    cmd = [sys.executable, "recommend.py", "--run", a.run, "--input", users, "--out", recs, "--k", "10",
           "--keep_history"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wall = time.time() - t0
    with open(recs) as f:
        out = [json.loads(t) for t in f]
    assert [o["user"] for o in out] == [x["user"] for x in lines], "recs.jsonl is not in input order"
    places = [o["items"].index(x["target"]) + 1 if x["target"] in o["items"] else 0 for o, x in zip(out, lines)]
    hr = sum(p > 0 for p in places) / len(places)
    ndcg = sum(1 / math.log2(p + 1) for p in places if p) / len(places)
    with open(os.path.join(a.run, "metrics.json")) as f:
        m = json.load(f)[f"stage{stage}"]["test"]
    cots = f"stage {stage} CoTs" if cfg.run.model != "none" else "no CoTs (--model none)"
    print(f"{len(lines)} test histories, {cots}: recommend hr@10={hr:.4f} ndcg@10={ndcg:.4f}; "
          f"metrics.json hr@10={m['hr@10']:.4f} ndcg@10={m['ndcg@10']:.4f} (|diff| {abs(hr - m['hr@10']):.2g}, "
          f"{abs(ndcg - m['ndcg@10']):.2g}); the whole command took {wall:.1f} s")
    sys.exit(0 if round(hr, 4) == round(m["hr@10"], 4) and round(ndcg, 4) == round(m["ndcg@10"], 4) else 1)


if __name__ == "__main__":
    main()
