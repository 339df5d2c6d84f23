import math

import pytest
import torch

from evaluate import (
    EvalConfig,
    average_metrics,
    evaluate,
    full_ranking,
    metrics,
    popularity_metrics,
    popularity_scores,
    ranks,
    target_counts,
    transition_counts,
    transition_metrics,
    transition_scores,
)


def brute_rank(row: list[float], target: int) -> int:
    return 1 + sum(1 for j in range(1, len(row)) if row[j] > row[target])


def brute_metrics(rs: list[int], ks) -> dict:
    out = {}
    for k in ks:
        out[f"hr@{k}"] = sum(r <= k for r in rs) / len(rs)
        out[f"ndcg@{k}"] = sum(1 / math.log2(r + 1) if r <= k else 0.0 for r in rs) / len(rs)
    return out


def random_case(seed: int, b: int = 64, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (b, n + 1), generator=g).float()  # few values: many ties
    scores[::3, 0] = 100.0  # the pad column scores highest on some rows
    targets = torch.randint(1, n + 1, (b,), generator=g)
    return scores, targets


@pytest.mark.parametrize("seed", range(5))
def test_ranks_and_metrics_match_brute_force(seed):
    scores, targets = random_case(seed)
    r = ranks(scores, targets)
    expect = [brute_rank(row, t) for row, t in zip(scores.tolist(), targets.tolist())]
    assert r.dtype == torch.long and r.tolist() == expect
    m = metrics(r, ks=(1, 5, 10, 20))
    for k, v in brute_metrics(expect, (1, 5, 10, 20)).items():
        assert isinstance(m[k], float) and abs(m[k] - v) < 1e-12
    assert m["n"] == 64


def test_ranks_edge_cases():
    s = torch.tensor([[9.0, 1.0, 1.0, 1.0], [0.0, 3.0, 2.0, 1.0], [0.0, 3.0, 2.0, 1.0]])
    assert ranks(s, torch.tensor([2, 1, 3])).tolist() == [1, 1, 3]  # ties favour the target, pad ignored
    with pytest.raises(ValueError, match="pad"):
        ranks(s, torch.tensor([0, 1, 1]))
    with pytest.raises(FloatingPointError, match="NaN"):
        ranks(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([1]))


def test_metrics_keys_and_values():
    m = metrics(torch.tensor([1, 3, 10, 25]))
    assert list(m) == ["hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "n"]
    assert m["hr@5"] == 0.5 and m["hr@10"] == 0.75 and m["hr@20"] == 0.75
    assert abs(m["ndcg@5"] - (1 + 0.5) / 4) < 1e-12
    assert abs(m["ndcg@10"] - (1 + 0.5 + 1 / math.log2(11)) / 4) < 1e-12
    with pytest.raises(ValueError, match="empty"):
        metrics(torch.zeros(0, dtype=torch.long))


def samples_and_scorer(n_samples=23, n_items=30):
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, 4, (n_samples, n_items + 1), generator=g).float()  # (S, N+1)
    samples = [{"user": str(i), "history": torch.randint(1, n_items + 1, (3,), generator=g).tolist(),
                "target": int(torch.randint(1, n_items + 1, (1,), generator=g)), "time": i, "row": i}
               for i in range(n_samples)]
    return samples, lambda part: table[[s["row"] for s in part]], table


def test_full_ranking_chunking_is_invariant():
    samples, fn, table = samples_and_scorer()
    ref = full_ranking(fn, samples, chunk=1024)
    assert ref.tolist() == [brute_rank(table[i].tolist(), s["target"]) for i, s in enumerate(samples)]
    for chunk in (1, 2, 5, 22, 23):
        assert torch.equal(full_ranking(fn, samples, chunk=chunk), ref)
    for mask in (False, True):
        assert torch.equal(full_ranking(fn, samples, chunk=4, mask_history=mask),
                           full_ranking(fn, samples, chunk=100, mask_history=mask))
    assert evaluate(fn, samples, EvalConfig(chunk=7)) == metrics(ref)
    with pytest.raises(ValueError, match="one row each"):
        full_ranking(lambda part: table[:1], samples, chunk=3)


def test_history_masking():
    table = torch.tensor([[0.0, 5.0, 4.0, 3.0, 1.0, 0.0],
                          [0.0, 5.0, 4.0, 3.0, 1.0, 0.0]])
    samples = [{"history": [1, 2], "target": 4, "row": 0},
               {"history": [1, 3], "target": 3, "row": 1}]  # target repeats a history item
    fn = lambda part: table[[s["row"] for s in part]]  # noqa: E731
    assert full_ranking(fn, samples).tolist() == [4, 3]  # paper protocol: history stays
    assert full_ranking(fn, samples, mask_history=True).tolist() == [2, 2]  # 1,2 removed / 1 removed, 3 kept
    assert table[0, 1] == 5.0  # the caller's scores are untouched


def test_popularity_scores_and_baseline():
    train = [{"target": t} for t in [3, 3, 3, 1, 1, 4, 4, 5]]
    pop = popularity_scores(train, n_items=6)
    assert pop.shape == (7,) and pop[0] == -math.inf
    assert pop[1:].ceil().tolist() == [2, 0, 3, 2, 1, 0]  # counts (the id epsilon is in (0, 1))
    assert pop.argsort(descending=True).tolist()[:6] == [3, 1, 4, 5, 2, 6]  # ties: smaller id first
    test = [{"history": [], "target": t} for t in [3, 4, 6]]
    r = full_ranking(lambda part: pop.expand(len(part), -1), test)
    assert r.tolist() == [1, 3, 6]  # item 4 ties with 1 but ranks after it
    m = popularity_metrics(train, test, 6, EvalConfig(ks=(1, 5)))
    assert m == {"hr@1": 1 / 3, "ndcg@1": 1 / 3, "hr@5": 2 / 3, "ndcg@5": (1 + 0.5) / 3, "n": 3}
    with pytest.raises(ValueError, match="n_items"):
        popularity_scores([{"target": 9}], n_items=6)


