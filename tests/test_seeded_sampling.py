"""Per-row seeded sampling (sampling.row_uniforms, choose_tokens_seeded, decode.generate's row_seeds): a row's
tokens depend on its prompt, its seed and the model alone, in both backends and under CUDA graphs; the draw follows
the sampling distribution exactly. Stage I reasoning and recommend.py draw each CoT from its own seed, so the batch
size, a resume or the users beside it change nothing; runs sharing a data folder split the reasoning cache."""
import errno
import json
import math
import multiprocessing
import os
import time

import pytest
import torch
from test_decode import PAD, P, V, naive_stats, prompt_batch, prompts, tiny
from test_graph_replay import FakeGraph, emulated_graphs  # noqa: F401 (a fixture)
from test_rporec import small

import data
import recommend
import rporec
from plumbing import checkpoint, decode, sampling, seeds
from speed import fastdecode

NEW = 24


@pytest.fixture(scope="module")
def qwen3():
    return tiny("qwen3")


def with_row(n, pos, backend, model, graph=False, **kw):
    """The target row (4 pads, its own seed) at position pos of a batch of n, the others random prompts with other
    seeds: its completion tokens, log-probs and entropies."""
    ids, mask = prompt_batch(n + 100)  # batch-mates: other prompts, other padding
    ids, mask = ids[:n].clone(), mask[:n].clone()
    target = torch.randint(1, V, (P,), generator=torch.Generator().manual_seed(5))
    ids[pos], mask[pos] = target.masked_fill(torch.arange(P) < 4, PAD), (torch.arange(P) >= 4).long()
    row_seeds = [seeds.row_seed(0, "mates", n * 1000 + i) for i in range(n)]
    row_seeds[pos] = seeds.row_seed(0, "test", 7)
    cfg = decode.DecodeConfig(max_new_tokens=NEW, backend=backend, cuda_graph=graph, kv_bucket=8, **kw)
    out = decode.generate(model, ids, mask, cfg, eos_ids=[5, 9], pad_id=PAD, stats=True, row_seeds=row_seeds)
    keep = out.mask[pos]
    return out.tokens[pos][keep], out.logp[pos][keep], out.entropy[pos][keep]


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_a_row_draws_the_same_tokens_alone_and_in_any_batch(qwen3, backend):
    alone = with_row(1, 0, backend, qwen3, temperature=1.0, top_p=0.95)
    assert len(alone[0]) >= 8  # long enough to mean something
    for n, pos in ((2, 1), (16, 9), (64, 37), (64, 0)):
        tokens, logp, ent = with_row(n, pos, backend, qwen3, temperature=1.0, top_p=0.95)
        assert torch.equal(tokens, alone[0]), (n, pos)
        assert torch.allclose(logp, alone[1], atol=1e-5) and torch.allclose(ent, alone[2], atol=1e-5)


def test_both_backends_draw_the_same_tokens_from_a_row_seed(qwen3):
    for kw in ({"temperature": 1.0}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}):
        assert torch.equal(with_row(16, 3, "hf", qwen3, **kw)[0], with_row(16, 3, "fast", qwen3, **kw)[0])


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_seeded_stats_match_naive_recompute(qwen3, backend):
    """The stats describe the raw logits at the temperature: the draw that follows them changes nothing."""
    ids, mask = prompts()
    cfg = decode.DecodeConfig(max_new_tokens=16, backend=backend, temperature=0.7, top_k=20, top_p=0.9)
    out = decode.generate(qwen3, ids, mask, cfg, [5, 9], PAD, stats=True, row_seeds=list(range(len(ids))))
    logp, ent = naive_stats(qwen3, out.tokens, 0.7)
    assert torch.allclose(out.logp[out.mask], logp[out.mask], atol=1e-4)
    assert torch.allclose(out.entropy[out.mask], ent[out.mask], atol=1e-4)
    assert (out.logp[~out.mask] == 0).all() and (out.logp[out.mask] < 0).all()


def test_row_seeds_change_the_draw_and_greedy_ignores_them(qwen3):
    ids, mask = prompt_batch(4)
    cfg = decode.DecodeConfig(max_new_tokens=NEW, backend="fast")
    a = decode.generate(qwen3, ids, mask, cfg, [], PAD, row_seeds=[1, 2, 3, 4]).tokens
    b = decode.generate(qwen3, ids, mask, cfg, [], PAD, row_seeds=[1, 2, 3, 5]).tokens
    assert torch.equal(a[:3], b[:3]) and not torch.equal(a[3], b[3])
    greedy = decode.DecodeConfig(max_new_tokens=NEW, backend="hf", greedy=True)
    assert torch.equal(decode.generate(qwen3, ids, mask, greedy, [], PAD, row_seeds=[1, 2, 3, 4]).tokens,
                       decode.generate(qwen3, ids, mask, greedy, [], PAD).tokens)
    with pytest.raises(ValueError, match="one non-negative int per prompt"):
        decode.generate(qwen3, ids, mask, cfg, [], PAD, row_seeds=[1, 2, 3])


