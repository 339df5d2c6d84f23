"""SASRec on a tiny split and the seed comparison with its t-test (baselines.py)."""
import fcntl
import json
import math
import os
import re
import signal

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


def fake_run(folder, metrics, seed=None, dataset="ml-100k"):
    """A finished run folder: metrics.json, and config.json with its seed (by default one per folder name)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    seed = sum(map(ord, str(folder))) if seed is None else seed
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"run": {"seed": seed}, "data": {"dataset": dataset, "seed": 0}}, f)
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
    # another method of the same folders, one metric
    res = baselines.main(["compare", "--a", *a, "--b", *b, "--a-key", "stage1", "--b-key", "sasrec", "--metrics",
                          "ndcg@10", "--out", str(out)])
    assert list(res["metrics"]) == ["ndcg@10"] and res["metrics"]["ndcg@10"]["a"]["mean"] == pytest.approx(0.05)


@pytest.mark.parametrize("case, message", [
    ("one run", "at least 2 runs"),
    ("twice", "named twice"),
    ("no key", "has no stage2.test"),
    ("other n", "different test sets"),
    ("missing metrics", "not found"),
    ("mixed", "different methods"),
])
def test_compare_refuses_what_it_cannot_compare(tmp_path, case, message):
    a = [fake_run(tmp_path / f"a{i}", {"stage1": {"test": split_metrics(0.1 + 0.1 * i, 0.05)}}) for i in range(2)]
    b = [fake_run(tmp_path / f"b{i}", {"sasrec": {"test": split_metrics(0.1 * i, 0.05)}}) for i in range(2)]
    args = {"one run": (a[:1], b, {}), "twice": (a + a[:1], b, {}), "no key": (a, b, {"a_key": "stage2"}),
            "other n": (a, [b[0], fake_run(tmp_path / "b9", {"sasrec": {"test": split_metrics(0.1, 0.05, 99)}})], {}),
            "missing metrics": (a, [b[0], str(tmp_path / "nowhere")], {}),
            "mixed": ([a[0], b[0]], b, {})}[case]
    with pytest.raises(SystemExit) as e:
        baselines.compare(args[0], args[1], **args[2])
    assert str(e.value).startswith("error:") and message in str(e.value)


@pytest.mark.parametrize("case, message", [
    ("same seed", r"are runs of the same seed \(--seed 3\); a group is one method over seeds"),
    ("same toy seeds", r"same seed \(--seed 3 --data.seed 0\)"),
    ("a floor", r"have the same transition test metrics to the last digit: one run counted twice, or a method "
                r"with no seed in it"),
    ("a copy", r"have the same stage1 test metrics to the last digit"),
    ("nan", r"b1/metrics.json has test ndcg@10 = NaN, not a finite number: that run failed"),
    ("inf", r"a0/metrics.json has test hr@10 = Infinity, not a finite number"),
    ("text", r'has test hr@10 = "0.5", not a finite number'),
    ("no config", r"a1/config.json not found; compare reads each run's seed from it"),
])
def test_compare_counts_each_run_once_and_only_finite_metrics(tmp_path, case, message):
    """Two folders of one seed, or of a method that has no seed (a floor), are one result: counted twice they
    give a std of 0 and a small p. A NaN metric is a failed run, never `nan +- nan`."""
    def run(name, hr, ndcg, **kw):
        return fake_run(tmp_path / name, {"stage1": {"test": split_metrics(hr, ndcg)},
                                          "transition": {"test": split_metrics(0.4, 0.3)}}, **kw)
    a = [run("a0", 0.5, 0.25), run("a1", 0.6, 0.3)]
    b = [run("b0", 0.3, 0.15), run("b1", 0.35, 0.2)]
    kw = {}
    if case == "same seed":
        a = [run("a0", 0.5, 0.25, seed=3), run("a1", 0.6, 0.3, seed=3)]
    elif case == "same toy seeds":
        b = [run("b0", 0.3, 0.15, seed=3, dataset="toy"), run("b1", 0.35, 0.2, seed=3, dataset="toy")]
    elif case == "a floor":
        kw = {"a_key": "transition"}
    elif case == "a copy":
        b = [b[0], run("b9", 0.3, 0.15)]
    elif case in ("nan", "inf", "text"):
        folder, key = {"nan": (b[1], "ndcg@10"), "inf": (a[0], "hr@10"), "text": (a[1], "hr@10")}[case]
        m = json.loads(open(os.path.join(folder, "metrics.json")).read())
        m["stage1"]["test"][key] = {"nan": math.nan, "inf": math.inf, "text": "0.5"}[case]
        open(os.path.join(folder, "metrics.json"), "w").write(json.dumps(m))
    elif case == "no config":
        os.remove(os.path.join(a[1], "config.json"))
    with pytest.raises(SystemExit) as e:
        baselines.compare(a, b, **kw)
    assert str(e.value).startswith("error:") and "\n" not in str(e.value)
    assert re.search(message, str(e.value)), str(e.value)
    toy = [run("t0", 0.5, 0.25, seed=3, dataset="toy"), run("t1", 0.6, 0.3, seed=3, dataset="toy")]
    with open(os.path.join(toy[1], "config.json"), "w") as f:  # the toy drawn again: another data set
        json.dump({"run": {"seed": 3}, "data": {"dataset": "toy", "seed": 1}}, f)
    assert baselines.compare(toy, [run("b0", 0.3, 0.15), run("b1", 0.35, 0.2)])["a"]["runs"] == toy


@pytest.mark.parametrize("out, message", [
    ("nowhere/cmp.json", r"--out .*nowhere/cmp.json: the folder .*nowhere does not exist; create it"),
    ("a0/metrics.json/cmp.json", r"the folder .*a0/metrics.json is a file, not a folder"),
    ("a0", r"--out .*a0' is a folder; pass a file name"),
    ("", r"--out '' is empty"),
])
def test_compare_out_that_cannot_be_written_is_one_line_before_any_work(tmp_path, out, message, capsys):
    a = [fake_run(tmp_path / f"a{i}", {"stage1": {"test": split_metrics(0.1 * i, 0.05)}}) for i in range(2)]
    b = [fake_run(tmp_path / f"b{i}", {"stage1": {"test": split_metrics(0.2 * i, 0.05)}}) for i in range(2)]
    with pytest.raises(SystemExit) as e:
        baselines.main(["compare", "--a", *a, "--b", *b, "--out", str(tmp_path / out) if out else ""])
    assert str(e.value).startswith("error:") and "\n" not in str(e.value) and re.search(message, str(e.value))
    assert "hr@10" not in capsys.readouterr().out  # refused before the table


@pytest.mark.parametrize("flag", ["--sasrec.lr", "--sasrec.init_std"])
@pytest.mark.parametrize("value", ["nan", "inf", "1e30", "0", "-1"])
def test_sasrec_lr_and_init_std_out_of_range_are_refused(tmp_path, flag, value):
    with pytest.raises(SystemExit) as e:
        baselines.main(["sasrec", "--out", str(tmp_path / "run"), flag, value])
    assert str(e.value) == f"error: {flag} must be a finite number in (0, 1], got {float(value)!r}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("broken", ["loss", "scores"])
def test_a_non_finite_sasrec_is_one_line_naming_what_it_kept(tmp_path, monkeypatch, broken):
    """Weights that break (a loss or a valid score that is NaN) stop with one line, not evaluate's traceback."""
    splits, logs = tiny_splits(), []
    cfg = small_cfg(epochs=6, patience=6, lr=1e-2, batch_size=32)
    real = baselines.SASRec.scores
    if broken == "loss":
        monkeypatch.setattr(baselines.SASRec, "loss", lambda self, seq, t: real(self, seq)[:, 1:].sum() * math.nan
                            if len(logs) == 2 else torch.nn.functional.cross_entropy(real(self, seq), t))
    else:
        monkeypatch.setattr(baselines.SASRec, "scores", lambda self, seq: real(self, seq) * (math.nan if
                            len(logs) == 2 and not self.training else 1))
    with pytest.raises(SystemExit) as e:
        baselines.train_sasrec(cfg, splits, 12, 5, evaluate.EvalConfig(), 0, logs.append, str(tmp_path))
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert ("loss is nan in epoch 2" if broken == "loss" else "valid scores after epoch 2 are not finite") in msg
    assert "lower --sasrec.lr" in msg and re.search(r"sasrec.pt holds the best epoch so far, [01] \(valid", msg)
    assert torch.load(tmp_path / "sasrec.pt", weights_only=True)["epoch"] in (0, 1)


