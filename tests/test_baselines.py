"""SASRec on a tiny split and the seed comparison with its t-test (baselines.py)."""
import json
import math
import os

import pytest
import torch

import evaluate
from tools import baselines
from tools.baselines import SASRec, SASRecConfig


def tiny_splits(n_items=12, users=30, length=8, seed=0):
    """Users walking item ids upwards (i -> i+1, wrapping): a pattern SASRec can learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for u in range(users):
        start = int(torch.randint(1, n_items + 1, (1,), generator=g))
        seq = [(start + j - 1) % n_items + 1 for j in range(length)]
        samples += [{"user": str(u), "history": seq[max(0, i - 5):i], "target": seq[i], "time": u * 100 + i}
                    for i in range(1, length)]
    return {"train": samples[:150], "valid": samples[150:180], "test": samples[180:]}


def small_cfg(**kw):
    return SASRecConfig(**{"hidden": 16, "heads": 2, "inner": 32, "dropout": 0.0, **kw})


def test_shapes_and_padding_never_predicted():
    torch.manual_seed(0)
    model = SASRec(small_cfg(), n_items=12, max_len=5).eval()
    seq = baselines.sequences([{"history": [3, 4]}, {"history": [1, 2, 3, 4, 5, 6, 7]}], max_len=5)
    assert seq.tolist() == [[3, 4, 0, 0, 0], [3, 4, 5, 6, 7]]  # left-aligned, newest 5 kept, pad after
    assert model(seq).shape == (2, 16)
    s = model.scores(seq)
    assert s.shape == (2, 13) and torch.isneginf(s[:, 0]).all() and torch.isfinite(s[:, 1:]).all()
    # the padding after a history changes nothing: the same history without padding scores the same
    assert torch.allclose(model.scores(seq[:1, :2]), s[:1], atol=1e-5)
    with pytest.raises(ValueError, match="empty history"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_a_few_steps_lower_the_loss_and_pad_gets_no_gradient():
    torch.manual_seed(0)
    splits = tiny_splits()
    model = SASRec(small_cfg(), n_items=12, max_len=5)
    seq = baselines.sequences(splits["train"], 5)
    target = torch.tensor([s["target"] for s in splits["train"]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.loss(seq, target)
        opt.zero_grad()
        loss.backward()
        assert model.item_emb.weight.grad[0].abs().max() == 0  # the pad row never learns
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(12) - 0.5 and losses[-1] < 0.5 * losses[0]
    assert model.eval().scores(seq).argmax(1).min() >= 1  # the pad item is never the prediction


def test_evaluation_is_the_shared_full_ranking(monkeypatch):
    torch.manual_seed(0)
    splits = tiny_splits()
    model = SASRec(small_cfg(), n_items=12, max_len=5).eval()
    calls = []
    real = evaluate.full_ranking
    monkeypatch.setattr(evaluate, "full_ranking", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = baselines.evaluate_sasrec(model, splits["test"], 5, evaluate.EvalConfig(chunk=7))
    assert calls  # through evaluate's code, not a copy
    with torch.no_grad():
        s = model.scores(baselines.sequences(splits["test"], 5))
    by_hand = [1 + sum(s[i, j] > s[i, t["target"]] for j in range(1, 13)) for i, t in enumerate(splits["test"])]
    assert m == evaluate.metrics(torch.tensor(by_hand), (5, 10, 20))


def test_training_keeps_the_best_valid_epoch_and_beats_chance(tmp_path):
    splits = tiny_splits()
    logs = []
    cfg = small_cfg(epochs=12, patience=3, lr=1e-2, batch_size=32)
    model, epoch = baselines.train_sasrec(cfg, splits, 12, 5, evaluate.EvalConfig(), 0, logs.append, str(tmp_path))
    best = max(r["valid_ndcg@10"] for r in logs)
    assert logs[epoch]["valid_ndcg@10"] == best and os.path.isfile(tmp_path / "sasrec.pt")
    m = baselines.evaluate_sasrec(model, splits["valid"], 5, evaluate.EvalConfig())
    assert m["ndcg@10"] == best and m["hr@5"] > 0.8  # the i -> i+1 walk is learnt; chance HR@5 is 5/12


def test_sasrec_command_writes_a_runs_metric_keys(tmp_path):
    out = tmp_path / "run"
    argv = ["sasrec", "--data.data_dir", str(tmp_path / "data"), "--out", str(out), "--sasrec.epochs", "2",
            "--sasrec.hidden", "16", "--seed", "3"]
    m = baselines.main(argv)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m)) and set(saved) == {"sasrec"}
    keys = list(evaluate.metrics(torch.tensor([1, 2]), evaluate.EvalConfig().ks))
    assert list(saved["sasrec"]["valid"]) == keys and list(saved["sasrec"]["test"]) == keys
    assert saved["sasrec"]["epoch"] in (0, 1)
    assert json.loads((out / "config.json").read_text())["run"]["seed"] == 3
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("argv, message", [
    (["sasrec", "--sasrec.heads", "3"], "not divisible"),
    (["sasrec", "--sasrec.dropout", "1"], "dropout"),
    (["sasrec", "--eval.ks", "5,20"], "10 among them"),
    (["sasrec", "--dataset", "custom"], "needs both tables"),
    (["sasrec", "--data.dataset", "cds"], "contradicts"),
    (["sasrec", "--sasrec.nope", "1"], "unknown flag"),
    (["train"], "name a command"),
])
def test_bad_flags_stop_with_one_error_line(argv, message):
    with pytest.raises(SystemExit) as e:
        baselines.main(argv)
    assert str(e.value).startswith("error:") and message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- compare and the t-test
def test_welch_p_values_match_closed_forms():
    # n = 2 and 2 with equal variances: Welch's df = 2, where the t CDF is 1/2 + t / (2 sqrt(2 + t^2)),
    # so the two-sided p is 1 - |t| / sqrt(2 + t^2). a = [0, 2], b = [3, 5]: t = -3 / sqrt(2)
    t = 3 / math.sqrt(2)
    assert baselines.welch([0, 2], [3, 5]) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    # b has no spread: df = n_a - 1 = 1, the Cauchy distribution, p = 1 - (2 / pi) atan(|t|); here t = -2.
    # A pooled (Student) t-test would give another value: its df is 3
    assert baselines.welch([0, 2], [3, 3, 3]) == pytest.approx(1 - 2 / math.pi * math.atan(2), rel=1e-9)
    assert baselines.welch([1, 1], [2, 2]) is None  # no spread anywhere: undefined, not p = 0
    ms = baselines.mean_std([0.0, 2.0, 4.0])
    assert ms["mean"] == 2.0 and ms["std"] == 2.0


def fake_run(folder, metrics, seed=0):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    return str(folder)


def split_metrics(hr, ndcg, n=100):
    return {"hr@10": hr, "ndcg@10": ndcg, "n": n}


def test_compare_reads_rporec_and_sasrec_folders(tmp_path, capsys):
    a = [fake_run(tmp_path / f"rh{i}", {"stage1": {"valid": split_metrics(0.5, 0.2), "test": split_metrics(v, v / 2)},
                                        "transition": {"test": split_metrics(0.4, 0.3)}})
         for i, v in enumerate((0.0, 0.2))]
    b = [fake_run(tmp_path / f"sas{i}", {"sasrec": {"valid": split_metrics(0.5, 0.2), "test": split_metrics(v, v / 2),
                                                    "epoch": 3}}) for i, v in enumerate((0.3, 0.5))]
    out = tmp_path / "cmp.json"
    res = baselines.main(["compare", "--a", *a, "--b", *b, "--out", str(out)])
    assert res["a"]["key"] == "stage1" and res["b"]["key"] == "sasrec" and res["n"] == 100
    hr = res["metrics"]["hr@10"]
    assert hr["a"]["mean"] == pytest.approx(0.1) and hr["b"]["mean"] == pytest.approx(0.4)
    t = 0.3 / math.sqrt(0.02 / 2 + 0.02 / 2)  # equal variances, n = 2 each: df = 2 (closed form above)
    assert hr["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert "hr@10" in capsys.readouterr().out
    # another method of the same folders, on another split
    res = baselines.main(["compare", "--a", *a, "--b", *b, "--a-key", "transition", "--metrics", "ndcg@10",
                          "--out", str(out)])
    assert list(res["metrics"]) == ["ndcg@10"] and res["metrics"]["ndcg@10"]["a"]["std"] == 0


@pytest.mark.parametrize("case, message", [
    ("one run", "at least 2 runs"),
    ("twice", "named twice"),
    ("no key", "has no stage2.test"),
    ("other n", "different test sets"),
    ("missing metrics", "not found"),
    ("mixed", "different methods"),
])
def test_compare_refuses_what_it_cannot_compare(tmp_path, case, message):
    run = {"stage1": {"test": split_metrics(0.1, 0.05)}}
    a = [fake_run(tmp_path / f"a{i}", run) for i in range(2)]
    b = [fake_run(tmp_path / f"b{i}", {"sasrec": {"test": split_metrics(0.1 * i, 0.05)}}) for i in range(2)]
    args = {"one run": (a[:1], b, {}), "twice": (a + a[:1], b, {}), "no key": (a, b, {"a_key": "stage2"}),
            "other n": (a, [b[0], fake_run(tmp_path / "b9", {"sasrec": {"test": split_metrics(0.1, 0.05, 99)}})], {}),
            "missing metrics": (a, [b[0], str(tmp_path / "nowhere")], {}),
            "mixed": ([a[0], b[0]], b, {})}[case]
    with pytest.raises(SystemExit) as e:
        baselines.compare(args[0], args[1], **args[2])
    assert str(e.value).startswith("error:") and message in str(e.value)


def test_sasrec_refuses_a_folder_of_another_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"run": {"dataset": "toy"}, "rechead": {}}))
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="another kind of run"):
        baselines.main(["sasrec", "--out", str(tmp_path)])
    assert (tmp_path / "metrics.json").read_text() == "{}"