def test_seeded_graph_replay_equals_eager(qwen3, emulated_graphs):  # noqa: F811
    """The uniforms are a caller-filled buffer that the graph reads at its step's column."""
    eager = with_row(16, 2, "fast", qwen3, graph=False, temperature=0.8)
    fastdecode.clear_fast_cache(qwen3)
    graphed = with_row(16, 2, "fast", qwen3, graph=True, temperature=0.8)
    assert FakeGraph.replays > 0 and fastdecode._DECODERS[qwen3][-1].seeded
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)


@torch.no_grad()
def test_seeded_graph_step_needs_no_host_sync():
    dec = fastdecode._FastDecoder(tiny("qwen3").to("meta"), 8, 64)
    dec.seeded = True
    for cfg in (decode.DecodeConfig(), decode.DecodeConfig(temperature=0.7, top_k=5, top_p=0.9)):
        dec.decode_step(32, cfg, stats=True)
    assert dec.out_tok.is_meta


def chi_square(counts, probs):
    """Pearson's statistic of counts against probs (> 0 where expected)."""
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 99: 148.2}  # chi-square quantile 0.999 by degrees of freedom


def test_row_uniforms_are_uniform_and_independent():
    u = sampling.row_uniforms(torch.tensor([seeds.row_seed(3, "u", i) for i in range(500)]), torch.arange(400))
    assert u.dtype == torch.float64 and u.shape == (500, 400) and 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, 100, 0, 1).double()
    assert chi_square(counts, torch.full((100,), 0.01, dtype=torch.float64)) < CHI2_999[99]
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):  # next step, next row
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.01
    again = sampling.row_uniforms(torch.tensor([seeds.row_seed(3, "u", 17)]), torch.arange(100, 400))
    assert torch.equal(again, u[17:18, 100:])  # a function of (row seed, step) alone


@pytest.mark.parametrize("kw, probs", [
    ({}, [0.5, 0.3, 0.15, 0.04, 0.01]),
    ({"top_p": 0.7}, [0.625, 0.375, 0.0, 0.0, 0.0]),
    ({"top_k": 3}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0, 0.0]),
    ({"temperature": 2.0}, None),
])
def test_seeded_frequencies_match_the_sampling_distribution(kw, probs):
    base = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    cfg = decode.DecodeConfig(**kw)
    want = sampling.sampling_probs(base.log()[None], cfg)[0].double()
    if probs is not None:
        assert torch.allclose(want, torch.tensor(probs, dtype=torch.float64), atol=1e-6)
    rows, steps = 200, 250  # 50,000 draws: every row and step its own uniform
    u = sampling.row_uniforms(torch.tensor([seeds.row_seed(0, "f", i) for i in range(rows)]), torch.arange(steps))
    chosen = sampling.choose_tokens_seeded(base.log().expand(rows * steps, -1), cfg, u.flatten())
    counts = torch.bincount(chosen, minlength=5).double()
    kept = want > 0
    assert (counts[~kept] == 0).all()  # a truncated token is never drawn
    assert chi_square(counts[kept], want[kept] / want[kept].sum()) < CHI2_999[int(kept.sum()) - 1]


def test_seeded_draw_at_the_ends_of_the_unit_interval():
    logits = torch.tensor([[0.0, -math.inf, 1.0, 2.0, -math.inf]])  # the last token cannot be drawn
    cfg = decode.DecodeConfig()
    assert sampling.choose_tokens_seeded(logits, cfg, torch.tensor([0.0])).item() == 0
    assert sampling.choose_tokens_seeded(logits, cfg, torch.tensor([1 - 2.0 ** -53])).item() == 3
    assert sampling.choose_tokens_seeded(logits, decode.DecodeConfig(top_k=1), torch.tensor([0.0])).item() == 3


# ----------------------------------------------------------------------------- Stage I and recommend.py
def test_stage1_reasoning_does_not_depend_on_gen_batch(tmp_path):
    cfg = rporec.parse_config(small(tmp_path, "--gen_batch", "8"))
    ds = rporec.data.load_dataset(cfg.data)
    model, tok = rporec.load_backbone(cfg, ds)
    samples = ds.splits["valid"][:24]
    by8 = rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples)[0]
    path = checkpoint.reasoning_cache(cfg, model, "valid", cfg.run.seed, data.reasoning_key(cfg.data))
    cfg.run.gen_batch = 64
    assert checkpoint.reasoning_cache(cfg, model, "valid", cfg.run.seed, data.reasoning_key(cfg.data)) == path
    os.remove(path)
    assert rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples)[0] == by8
    cfg.run.gen_batch = 5
    os.remove(path)
    assert rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples)[0] == by8
    assert len({y for y, _ in by8}) == len(by8)  # 24 different CoTs


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """A toy Stage I run with its backbone, and 30 users of its test split as recommend.py input lines."""
    root = tmp_path_factory.mktemp("s1")
    rporec.main(small(root, "--stage", "1"))
    cfg = recommend.load_config(root / "run")
    ds = data.load_dataset(cfg.data)
    users = [{"user": s["user"], "history": [ds.item_keys[i] for i in s["history"]]} for s in ds.splits["test"][:30]]
    inp = root / "users.jsonl"
    inp.write_text("".join(json.dumps(u) + "\n" for u in users))
    return str(root / "run"), str(inp), users


