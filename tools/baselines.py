"""Baselines on RPORec's data protocol, and the significance test that compares methods across seeds.

    python -m tools.baselines sasrec                                   # SASRec on the toy data, runs/sasrec-toy-<time>/
    python -m tools.baselines sasrec --dataset custom --data.interactions I.tsv --data.items V.tsv --out DIR --seed 1
    python -m tools.baselines sasrec --help                            # every flag, its default and what it means
    python -m tools.baselines compare --a RUN... --b RUN...            # mean +- std per metric and Welch's t-test

SASRec (Kang and McAuley 2018) sees the same samples as the Rechead: the history (at most --data.window items,
oldest first) of every train sample predicts its target, with cross-entropy over all items as RecBole's default
does, and RecBole's default settings. Model selection is the Rechead's: the best valid NDCG@10 epoch, patience 5,
reported on test, by evaluate's full ranking (the pad item 0 is never a candidate). DIR/metrics.json holds
{"sasrec": {"valid", "test", "epoch"}} with the metric keys of an rporec run, so `compare` reads both.

The paper (Table 1) reports means over runs and marks gains by a two-sided t-test at p < 0.05; `compare` gives
each metric's mean and sample std over two groups of run folders (seeds) and the two-sided Welch t-test
(scipy.stats.ttest_ind with equal_var=False: the groups' variances need not be equal).
The popularity and transition floors live in evaluate.py: every rporec run reports them.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import data
import evaluate
from plumbing import config, errors, files, processes, report, run, seeds
from plumbing import flags as flags_lib
from plumbing.errors import fail
from plumbing.flags import SEED, OneOf, Own, Range, setting
from plumbing.processes import DEVICE
from plumbing.report import progress

LN_EPS = 1e-12  # RecBole's layer_norm_eps


# ----------------------------------------------------------------------------- SASRec
@dataclass
class SASRecConfig:
    layers: int = setting(2, Range(1))  # self-attention blocks (RecBole n_layers)
    hidden: int = setting(64, Range(1))  # item and position vector size (RecBole hidden_size)
    heads: int = setting(2, Range(1))  # attention heads, must divide hidden (RecBole n_heads)
    inner: int = setting(256, Range(1))  # feed-forward width inside a block (RecBole inner_size)
    dropout: float = setting(0.5, Range(0, 1, open="high"))  # dropout on embeddings, attention weights and
    # block outputs (RecBole hidden/attn_dropout_prob)
    init_std: float = setting(0.02, Range(0, 1, open="low"))  # std of the normal init of every linear and
    # embedding weight (RecBole initializer_range); above 1 no layer norm keeps the scores finite for long
    lr: float = setting(1e-3, Range(0, 1, open="low"))  # Adam learning rate (RecBole learning_rate); Adam moves
    # each weight by about lr a step, so above 1 nothing is learnt
    batch_size: int = setting(256, Range(1))  # train samples per step
    epochs: int = setting(300, Range(1))  # maximum epochs (RecBole epochs)
    patience: int = setting(5, Range(1))  # stop after this many epochs without a better valid NDCG@10


@dataclass
class SASRecRun:
    dataset: str = setting("toy", OneOf(*data.DATASETS))  # data source, as rporec.py's --dataset (data.py)
    out: str = setting("", Own("a folder you can write to"))  # run folder; default
    # runs/sasrec-<dataset>-<time>
    seed: int = setting(0, SEED)  # seeds the init, the batch order and dropout
    threads: int = setting(1, Range(0))  # torch's CPU threads (0 = torch's default), as rporec's --threads


@dataclass
class SASRecCli:
    """The flags of `python -m tools.baselines sasrec`: --dataset, --out, --seed bare; data and eval spelled as
    in rporec."""
    run: SASRecRun = field(default_factory=SASRecRun)
    data: data.DataConfig = field(default_factory=data.DataConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    eval: evaluate.EvalConfig = field(default_factory=evaluate.EvalConfig)


class Block(nn.Module):
    """One post-LayerNorm transformer block as RecBole writes it: attention (dropout on its weights), dropout,
    residual, LayerNorm; then Linear, GELU, Linear, dropout, residual, LayerNorm."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        d = cfg.hidden
        self.attn = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=LN_EPS), nn.LayerNorm(d, eps=LN_EPS)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.inner), nn.GELU(), nn.Linear(cfg.inner, d), nn.Dropout(cfg.dropout))

    def forward(self, h: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(h, h, h, attn_mask=future, need_weights=False)  # (B, L, d)
        h = self.norm1(h + self.drop(a))
        return self.norm2(h + self.ffn(h))


class SASRec(nn.Module):
    """Self-attentive sequential recommendation. A history sits left-aligned in a row of item ids padded with 0
    after it; the output at the last real position, dotted with the (shared) item embeddings, scores every item."""

    def __init__(self, cfg: SASRecConfig, n_items: int, max_len: int):
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"--sasrec.hidden {cfg.hidden} is not divisible by --sasrec.heads {cfg.heads}")
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)  # row 0 = pad, gets no gradient
        self.pos_emb = nn.Embedding(max_len, cfg.hidden)
        self.norm, self.drop = nn.LayerNorm(cfg.hidden, eps=LN_EPS), nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        for m in self.modules():  # RecBole's _init_weights
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.MultiheadAttention):  # its input projection is a bare Parameter, not a Linear
                nn.init.normal_(m.in_proj_weight, std=cfg.init_std)
                nn.init.zeros_(m.in_proj_bias)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """User vectors (B, d) for histories seq (B, L): left-aligned item ids, 0 = padding after the history."""
        L = seq.shape[1]
        lengths = (seq > 0).sum(1)  # (B,)
        if (lengths == 0).any():
            raise ValueError("an empty history has no position to predict from; every sample needs >= 1 item")
        h = self.drop(self.norm(self.item_emb(seq) + self.pos_emb.weight[:L]))  # (B, L, d)
        # True = may not attend: a position sees itself and the past only, so the padding after a history
        # never reaches its last real position
        future = torch.ones(L, L, dtype=torch.bool, device=seq.device).triu(1)  # (L, L)
        for block in self.blocks:
            h = block(h, future)
        return h[torch.arange(len(seq), device=seq.device), lengths - 1]  # (B, d)

    def scores(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, N+1) scores of every item; column 0, the pad item, is -inf: never predicted, never a candidate."""
        s = self.forward(seq) @ self.item_emb.weight.T  # (B, N+1)
        return s.masked_fill(torch.arange(s.shape[1], device=s.device) == 0, -math.inf)

    def loss(self, seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the target (B,) over all items (RecBole loss_type CE)."""
        return F.cross_entropy(self.scores(seq), target)