def test_sigterm_stops_sasrec_saying_what_it_kept(tmp_path, capsys):
    """SIGTERM (a scheduler's notice) stops after the batch in flight, as the train script's preemption does,
    and says what sasrec.pt holds; before any finished epoch it says that nothing was kept."""
    splits, logs = tiny_splits(), []

    def log(rec):
        logs.append(rec)
        if len(logs) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    cfg = small_cfg(epochs=20, patience=20, lr=1e-2, batch_size=32)
    with pytest.raises(SystemExit) as e:
        baselines.train_sasrec(cfg, splits, 12, 5, evaluate.EvalConfig(), 0, log, str(tmp_path))
    assert e.value.code == 128 + signal.SIGTERM and len(logs) == 2
    err = capsys.readouterr().err
    best = max(range(2), key=lambda i: (logs[i]["valid_ndcg@10"], -i))
    assert re.search(rf"stopped by SIGTERM in epoch 2; .*sasrec.pt holds the best epoch so far, {best} \(valid "
                     rf"NDCG@10 {logs[best]['valid_ndcg@10']:.4f}\)\. No metrics.json was written", err), err
    assert torch.load(tmp_path / "sasrec.pt", weights_only=True)["epoch"] == best
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again

    def early(rec):
        raise AssertionError("no epoch should finish")
    real = baselines.SASRec.loss
    calls = []

    def loss_then_term(self, *a):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a)
    baselines.SASRec.loss = loss_then_term
    try:
        with pytest.raises(SystemExit):
            baselines.train_sasrec(cfg, splits, 12, 5, evaluate.EvalConfig(), 0, early, None)
    finally:
        baselines.SASRec.loss = real
    assert len(calls) == 1 and "in epoch 0; no epoch had finished, so nothing was kept" in capsys.readouterr().err