def lines(path):
    with open(path) as f:
        return f.read().splitlines()


def same_recs(a, b):
    """Two recommend.py outputs agree line by line: user, CoT, answer and items exactly; the scores up to the float
    rounding of the Rechead's matrix products, whose kernels differ with the number of rows (1-3 rows on a CPU)."""
    a, b = [json.loads(t) for t in a], [json.loads(t) for t in b]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "scores"} == {k: v for k, v in y.items() if k != "scores"}
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)
    return True


def test_recommend_output_does_not_depend_on_the_batch(stage1_run, tmp_path):
    run, inp, users = stage1_run
    outs = {}
    for batch in ("0", "7", "1"):
        outs[batch] = str(tmp_path / f"b{batch}.jsonl")
        recommend.main(["--run", run, "--input", inp, "--out", outs[batch], "--batch", batch])
    assert len(lines(outs["0"])) == 30 and same_recs(lines(outs["0"]), lines(outs["7"]))
    assert same_recs(lines(outs["0"]), lines(outs["1"]))
    rec = recommend.Recommender.from_run(run)
    alone = rec.recommend([users[11]["history"]], 10)[0]
    assert same_recs(lines(outs["0"])[11:12], [json.dumps({"user": users[11]["user"], **alone})])
    assert len({json.loads(t)["reasoning"] for t in lines(outs["0"])}) > 25  # each user its own draws


def test_recommend_resumed_after_a_failed_write_equals_the_whole_batch(stage1_run, tmp_path, monkeypatch):
    run, inp, _ = stage1_run
    whole, cut = str(tmp_path / "whole.jsonl"), str(tmp_path / "cut.jsonl")
    recommend.main(["--run", run, "--input", inp, "--out", whole, "--batch", "8"])
    real, blocks = checkpoint.append_cache, []

    def disk_full(path, records):
        blocks.append(1)
        if len(blocks) < 2:
            return real(path, records)
        raw = "".join(json.dumps(r) + "\n" for r in records)
        with open(path, "a") as f:
            f.write(raw[:len(raw) // 2])  # some whole lines of the second block, then half one
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "append_cache", disk_full)
    with pytest.raises(OSError):
        recommend.main(["--run", run, "--input", inp, "--out", cut, "--batch", "8"])
    monkeypatch.setattr(checkpoint, "append_cache", real)
    assert 9 <= len(lines(cut)) <= 16  # the resume starts inside the second block
    recommend.main(["--run", run, "--input", inp, "--out", cut, "--batch", "8", "--resume"])
    assert same_recs(lines(cut), lines(whole))


# ----------------------------------------------------------------------------- runs sharing a data folder
def fill(path, order, batch, log, start, die_after=None, delay=0.2):
    """cached_map in its own process: each generated index goes to log (one line each), a slice taking `delay`
    seconds (long beside a process's start, so both get work); die_after: exit, holding a claimed slice, after that
    many seconds."""
    start.wait()

    def fn(idx):
        if die_after is not None:
            time.sleep(die_after)
            os._exit(1)  # killed mid-batch
        time.sleep(delay)
        with open(log, "a") as f:
            f.write("".join(f"{i}\n" for i in idx))
        return [{"i": i, "text": f"cot {i}"} for i in idx], len(idx)

    done = checkpoint.cached_map(path, order, batch, fn, "test")
    assert sorted(done) == sorted(order)


def start_together(*jobs):
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(len(jobs))
    procs = [ctx.Process(target=fill, args=(*args, start), kwargs=kw) for args, kw in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [p.exitcode for p in procs]


def test_two_runs_on_one_fresh_cache_split_the_work(tmp_path):
    path, order = str(tmp_path / "reasoning" / "train.jsonl"), list(range(60, 0, -1))
    logs = [str(tmp_path / f"made{k}") for k in range(2)]
    assert start_together(((path, order, 8, logs[0]), {}), ((path, order, 8, logs[1]), {})) == [0, 0]
    made = [lines(log) if os.path.exists(log) else [] for log in logs]
    assert made[0] and made[1]  # both took a share
    assert sorted(made[0] + made[1], key=int) == [str(i) for i in range(1, 61)]  # each index generated once
    cached = [json.loads(t)["i"] for t in lines(path)]
    assert sorted(cached) == list(range(1, 61))  # each line once
    assert os.path.exists(path + ".claims")


def test_a_killed_runs_claim_is_taken_over(tmp_path):
    path, order = str(tmp_path / "reasoning" / "train.jsonl"), list(range(40))
    logs = [str(tmp_path / f"made{k}") for k in range(2)]
    codes = start_together(((path, order, 8, logs[0]), {"die_after": 0.3}), ((path, order, 8, logs[1]), {}))
    assert codes[0] == 1 and codes[1] == 0
    assert sorted(int(i) for i in lines(logs[1])) == order  # the survivor generated every slice, the dead one's too
    assert sorted(json.loads(t)["i"] for t in lines(path)) == order
