"""The train script end to end on the toy preset: flags, the reasoning cache, Stage II, resume."""
import errno
import json
import os

import pytest
import torch

import data
import rewards
import rporec
from plumbing import checkpoint, decode, toy

real_encode = rporec.rechead.encode


def small(tmp_path, *extra):
    """Flags for a seconds-long toy run in tmp_path; a flag in extra replaces the default given here (a flag
    given twice is refused)."""
    base = {"--out": str(tmp_path / "run"), "--data.data_dir": str(tmp_path / "data"), "--limit": "48",
            "--rechead.epochs": "1", "--decode.max_new_tokens": "8", "--grpo.max_new_tokens": "8",
            "--grpo.prompts_per_step": "2", "--grpo.micro_batch": "4", "--grpo.eval_samples": "8"}
    given = {e.split("=")[0] for e in extra if e.startswith("--")}
    return [x for flag, value in base.items() if flag not in given for x in (flag, value)] + list(extra)


def toy_model(tmp_path, kind):
    """The toy backbone or encoder folder that a run in tmp_path built for the bookstore."""
    (path,) = (tmp_path / "data" / "toy").glob(f"{kind}-*")
    return path


def test_parse_config_presets_and_flags():
    cfg = rporec.parse_config(["--grpo.beta", "0", "--rechead.trainable", "false", "--official_eval"])
    assert cfg.grpo.beta == 0.0 and cfg.rechead.trainable is False and cfg.run.official_eval is True
    assert cfg.run.model == "toy" and cfg.rechead.encoder == "toy"  # the toy preset applied
    cfg = rporec.parse_config(["--dataset", "ml-100k", "--data.raw_dir", "a", "--grpo.steps", "3"])
    assert cfg.data.raw_dir == "a" and cfg.grpo.steps == 3 and cfg.run.model == "Qwen/Qwen3-0.6B"
    cfg = rporec.parse_config(["--dataset=cds", "--ablate", "cot"])
    assert cfg.run.model == "Qwen/Qwen3-0.6B" and cfg.data.dataset == "cds" and cfg.rechead.use_cot is False
    cfg = rporec.parse_config(["--eval.ks", "5,10", "--eval.mask_history"])
    assert cfg.eval.ks == (5, 10) and cfg.eval.mask_history is True
    for bad, msg in ((["--dataset", "nope"], "unknown dataset"), (["--grpo.nope", "1"], "unknown flag"),
                     (["--stage", "3"], "--stage"), (["--rechead.trainable", "maybe"], "true/false"),
                     (["--grpo.steps", "many"], "takes a int"), (["--eval.ks", "5,20"], "10 among them"),
                     (["--eval.ks", "ten"], "takes a tuple")):
        with pytest.raises(SystemExit, match=msg):
            rporec.parse_config(bad)


def test_flag_values_may_hold_equals_signs():
    """Only a --flag=VALUE argument is split at its first "=": a value keeps its own."""
    hint = "Answer as <answer>title=...</answer>"
    assert rporec.parse_config(["--prompt_suffix", hint]).run.prompt_suffix == hint
    assert rporec.parse_config(["--prompt_suffix=a=b"]).run.prompt_suffix == "a=b"


def test_evaluate_split_follows_eval_config():
    """--eval.mask_history and --eval.ks reach the Stage I/II evaluation: a head that scores history
    items above the target ranks it behind them unless they are masked."""
    class Head:
        def eval(self):
            return self

        def user_vecs(self, x, y, z):
            return x  # the history ids themselves

        def scores(self, histories):
            s = torch.zeros(len(histories), 11)  # (b, N+1), 10 items
            for row, h in enumerate(histories):
                s[row, h] = 2.0
                s[row, 10] = 1.0  # the target
            return s

    samples = [{"history": [1, 2, 3], "target": 10}, {"history": [4], "target": 10}]
    inputs = ([s["history"] for s in samples], [None] * 2, [None] * 2)
    cfg = rporec.parse_config(["--eval.ks", "1,10"])
    plain = rporec.evaluate_split(cfg, Head(), inputs, samples)
    cfg.eval.mask_history = True
    masked = rporec.evaluate_split(cfg, Head(), inputs, samples)
    assert set(plain) == {"hr@1", "ndcg@1", "hr@10", "ndcg@10", "n"}
    assert plain["hr@1"] == 0.0 and masked["hr@1"] == 1.0 and masked["ndcg@10"] == 1.0