def test_two_sasrec_runs_on_one_out_do_not_interleave(tmp_path):
    """The run folder's lock, as rporec.py's: a second run stops at once naming the first, and leaves its files."""
    out = tmp_path / "run"
    out.mkdir()
    holder = open(out / "run.lock", "a+")  # another live run's lock (a separate open file: another holder)
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("4242 elsewhere\n")
    holder.flush()
    (out / "log.jsonl").write_text('{"method": "sasrec", "epoch": 0}\n')
    try:
        with pytest.raises(SystemExit, match=r"is in use by another process \(pid 4242 on elsewhere"):
            baselines.main(["sasrec", "--data.data_dir", str(tmp_path / "data"), "--out", str(out),
                            "--sasrec.epochs", "1", "--sasrec.hidden", "16"])
        assert (out / "log.jsonl").read_text() == '{"method": "sasrec", "epoch": 0}\n'
        assert not (out / "config.json").exists()
    finally:
        holder.close()
    baselines.main(["sasrec", "--data.data_dir", str(tmp_path / "data"), "--out", str(out), "--sasrec.epochs", "1",
                    "--sasrec.hidden", "16"])  # the holder gone, the folder is free
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_sasrec_refuses_a_folder_of_another_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"run": {"dataset": "toy"}, "rechead": {}}))
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="another kind of run"):
        baselines.main(["sasrec", "--out", str(tmp_path)])
    assert (tmp_path / "metrics.json").read_text() == "{}"