def sequences(samples: list[dict], max_len: int) -> torch.Tensor:
    """(S, max_len) long: each sample's newest max_len history items, oldest first, then 0s."""
    seq = torch.zeros(len(samples), max_len, dtype=torch.long)
    for i, s in enumerate(samples):
        h = s["history"][-max_len:]
        seq[i, :len(h)] = torch.tensor(h, dtype=torch.long)
    return seq


def evaluate_sasrec(model: SASRec, samples: list[dict], max_len: int, cfg: evaluate.EvalConfig) -> dict:
    """The Rechead's evaluation, unchanged: evaluate's full ranking over all items and its metrics."""
    model.eval()
    return evaluate.evaluate(lambda part: model.scores(sequences(part, max_len).to(DEVICE)), samples, cfg)


class Stop(run.Preemption):
    """The train script's preemption, said as SASRec does it: no checkpoint, a stop after the batch in flight."""

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this batch (send it again to stop at once)")


def train_sasrec(cfg: SASRecConfig, splits: dict, n_items: int, max_len: int, eval_cfg, seed: int, log, out=None):
    """Train on every train sample; keep the epoch with the best valid NDCG@10 (patience epochs without a better
    one stop it). Returns (the best model, its epoch). The best weights are saved to out/sasrec.pt as they come.
    SIGTERM or Ctrl-C stops it after the batch in flight (a second one at once), saying what out/sasrec.pt kept."""
    seeds.seed_all(seed)
    model = SASRec(cfg, n_items, max_len).to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    seq, target = sequences(splits["train"], max_len), torch.tensor([s["target"] for s in splits["train"]])
    best, best_epoch, best_state, bad, epoch = -1.0, -1, None, 0, 0

    def kept():
        if best_epoch < 0:
            return "no epoch had finished, so nothing was kept"
        where = f"{out}/sasrec.pt holds" if out else "nothing is on disk (no run folder); it was"
        return f"{where} the best epoch so far, {best_epoch} (valid NDCG@10 {best:.4f})"

    def stopped(signum):
        print(f"stopped by {signal.Signals(signum).name} in epoch {epoch}; {kept()}. No metrics.json was written: "
              "a stopped run is no result; rerun the same command to train it again", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    stopper = Stop()
    try:
        with stopper as stop:  # SIGTERM or Ctrl-C: stop after this batch; a second one at once
            for epoch in range(cfg.epochs):
                model.train()
                t0, total, perm = time.time(), 0.0, torch.randperm(len(target), generator=gen)
                for b in progress(range(0, len(perm), cfg.batch_size), desc=f"sasrec epoch {epoch}", leave=False):
                    idx = perm[b:b + cfg.batch_size]
                    loss = model.loss(seq[idx].to(DEVICE), target[idx].to(DEVICE))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                    if stop.requested():
                        stopped(stop.signum)
                epoch_s = time.time() - t0
                if not math.isfinite(total):
                    fail(f"the SASRec loss is {total / len(target)} in epoch {epoch}; lower --sasrec.lr or "
                         f"--sasrec.init_std. {kept()}")
                try:
                    m = evaluate_sasrec(model, splits["valid"], max_len, eval_cfg)
                except FloatingPointError as e:  # a NaN score: the weights broke in this epoch's last steps
                    fail(f"SASRec's valid scores after epoch {epoch} are not finite ({e}); lower --sasrec.lr or "
                         f"--sasrec.init_std. {kept()}")
                log({"method": "sasrec", "epoch": epoch, "loss": total / len(target), "valid_hr@10": m["hr@10"],
                     "valid_ndcg@10": m["ndcg@10"], "epoch_s": round(epoch_s, 2)})
                if m["ndcg@10"] > best:
                    best, best_epoch, bad, best_state = m["ndcg@10"], epoch, 0, copy.deepcopy(model.state_dict())
                    if out:
                        files.save_torch(os.path.join(out, "sasrec.pt"), {"state": best_state, "epoch": epoch})
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        break
    except KeyboardInterrupt:  # a second signal, or Ctrl-C before the handlers were set
        stopped(stopper.signum or signal.SIGINT)
    model.load_state_dict(best_state)
    return model, best_epoch


def check_sasrec(cli: SASRecCli):
    """Every check before any work or write, naming the flag: each field's allowed values (its setting()), each
    section's own check(), and the heads that must divide the width."""
    if errors := flags_lib.problems(cli, bare="run"):
        fail(errors[0])
    if cli.sasrec.hidden % cli.sasrec.heads:
        fail(f"--sasrec.hidden {cli.sasrec.hidden} is not divisible by --sasrec.heads {cli.sasrec.heads}")


def sasrec_main(argv):
    cli = SASRecCli()
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\nFlags of `sasrec` (--section.field VALUE; run fields also bare):")
        print(flags_lib.help_text(cli))
        return None
    given = flags_lib.parse_flags(cli, argv)
    flags_lib.apply(cli, given)
    if "data.dataset" in given and given["data.dataset"] != cli.run.dataset:
        fail(f"--data.dataset {given['data.dataset']} contradicts --dataset {cli.run.dataset}; drop --data.dataset")
    cli.data.dataset = cli.run.dataset
    check_sasrec(cli)
    out = cli.run.out = cli.run.out or f"runs/sasrec-{cli.run.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cpath = os.path.join(out, "config.json")
    if os.path.exists(cpath) and "sasrec" not in files.load_json(cpath, "pass a new --out"):
        fail(f"{out} holds another kind of run (its config.json has no sasrec section); pass a new --out")
    config.refuse_other_config(out, cli, {"eval.chunk", "run.threads"})
    processes.set_threads(cli.run.threads)
    try:
        ds = data.load_dataset(cli.data)
    except (ValueError, OSError) as e:
        fail(str(e))
    files.lock_run(out)  # one run per folder: a second stops here, naming this one
    try:
        return train_and_report(cli, ds, out)
    finally:
        files.unlock_run(out)


def train_and_report(cli: SASRecCli, ds, out: str) -> dict:
    """The sasrec command's work in its locked run folder: config.json, the training, metrics.json."""
    config.refuse_other_config(out, cli, {"eval.chunk", "run.threads"})  # again, now the folder is ours
    files.save_json(os.path.join(out, "config.json"), dataclasses.asdict(cli))
    for name in ("log.jsonl", "sasrec.pt", "metrics.json"):  # a rerun starts afresh: what the folder holds is
        if os.path.exists(path := os.path.join(out, name)):  # this run's, and metrics.json only when it finished
            os.remove(path)
    print(f"sasrec on {ds.name}: {ds.n_items} items, " + ", ".join(f"{len(v)} {k}" for k, v in ds.splits.items()))
    t0 = time.time()
    model, epoch = train_sasrec(cli.sasrec, ds.splits, ds.n_items, cli.data.window, cli.eval, cli.run.seed,
                                run.Logger(out), out)
    metrics = {"sasrec": {k: evaluate_sasrec(model, ds.splits[k], cli.data.window, cli.eval)
                          for k in ("valid", "test")}}
    metrics["sasrec"]["epoch"] = epoch
    files.save_json(os.path.join(out, "metrics.json"), metrics)
    report.print_metrics(metrics)
    print(f"sasrec done after {time.time() - t0:.0f} s; best valid epoch {epoch}\nrun folder: {out}")
    return metrics


# ----------------------------------------------------------------------------- seeds and significance
METHODS = ("sasrec", "stage2", "stage1")  # the default method key of a folder: the first of these it holds


def read_runs(folders: list[str], key: str | None, split: str) -> tuple[str, list[dict]]:
    """(the method key, [the split's metrics of each folder]) from the folders' metrics.json. A group is one method
    over seeds, each counted once: a seed twice (config.json's --seed, and the toy data's --data.seed) or two
    runs with the same metrics to the last digit (a copy, or a method with no seed in it, such as a floor) are
    refused, as they would count one result as several."""
    if len(set(map(os.path.abspath, folders))) != len(folders):
        fail(f"a run folder is named twice in {' '.join(folders)}; each seed counts once")
    runs, keys, seen = [], set(), {}
    for folder in folders:
        path = os.path.join(folder, "metrics.json")
        if not os.path.isfile(path):
            fail(f"{path} not found; pass finished run folders (rporec.py or baselines.py sasrec)")
        m = files.load_json(path, "rerun that run, or leave the folder out")
        k = key or next((k for k in METHODS if k in m), None)
        if k not in m or not isinstance(m[k], dict) or not isinstance(m[k].get(split), dict):
            have = ", ".join(f"{k}.{s}" for k, v in m.items() if isinstance(v, dict)
                             for s in v if isinstance(v[s], dict))
            fail(f"{path} has no {k or 'method'}.{split} (it has {have}); pick a method with --a-key/--b-key")
        seed = run_seed(folder)
        if seed in seen:
            fail(f"{seen[seed]} and {folder} are runs of the same seed ({seed}); a group is one method over seeds, "
                 "each seed once: leave one out")
        seen[seed] = folder
        keys.add(k)
        runs.append(m[k][split])
    if len(keys) > 1:
        fail(f"the folders {' '.join(folders)} hold different methods ({', '.join(sorted(keys))}); "
             "name one with --a-key/--b-key")
    method = keys.pop()
    for i, r in enumerate(runs):
        if (j := next((j for j in range(i) if runs[j] == r), None)) is not None:
            fail(f"{folders[j]} and {folders[i]} have the same {method} {split} metrics to the last digit: one "
                 "run counted twice, or a method with no seed in it (a floor such as transition or popularity), "
                 "whose runs are one result; leave one out")
    return method, runs


def run_seed(folder: str) -> str:
    """A run's seed as config.json says it (rporec.py and baselines.py sasrec alike): --seed, and for the toy data
    its --data.seed too, which draws another data set."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        fail(f"{path} not found; compare reads each run's seed from it: pass whole run folders")
    cfg = files.load_json(path, "copy the run folder again, whole")
    run_cfg, data_cfg = (cfg.get(s) if isinstance(cfg, dict) else None for s in ("run", "data"))
    if not isinstance(run_cfg, dict) or "seed" not in run_cfg or not isinstance(data_cfg, dict):
        fail(f"{path} holds no run.seed; pass run folders of rporec.py or baselines.py sasrec")
    toy = data_cfg.get("dataset") == "toy"
    return f"--seed {run_cfg['seed']}" + (f" --data.seed {data_cfg.get('seed')}" if toy else "")


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test; None where both groups have no spread (the test is undefined)."""
    from scipy import stats  # here: only compare needs scipy
    if max(a) == min(a) and max(b) == min(b):
        return None
    with warnings.catch_warnings():  # scipy warns of "catastrophic cancellation" for a group with no spread,
        warnings.simplefilter("ignore", RuntimeWarning)  # e.g. a deterministic floor; its variance 0 is exact
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1 in the denominator, as the t-test uses)."""
    n, mean = len(values), sum(values) / len(values)
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)), "values": values}


def compare(a_dirs, b_dirs, a_key=None, b_key=None, split="test", names=None) -> dict:
    """Each metric's mean and std over group A's and group B's runs, and the two-sided Welch t-test p-value."""
    if len(a_dirs) < 2 or len(b_dirs) < 2:
        fail(f"compare needs at least 2 runs per group for a standard deviation and a t-test "
             f"(got {len(a_dirs)} and {len(b_dirs)}); run more seeds")
    a_key, a = read_runs(a_dirs, a_key, split)
    b_key, b = read_runs(b_dirs, b_key, split)
    counts = {r.get("n") for r in a + b}
    if len(counts) > 1:
        fail(f"the runs scored different {split} sets (sample counts {sorted(counts, key=str)}); compare runs of "
             "the same data, split and --limit")
    shared = [k for k in a[0] if k not in ("n", "parse_rate") and all(k in r for r in a + b)]
    names = names or shared
    if missing := [k for k in names if k not in shared]:
        fail(f"metric(s) {', '.join(missing)} are not in every run; choose from {', '.join(shared)}")
    out = {"split": split, "n": counts.pop(), "test": "two-sided Welch t-test, scipy.stats.ttest_ind(equal_var=False)",
           "a": {"key": a_key, "runs": list(a_dirs)}, "b": {"key": b_key, "runs": list(b_dirs)}, "metrics": {}}
    for k in names:
        for dirs, runs in ((a_dirs, a), (b_dirs, b)):
            for folder, r in zip(dirs, runs):
                if isinstance(r[k], bool) or not isinstance(r[k], (int, float)) or not math.isfinite(r[k]):
                    fail(f"{folder}/metrics.json has {split} {k} = {json.dumps(r[k])}, not a finite number: that run "
                         "failed or the file is damaged; rerun it, or leave it out")
        va, vb = [float(r[k]) for r in a], [float(r[k]) for r in b]
        out["metrics"][k] = {"a": mean_std(va), "b": mean_std(vb), "p": welch(va, vb)}
    return out