def test_run_with_other_cutoffs(tmp_path):
    m = rporec.main(small(tmp_path, "--model", "none", "--ablate", "cot", "--stage", "1", "--eval.ks", "1,10"))
    assert set(m["stage1"]["test"]) == set(m["popularity"]["test"]) == {"hr@1", "ndcg@1", "hr@10", "ndcg@10", "n"}


def test_reasoning_cache_resumes_without_regenerating(tmp_path, monkeypatch):
    cfg = rporec.parse_config(small(tmp_path, "--gen_batch", "8"))
    ds = rporec.data.load_dataset(cfg.data)
    samples = ds.splits["valid"][:40]
    model, tok = rporec.load_backbone(cfg, ds)
    real, calls = decode.generate, []

    def dying(*a, **k):
        calls.append(a[1].shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while generating the third batch
        return real(*a, **k)

    monkeypatch.setattr(decode, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples)
    path = checkpoint.reasoning_cache(cfg, model, "valid", cfg.run.seed, data.reasoning_key(cfg.data))
    assert len(checkpoint.read_cache(path)) == 16
    with open(path, "a") as f:
        f.write('{"i": 39, "text": "half a li')  # a write cut short by the kill
    calls.clear()

    def counting(*a, **k):
        calls.append(a[1].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(decode, "generate", counting)
    out, _ = rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples)
    assert sum(calls) == 24 and len(out) == 40  # only the 24 missing samples were generated
    calls.clear()
    assert rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples)[0] == out and not calls
    with open(path, "a") as f:
        f.write("not json\n")
    with pytest.raises(SystemExit, match="corrupt.*delete it"):
        checkpoint.read_cache(path)


def test_a_failed_write_does_not_change_the_reruns_cots(tmp_path, monkeypatch):
    """A full disk cuts the second batch's append short, after some of its lines; the rerun ends with the cache
    an uninterrupted run writes, byte for byte: a CoT never depends on what was cached before."""
    cfg = rporec.parse_config(small(tmp_path, "--gen_batch", "8"))
    ds = rporec.data.load_dataset(cfg.data)
    model, tok = rporec.load_backbone(cfg, ds)
    samples = ds.splits["valid"][:24]
    straight = rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples)
    path = checkpoint.reasoning_cache(cfg, model, "valid", cfg.run.seed, data.reasoning_key(cfg.data))
    with open(path, "rb") as f:
        whole = f.read()
    os.remove(path)
    real, appends = checkpoint.append_cache, []

    def disk_full(path, records):
        appends.append(len(records))
        if len(appends) < 2:
            return real(path, records)
        raw = "".join(json.dumps(r) + "\n" for r in records)
        with open(path, "a") as f:
            f.write(raw[:len(raw) // 2])  # what reached the disk before it filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "append_cache", disk_full)
    with pytest.raises((OSError, SystemExit)):
        rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples)
    with open(path, "rb") as f:
        cut = f.read()
    assert cut.count(b"\n") > 8 and not cut.endswith(b"\n")  # some whole lines of the second batch, then half one
    monkeypatch.setattr(checkpoint, "append_cache", real)
    assert rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples) == straight
    with open(path, "rb") as f:
        assert f.read() == whole


def test_toy_both_stages_two_steps(tmp_path):
    m = rporec.main(small(tmp_path, "--grpo.steps", "2"))
    run = tmp_path / "run"
    saved = json.load(open(run / "metrics.json"))
    assert set(saved) == {"stage1", "popularity", "transition", "stage2", "cost"} and saved == json.loads(json.dumps(m))
    assert set(saved["stage1"]) == {"valid", "test"} and set(saved["stage2"]) == {"valid", "test", "step"}
    for part in ("stage1", "stage2"):
        assert 0 <= saved[part]["test"]["ndcg@10"] <= 1 and 0 <= saved[part]["test"]["parse_rate"] <= 1
    recs = [json.loads(line) for line in open(run / "log.jsonl")]
    steps = [r for r in recs if r["stage"] == 2 and "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward", "fmt", "clean", "ndcg", "sim", "comp", "ent", "kl", "entropy", "clip_low",
                "clip_high", "len", "cot_len", "zero_std_groups", "skipped"):
        assert key in steps[0], key
    assert json.load(open(run / "config.json"))["grpo"]["steps"] == 2
    assert os.path.exists(run / "ckpt" / "trainer_state.pt") and os.path.exists(run / "rechead.pt")
    assert (run / "stage2.png").stat().st_size > 0


