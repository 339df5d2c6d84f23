"""Full-ranking evaluation (paper §3.1) and the popularity and transition baselines.

Every real item (ids 1..N) is a candidate; column 0 of a score matrix is the pad item and never
counts. rank = 1 + number of real items scoring strictly higher than the target, so ties favour the
target. HR@K = 1{rank <= K}; NDCG@K = 1 / log2(rank + 1) if rank <= K else 0; both averaged over
samples. History items stay candidates by default (the paper's protocol); `mask_history` removes
them. Functions are pure over a list of samples so a caller can shard samples across processes and
concatenate the per-sample ranks before calling `metrics`.
"""
import math
from dataclasses import dataclass

import torch

from plumbing.flags import Own, Range, setting


@dataclass
class EvalConfig:
    ks: tuple[int, ...] = setting((5, 10, 20), Own("cut-offs >= 1, 10 among them"))  # cut-offs K
    # for HR@K and NDCG@K
    chunk: int = setting(1024, Range(1), rerun=True)  # samples scored at once: a (chunk, N+1) score
    # matrix must fit in memory
    mask_history: bool = setting(False)  # True = history items (except the target) can't be ranked;
    # paper: False

    def check(self):
        if 10 not in self.ks or min(self.ks) < 1:
            raise ValueError(f"--eval.ks {self.ks} must be cut-offs >= 1, 10 among them: model "
                             "selection uses valid NDCG@10")


def strict_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The rank rule of full ranking and of r_ndcg alike: 1 + the number of candidates scores (B, M)
    scoring strictly higher than target (B, 1), so ties favour the target. (B,) long."""
    return 1 + (scores > target).sum(dim=1)


def ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank (B,) of each target among items 1..N of scores (B, N+1); pad column 0 is
    ignored."""
    n = scores.shape[1] - 1
    targets = targets.to(scores.device).long()
    if targets.numel() and (targets.min() < 1 or targets.max() > n):
        raise ValueError(f"targets must be item ids in 1..{n} (0 is the pad item); got "
                         f"{targets.tolist()}")
    t = scores.gather(1, targets[:, None])  # (B, 1)
    if torch.isnan(t).any():
        raise FloatingPointError("a target scored NaN, its rank is undefined; check the model's scores "
                         "for NaN")
    return strict_rank(scores[:, 1:], t)


def metrics(ranks: torch.Tensor, ks=(5, 10, 20)) -> dict:
    """{"hr@K", "ndcg@K"} for each K as python floats, plus "n" (the sample count)."""
    if ranks.numel() == 0:
        raise ValueError("no ranks to average; the evaluated split is empty")
    r = ranks.double()
    out = {}
    for k in ks:
        hit = r <= k
        out[f"hr@{k}"] = hit.double().mean().item()
        gain = torch.where(hit, 1.0 / torch.log2(r + 1), torch.zeros_like(r))  # (S,)
        out[f"ndcg@{k}"] = gain.mean().item()
    out["n"] = ranks.numel()
    return out