def print_compare(res: dict):
    a, b = res["a"], res["b"]
    print(f"{res['split']} ({res['n']} samples): A = {a['key']} over {len(a['runs'])} runs, "
          f"B = {b['key']} over {len(b['runs'])} runs; {res['test']}")
    print(f"{'metric':<9} {'A mean ± std':>17} {'B mean ± std':>17} {'A - B':>8} {'p':>8}")
    for k, m in res["metrics"].items():
        p = "n/a" if m["p"] is None else f"{m['p']:.3g}"
        print(f"{k:<9} {m['a']['mean']:>8.4f} ± {m['a']['std']:.4f} {m['b']['mean']:>8.4f} ± {m['b']['std']:.4f} "
              f"{m['a']['mean'] - m['b']['mean']:>+8.4f} {p:>8}")


def compare_main(argv):
    p = argparse.ArgumentParser(prog="python -m tools.baselines compare",
                                description="Mean ± std of each metric over two groups of run folders (e.g. seeds) "
                                            "and the two-sided Welch t-test between them.")
    p.add_argument("--a", nargs="+", required=True, help="run folders of method A (rporec.py or baselines.py sasrec)")
    p.add_argument("--b", nargs="+", required=True, help="run folders of method B")
    p.add_argument("--a-key", help=f"method in A's metrics.json: stage1, stage2, sasrec, transition, popularity; "
                                   f"default the first of {', '.join(METHODS)} present")
    p.add_argument("--b-key", help="the same for B")
    p.add_argument("--split", default="test", help="split to compare: test (default) or valid")
    p.add_argument("--metrics", help="comma-separated metric keys (default: every metric the runs share)")
    p.add_argument("--out", default="compare.json", help="where the JSON goes (default compare.json)")
    args = p.parse_args(argv)
    if problem := files.check_out_file("--out", args.out):
        fail(problem)
    res = compare(args.a, args.b, args.a_key, args.b_key, args.split, args.metrics and args.metrics.split(","))
    print_compare(res)
    files.save_json(args.out, res)
    print(f"written: {args.out}")
    return res


def main(argv):
    commands = {"sasrec": sasrec_main, "compare": compare_main}
    if not argv or argv[0] not in commands:
        fail(f"name a command first: {' | '.join(commands)} (python -m tools.baselines sasrec --help)")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    errors.run_main(main, sys.argv[1:])