def test_resume_repeats_and_loses_no_step(tmp_path):
    def weights(run):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(run / "ckpt").state_dict()

    straight = tmp_path / "a"
    rporec.main(small(straight, "--grpo.steps", "4", "--grpo.save_every", "2", "--grpo.beta", "0.01"))
    cut = tmp_path / "b"
    rporec.main(small(cut, "--grpo.steps", "2", "--grpo.save_every", "2", "--grpo.beta", "0.01"))
    with open(cut / "run" / "log.jsonl", "a") as f:  # a step logged after the last checkpoint, then killed
        f.write(json.dumps({"stage": 2, "step": 3}) + "\n")
    rporec.main(small(cut, "--grpo.steps", "4", "--grpo.save_every", "2", "--grpo.beta", "0.01",
                      "--stage", "2", "--init", str(cut / "run"), "--resume"))
    a, b = weights(straight / "run"), weights(cut / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in open(cut / "run" / "log.jsonl") if '"reward"' in l]
    assert steps == [1, 2, 3, 4]


def test_reward_parts_on_formatted_completions(tmp_path):
    cfg = rporec.parse_config(small(tmp_path, "--rewards.summary_max_new_tokens", "4", "--rewards.drop", ""))
    ds = rporec.data.load_dataset(cfg.data)
    # the untaught toy backbone: its greedy summaries are never empty (a taught one may end at once)
    model, tok = decode.load_model(toy.build_backbone(ds.texts[1:], str(tmp_path / "random")), torch.float32,
                                   torch.device("cpu"))
    head = rporec.make_head(cfg, ds)
    samples = [dict(ds.splits["train"][i], i=i) for i in range(2)]
    good = "<think>mystery series book</think><answer>the northern dossier</answer>"
    texts = [good, "mystery book series", good + " book", "<think>mystery</think>"] * 2  # words of the toy vocabulary
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    T = max(map(len, ids))
    tokens = torch.tensor([i + [tok.pad_token_id] * (T - len(i)) for i in ids])
    ro = decode.Rollout(tokens=tokens, mask=tokens != tok.pad_token_id, logp=torch.zeros(tokens.shape),
                     entropy=torch.rand(tokens.shape))
    scored = rewards.score(cfg, ds, head, model, tok, samples, ro)
    r, parts, cot_len = scored.total, scored.parts, scored.cot_len
    assert scored.texts == tok.batch_decode(tokens, skip_special_tokens=True)
    assert parts["fmt"].tolist() == [1.0, 0.0, 1.0, 0.0] * 2
    assert parts["clean"][2] < 1.0 == parts["clean"][0]
    assert (r[[1, 3]] == 0).all() and (r[[0, 2]] > 0).all()  # eq. 7: nothing without the format
    assert (parts["comp"][[0, 2]] > 0).all() and cot_len[0] == 3  # the summary ran for formatted ones
    assert torch.all((parts["ndcg"] > 0) & (parts["ndcg"] <= 1))
    cfg.rewards.drop = "fmt"  # the -fmt ablation (and the toy preset): no gate, summaries for every CoT
    scored = rewards.score(cfg, ds, head, model, tok, samples, ro)
    r, parts = scored.total, scored.parts
    assert (r[[1, 3]] > 0).all() and parts["comp"][1] > 0


def test_history_only_frozen_run_reuses_disk_embeddings(tmp_path):
    flags = small(tmp_path, "--model", "none", "--ablate", "cot", "--stage", "1", "--rechead.trainable", "false")
    first = rporec.main(flags)
    (emb,) = (tmp_path / "data" / "embeddings").iterdir()
    stamp = emb.stat().st_mtime_ns
    assert len(checkpoint.load_embeddings(str(emb))[0]) > 48
    second = rporec.main(flags)
    assert emb.stat().st_mtime_ns == stamp  # nothing new to embed, nothing rewritten
    assert first["stage1"] == second["stage1"] and "stage2" not in second