def test_average_metrics():
    avg = average_metrics([{"hr@5": 0.2, "n": 4}, {"hr@5": 0.4, "n": 4}])
    assert abs(avg["hr@5"] - 0.3) < 1e-12 and avg["n"] == 4


def random_split(seed: int, n_items: int = 12, n_train: int = 150, n_test: int = 60):
    g = torch.Generator().manual_seed(seed)

    def sample(max_item):
        h = torch.randint(1, max_item + 1, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()
        return {"history": h, "target": int(torch.randint(1, n_items + 1, (1,), generator=g))}
    # train histories use items 1..N-3 only, so test samples ending in N-2..N fall back to popularity
    return [sample(n_items - 3) for _ in range(n_train)], [sample(n_items) for _ in range(n_test)]


def brute_transition_ranks(train, test, n_items, mask_history=False) -> list[int]:
    trans = {}
    for s in train:
        if s["history"]:
            trans[(s["history"][-1], s["target"])] = trans.get((s["history"][-1], s["target"]), 0) + 1
    pop = [sum(s["target"] == j for s in train) for j in range(n_items + 1)]
    out = []
    for s in test:
        last = s["history"][-1] if s["history"] else None
        key = {j: (trans.get((last, j), 0), pop[j], -j) for j in range(1, n_items + 1)
               if not (mask_history and j in s["history"] and j != s["target"])}
        order = sorted(key, key=key.get, reverse=True)  # keys are distinct (the id), so no tie is left
        out.append(order.index(s["target"]) + 1)
    return out


def test_transition_counts_by_hand():
    train = [{"history": [2, 1], "target": 3}, {"history": [5, 1], "target": 3}, {"history": [1], "target": 4},
             {"history": [], "target": 2}, {"history": [3], "target": 1}]
    dense = transition_counts(train, n_items=5).to_dense()
    assert dense.shape == (6, 6) and dense.sum() == 4  # the empty history adds nothing
    assert dense[1, 3] == 2 and dense[1, 4] == 1 and dense[3, 1] == 1
    assert target_counts(train, 5).tolist() == [0, 1, 1, 2, 1, 0]
    with pytest.raises(ValueError, match="n_items"):
        transition_counts([{"history": [7], "target": 1}], n_items=5)
    with pytest.raises(ValueError, match="n_items"):
        transition_counts([{"history": [1], "target": 6}], n_items=5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mask", [False, True])
def test_transition_matches_brute_force(seed, mask):
    train, test = random_split(seed)
    trans, pop = transition_counts(train, 12), target_counts(train, 12)
    r = full_ranking(lambda part: transition_scores(trans, pop, part), test, chunk=7, mask_history=mask)
    expect = brute_transition_ranks(train, test, 12, mask)
    assert r.tolist() == expect
    m = transition_metrics(train, test, 12, EvalConfig(ks=(1, 3, 5), chunk=7, mask_history=mask))
    for k, v in brute_metrics(expect, (1, 3, 5)).items():
        assert abs(m[k] - v) < 1e-12
    assert m["n"] == len(test)


def test_transition_fallback_is_popularity():
    train, test = random_split(0)
    unseen = [s for s in test if not s["history"] or s["history"][-1] > 9]  # never a train last item
    assert len(unseen) >= 5
    scores = transition_scores(transition_counts(train, 12), target_counts(train, 12), unseen)  # (b, 13)
    pop = popularity_scores(train, 12)
    assert torch.equal(scores.argsort(dim=1, descending=True), pop.expand(len(unseen), -1).argsort(descending=True))
    for mask in (False, True):
        cfg = EvalConfig(ks=(1, 5, 10), mask_history=mask)
        assert transition_metrics(train, unseen, 12, cfg) == popularity_metrics(train, unseen, 12, cfg)


def test_transition_order_and_history_mask_by_hand():
    # item 4 follows 1 twice, item 2 once; item 3 is the most popular target; items 5, 6 never occur
    train = [{"history": [1], "target": 4}, {"history": [1], "target": 4}, {"history": [1], "target": 2},
             {"history": [6], "target": 3}, {"history": [5], "target": 3}, {"history": [5], "target": 3}]
    trans, pop = transition_counts(train, 6), target_counts(train, 6)
    scores = transition_scores(trans, pop, [{"history": [1], "target": 3}])
    assert scores[0].argsort(descending=True).tolist()[:6] == [4, 2, 3, 1, 5, 6]  # counts, popularity, id
    assert scores[0, 0] == -math.inf
    test = [{"history": [4, 1], "target": 3}, {"history": [2, 1], "target": 2}]
    cfg = EvalConfig(ks=(1, 3))
    assert transition_metrics(train, test, 6, cfg) == {"hr@1": 0.0, "ndcg@1": 0.0, "hr@3": 1.0,
                                                       "ndcg@3": (0.5 + 1 / math.log2(3)) / 2, "n": 2}
    # masked: 4 drops out of the first sample (rank 3 -> 2); 2 is the second sample's target and stays
    m = transition_metrics(train, test, 6, EvalConfig(ks=(1, 3), mask_history=True))
    assert m["hr@1"] == 0.0 and m["ndcg@3"] == 1 / math.log2(3)