def mask_history_scores(scores: torch.Tensor, samples: list[dict]) -> torch.Tensor:
    """A copy of scores with each sample's history items at -inf; the target keeps its score even
    when it repeats a history item, otherwise a re-purchase could never be ranked."""
    rows = [i for i, s in enumerate(samples) for h in s["history"] if h != s["target"]]
    cols = [h for s in samples for h in s["history"] if h != s["target"]]
    scores = scores.clone()
    scores[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = -math.inf
    return scores


def full_ranking(score_fn, samples: list[dict], chunk: int = 1024, mask_history: bool = False
                 ) -> torch.Tensor:
    """Ranks (len(samples),) long on CPU; score_fn(list of samples) -> (b, N+1) scores, called per
    chunk."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}; use a positive number of samples per chunk")
    out = []
    for i in range(0, len(samples), chunk):
        part = samples[i:i + chunk]
        with torch.no_grad():
            s = score_fn(part)  # (b, N+1)
        if s.shape[0] != len(part):
            raise ValueError(f"score_fn returned {s.shape[0]} rows for {len(part)} samples; return "
                             "one row each")
        if mask_history:
            s = mask_history_scores(s, part)
        out.append(ranks(s, torch.tensor([x["target"] for x in part])).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def evaluate(score_fn, samples: list[dict], cfg: EvalConfig) -> dict:
    """metrics of full_ranking with the config's chunk, masking and cut-offs."""
    return metrics(full_ranking(score_fn, samples, cfg.chunk, cfg.mask_history), cfg.ks)


def average_metrics(results: list[dict]) -> dict:
    """Mean of several metric dicts, e.g. the official protocol's 4 sampled CoTs per valid sample.
    """
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def _train_targets(train_samples: list[dict], n_items: int) -> torch.Tensor:
    """(S,) long: the train targets, checked to be item ids."""
    targets = torch.tensor([s["target"] for s in train_samples], dtype=torch.long)
    if targets.numel() and (targets.min() < 1 or targets.max() > n_items):
        raise ValueError(f"train targets must be item ids in 1..{n_items}; check n_items matches "
                         "the dataset")
    return targets


def target_counts(train_samples: list[dict], n_items: int) -> torch.Tensor:
    """(N+1,) long: how often each item is a train target (pad column 0 stays 0)."""
    return torch.bincount(_train_targets(train_samples, n_items), minlength=n_items + 1)  # (N+1,)


def popularity_scores(train_samples: list[dict], n_items: int) -> torch.Tensor:
    """(N+1,) float64: how often each item is a train target, pad = -inf.

    Ties are broken by subtracting id / (N+1) (< 1, so counts never reorder; smaller id wins).
    Without it every tied item would share the target's rank under the strict-higher rule, inflating
    the baseline. float64 keeps the fraction exact enough for any realistic count."""
    counts = target_counts(train_samples, n_items).double()  # (N+1,)
    scores = counts - torch.arange(n_items + 1, dtype=torch.float64) / (n_items + 1)
    scores[0] = -math.inf
    return scores


def popularity_metrics(train_samples: list[dict], samples: list[dict], n_items: int,
                       cfg: EvalConfig) -> dict:
    """The popularity baseline on a split: every user gets the train-popularity ranking."""
    pop = popularity_scores(train_samples, n_items)
    return evaluate(lambda part: pop.expand(len(part), -1), samples, cfg)


def _last_items(samples: list[dict], n_items: int, what: str) -> torch.Tensor:
    """(S,) long: each sample's last (most recent) history item, 0 for an empty history."""
    last = torch.tensor([s["history"][-1] if s["history"] else 0 for s in samples],
                        dtype=torch.long)  # (S,)
    if last.numel() and (last.min() < 0 or last.max() > n_items):
        raise ValueError(f"{what} history items must be item ids in 1..{n_items}; check n_items "
                         "matches the dataset")
    return last


def transition_counts(train_samples: list[dict], n_items: int) -> torch.Tensor:
    """Sparse COO (N+1, N+1) long, coalesced: entry [a, b] = number of train samples whose last
    history item is a and whose target is b (first-order Markov counts). Samples with an empty
    history add nothing; row 0 stays empty. Sparse because a dense (N+1)^2 matrix is ~1 GiB in
    float64 at N = 12k."""
    last = _last_items(train_samples, n_items, "train")
    target = _train_targets(train_samples, n_items)
    keep = last > 0
    pairs, counts = torch.unique(last[keep] * (n_items + 1) + target[keep],
                                 return_counts=True)  # (nnz,)
    index = torch.stack([pairs // (n_items + 1), pairs % (n_items + 1)])  # (2, nnz)
    return torch.sparse_coo_tensor(index, counts, (n_items + 1, n_items + 1),
                                   check_invariants=True).coalesce()


def transition_scores(trans: torch.Tensor, pop_counts: torch.Tensor, samples: list[dict]
                      ) -> torch.Tensor:
    """(b, N+1) float64 scores of the transition baseline for a chunk of samples; pad column 0 =
    -inf.

    The order is lexicographic in (transition count from the sample's last history item,
    train-target count, smaller id), built as one exact integer per item: score = t * BIG + (c *
    (N+1) - id),  BIG = (max c + 1) * (N+1). The popularity part c * (N+1) - id is popularity_scores
    times N+1 (same order, but an integer); it lies in [-N, max c * (N+1) - 1], a range narrower
    than BIG, so a one-count transition difference always outweighs any popularity difference. Every
    score is an integer below 2^53, hence exact in float64 and no tie is created or broken by
    rounding. A sample whose last item has no train transitions (or whose history is empty) gets t =
    0 everywhere: exactly the popularity order."""
    n = pop_counts.numel() - 1
    if trans.shape != (n + 1, n + 1):
        raise ValueError(f"transition counts {tuple(trans.shape)} don't match {n + 1} popularity "
                         "counts; build both from the same train split and n_items")
    big = (int(pop_counts.max()) + 1) * (n + 1)
    t_max = int(trans.values().max()) if trans.values().numel() else 0
    if (t_max + 1) * big >= 2 ** 53:
        raise ValueError(f"transition scores up to {(t_max + 1) * big} are not exact in float64 "
                         "(limit 2^53); the train split is too large for this baseline's integer "
                         "encoding")
    last = _last_items(samples, n, "evaluated")
    t = trans.index_select(0, last).to_dense().double()  # (b, N+1); row 0 (no history): zeros
    pop = pop_counts.double() * (n + 1) - torch.arange(n + 1, dtype=torch.float64)  # (N+1,)
    scores = t * big + pop
    scores[:, 0] = -math.inf
    return scores


def transition_metrics(train_samples: list[dict], samples: list[dict], n_items: int,
                       cfg: EvalConfig) -> dict:
    """The first-order transition (Markov) baseline on a split: items ranked by how often they
    followed the sample's last history item as a train target, ties by train popularity then smaller
    id."""
    trans = transition_counts(train_samples, n_items)
    pop_counts = target_counts(train_samples, n_items)
    return evaluate(lambda part: transition_scores(trans, pop_counts, part), samples, cfg)