def test_official_eval_averages_four_sampled_cots(tmp_path):
    m = rporec.main(small(tmp_path, "--stage", "1", "--official_eval"))
    off = m["stage1"]["valid_official"]
    assert set(off) == set(m["stage1"]["valid"]) and off["n"] == 48
    caches = [c for c in (tmp_path / "data" / "reasoning").glob("*/valid.jsonl")]
    assert len(caches) == 5 and all(len(checkpoint.read_cache(str(c))) == 48 for c in caches)  # stage 1's and 4 more


def test_frozen_embedding_survives_a_kill_midway(tmp_path, monkeypatch):
    """checkpoint.embed_frozen saves what it has as it goes: a run killed mid-way leaves a whole file with the
    finished chunks, and the rerun embeds only the rest."""
    cfg = rporec.parse_config(small(tmp_path, "--model", "none", "--ablate", "cot", "--stage", "1",
                                    "--rechead.trainable", "false", "--rechead.encode_batch", "1"))  # 16-text chunks
    ds = rporec.data.load_dataset(cfg.data)
    samples = ds.splits["train"][:48]
    inputs = data.rechead_inputs(cfg, ds, samples, [("", None)] * len(samples))
    n_texts = len({t or "" for part in inputs for t in part})
    assert n_texts > 2 * 16
    monkeypatch.setattr(checkpoint, "EMBED_SAVE_S", 0)  # save after every chunk
    encoded = []

    def encode(enc, texts, device, die_at=None):
        if len(encoded) + len(texts) == die_at:
            raise KeyboardInterrupt
        encoded.extend(texts)
        return real_encode(enc, texts, device)
    head = rporec.make_head(cfg, ds)  # embeds the items: before the counting starts
    monkeypatch.setattr(rporec.rechead, "encode", lambda *a: encode(*a, die_at=33))  # in the third chunk
    with pytest.raises(KeyboardInterrupt):
        checkpoint.embed_frozen(head, [t or "" for part in inputs for t in part], str(tmp_path / "data" / "embeddings"))
    (emb,) = (tmp_path / "data" / "embeddings").glob("*.pt")
    assert len(checkpoint.load_embeddings(str(emb))[0]) == 32  # the two whole chunks
    monkeypatch.setattr(rporec.rechead, "encode", real_encode)
    head = rporec.make_head(cfg, ds)
    encoded.clear()
    monkeypatch.setattr(rporec.rechead, "encode", encode)
    checkpoint.embed_frozen(head, [t or "" for part in inputs for t in part], str(tmp_path / "data" / "embeddings"))
    assert len(encoded) == n_texts - 32
    texts, vecs = checkpoint.load_embeddings(str(emb))
    assert len(texts) == n_texts
    assert torch.allclose(vecs, torch.stack([real_encode(head.item_encoder, [t], "cpu")[0] for t in texts]), atol=1e-5)


def test_history_window_keeps_the_newest_items(tmp_path):
    """--rechead.history_items N builds x from the newest N history items; the prompt keeps all of them."""
    cfg = rporec.parse_config(small(tmp_path, "--rechead.history_items", "2", "--data.max_history_chars", "6000",
                                    "--rechead.history_chars", "0"))  # the paper's budgets, not the toy's
    ds = rporec.data.load_dataset(cfg.data)
    sample = next(s for s in ds.splits["train"] if len(s["history"]) >= 4)
    (x,), _, _ = data.rechead_inputs(cfg, ds, [sample], [("", None)])
    assert x == rporec.data.history_text(ds, sample["history"][-2:], cfg.data.max_history_chars)
    prompt = rporec.data.build_messages(ds, sample, cfg.data, cfg.run.prompt_suffix)[-1]["content"]
    assert all(ds.titles[h] in prompt for h in sample["history"])
    cfg.rechead.history_items = 0
    (full,), _, _ = data.rechead_inputs(cfg, ds, [sample], [("", None)])
    assert full == rporec.data.history_text(ds, sample["history"], cfg.data.max_history_chars) != x
