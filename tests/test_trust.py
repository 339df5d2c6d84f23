"""Runs you can trust: checks of every field before any write, no code from files, caches that cannot go stale,
a checkpoint that survives a kill between renames, NaN steps and broken updates that never reach a saved weight,
Stage II selection of its best valid step, one run per folder, preemption and resumes that lose nothing, one
error line for every error a user can cause."""
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import typing

import pytest
import torch
from test_rporec import small, toy_model

import data
import rewards
import rporec
from plumbing import checkpoint, decode, errors, files, flags
from plumbing.run import Preemption


@pytest.fixture(scope="module")
def both_run(tmp_path_factory):
    """One finished toy run of both stages (2 GRPO steps, checkpoint at the end), shared by the tests."""
    root = tmp_path_factory.mktemp("both")
    rporec.main(small(root, "--grpo.steps", "2", "--grpo.eval_every", "1", "--grpo.eval_samples", "8"))
    return root


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def on_data(flags, root):
    """flags reading the data folder of the run in root: its toy models and reasoning are built already."""
    flags = list(flags)
    flags[flags.index("--data.data_dir") + 1] = str(root / "data")
    return flags


@pytest.mark.parametrize("flags, msg", [
    (["--grpo.group_size", "1"], "--grpo.group_size must be >= 2"),
    (["--rechead.batch_size", "0"], "--rechead.batch_size must be >= 1"),
    (["--grpo.prompts_per_step", "0"], "--grpo.prompts_per_step must be >= 1"),
    (["--grpo.rho", "0"], r"--grpo.rho must be a finite number in \(0, 1\]"),
    (["--resume"], "--resume but no checkpoint"),
    (["--model", "none"], "add --ablate cot"),
    (["--model", "none", "--ablate", "cot"], "Stage II trains the backbone"),
    (["--stage", "2"], "needs --init"),
    (["--stage", "2", "--ablate", "II", "--init", "x"], "does not apply to --stage 2"),
    (["--stage", "2", "--ablate", "cot", "--init", "x"], "does not apply to --stage 2"),
    (["--data.dataset", "cds"], "contradicts --dataset"),
    (["--rechead.use_cot", "true", "--ablate", "cot"], "contradicts"),
    (["--data.window", "0"], "window"),
    (["--data.interactions", "a.tsv"], "custom"),
    (["--stage", "1", "--resume"], "has none"),
])
def test_bad_flags_stop_before_any_write(tmp_path, flags, msg):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=msg):
        rporec.main(small(tmp_path, *flags))
    assert not out.exists()


def test_help_lists_every_flag_with_its_comment(capsys):
    with pytest.raises(SystemExit) as e:
        rporec.parse_config(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--grpo.beta", "--rechead.encoder", "--model", "--decode.temperature", "--eval.ks",
                 "--grpo.iterations", "--grpo.eval_every"):
        assert flag in text, flag
    assert "KL weight of eq. 10" in text  # the field comment


def test_stage2_flags_come_from_init(both_run, tmp_path):
    with pytest.raises(SystemExit, match="--rechead.\\* flags do not apply"):
        rporec.parse_config(small(tmp_path, "--stage", "2", "--init", str(both_run / "run"), "--rechead.gamma", "0.5"))
    cfg = rporec.parse_config(small(tmp_path, "--stage", "2", "--init", str(both_run / "run")))
    saved = json.load(open(both_run / "run" / "config.json"))["rechead"]
    assert cfg.rechead == rporec.rechead.RecheadConfig(**saved)  # the config of the Rechead actually used


def test_other_config_into_the_same_folder_is_refused(both_run, tmp_path):
    run = copy_run(both_run, tmp_path / "c")
    before = (run / "run" / "config.json").read_text()
    with pytest.raises(SystemExit, match="another config.*grpo.lr.*new --out"):
        rporec.main(small(run, "--grpo.steps", "2", "--grpo.lr", "0.5"))
    assert (run / "run" / "config.json").read_text() == before
    # a Stage I folder takes any Stage II settings: its results do not depend on them
    stage1 = tmp_path / "s1"
    rporec.main(small(stage1, "--stage", "1"))
    cfg = rporec.parse_config(small(stage1, "--stage", "2", "--init", str(stage1 / "run"), "--grpo.lr", "0.5"))
    assert cfg.grpo.lr == 0.5


@pytest.mark.parametrize("name, fix", [("config.json", "new --out"), ("metrics.json", "delete it")])
def test_corrupt_run_json_is_named(tmp_path, name, fix):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).write_text('{"stage1": {"valid"')  # cut short by a full disk
    with pytest.raises(SystemExit, match=f"{tmp_path / 'run' / name} is corrupt.*{fix}"):
        rporec.main(small(tmp_path, "--stage", "1"))


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARK}",))


EVIL_MARK = "/tmp/rporec-evil-marker"


def test_crafted_rechead_cannot_run_code(both_run, tmp_path):
    if os.path.exists(EVIL_MARK):
        os.remove(EVIL_MARK)
    init = tmp_path / "init"
    init.mkdir()
    torch.save({"state": Evil(), "config": {}}, init / "rechead.pt")
    with pytest.raises(SystemExit, match="rechead.pt is not a valid Rechead.*could run code.*refused"):
        rporec.parse_config(small(tmp_path, "--stage", "2", "--init", str(init)))
    assert not os.path.exists(EVIL_MARK)
    assert checkpoint.load_rechead(str(both_run / "run"))["state"]  # the real one still loads


@pytest.mark.parametrize("name", ["trainer_state.pt", "rng0.pt", "model.safetensors"])
def test_corrupt_checkpoint_files_are_named(both_run, tmp_path, name):
    run = copy_run(both_run, tmp_path / "c") / "run"
    path = run / "ckpt" / name
    path.write_bytes(path.read_bytes()[:200])  # truncated
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(toy_model(both_run, "backbone"))
    with pytest.raises(SystemExit, match=f"{name}|{run / 'ckpt'}"):
        checkpoint.load(str(run), model.float(), torch.optim.AdamW(model.parameters()))


def test_corrupt_rechead_and_embeddings_are_named(both_run, tmp_path):
    init = tmp_path / "init"
    init.mkdir()
    (init / "rechead.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="rechead.pt is not a valid"):
        checkpoint.load_rechead(str(init))
    emb = tmp_path / "e.pt"
    torch.save({"texts": ["a", "b"], "vecs": torch.zeros(3, 4)}, emb)
    with pytest.raises(SystemExit, match="2 texts but vectors of shape \\(3, 4\\)"):
        checkpoint.load_embeddings(str(emb))
    emb.write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit, match="e.pt is not a valid frozen-embedding cache"):
        checkpoint.load_embeddings(str(emb))


def test_kill_between_the_two_renames_recovers(both_run, tmp_path):
    run = copy_run(both_run, tmp_path / "c") / "run"
    os.replace(run / "ckpt", run / "ckpt.old")  # the first rename happened ...
    shutil.copytree(run / "ckpt.old", run / "ckpt.tmp")  # ... and the new one was complete
    assert checkpoint.recover(str(run)) == str(run / "ckpt")
    assert (run / "ckpt" / "trainer_state.pt").exists() and not (run / "ckpt.tmp").exists()
    assert not (run / "ckpt.old").exists()
    os.replace(run / "ckpt", run / "ckpt.old")
    os.makedirs(run / "ckpt.tmp")  # killed while writing the new one: no COMPLETE marker, the old one wins
    assert checkpoint.recover(str(run)) == str(run / "ckpt") and (run / "ckpt" / "trainer_state.pt").exists()
    shutil.rmtree(run / "ckpt")
    assert (run / "ckpt.tmp").exists() and checkpoint.recover(str(run)) is None
    os.replace(run / "best", run / "best.old")  # best/ is swapped in the same way
    shutil.copytree(run / "best.old", run / "best.tmp")
    assert checkpoint.recover_dir(str(run / "best"), "info.json") == str(run / "best")
    assert (run / "best" / "info.json").exists() and not (run / "best.old").exists()


def test_checks_before_a_resume_write_nothing(both_run, tmp_path):
    """--resume accepts a complete ckpt.tmp left by a kill, but only looks: promoting it is checkpoint.load's
    job, after the processes exist (a barrier before init_process_group would crash under torchrun)."""
    run = copy_run(both_run, tmp_path / "c") / "run"
    os.replace(run / "ckpt", run / "ckpt.old")
    shutil.copytree(run / "ckpt.old", run / "ckpt.tmp")
    with pytest.raises(SystemExit, match="another config"):  # the resume check passed; the folder check stops
        rporec.parse_config(small(tmp_path / "c", "--resume"))
    assert (run / "ckpt.tmp").exists() and (run / "ckpt.old").exists() and not (run / "ckpt").exists()


def test_save_every_zero_saves_only_at_the_end(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(checkpoint, "save", lambda out, m, t, o, st: saved.append(st["step"]))
    rporec.main(small(tmp_path, "--grpo.steps", "3", "--grpo.save_every", "0"))
    assert saved == [3]


def test_nan_rewards_never_reach_the_weights(tmp_path, monkeypatch):
    real = rewards.score

    def nan_parts(*a):
        scored = real(*a)
        scored.total[0] = float("nan")
        return scored

    monkeypatch.setattr(rewards, "score", nan_parts)
    with pytest.raises(SystemExit, match="2 GRPO steps in a row had non-finite"):
        rporec.main(small(tmp_path, "--grpo.steps", "4", "--grpo.max_skips", "2"))
    from transformers import AutoModelForCausalLM
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best").state_dict()
    start = AutoModelForCausalLM.from_pretrained(toy_model(tmp_path, "backbone")).state_dict()
    assert all(torch.equal(best[k], start[k]) for k in start)  # step 0 only; nothing NaN was saved
    recs = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl") if '"reward"' in line]
    assert [bool(r["skipped"]) for r in recs] == [True, True]


def test_stage2_keeps_its_best_valid_step(tmp_path, monkeypatch):
    """Selection on a fixed valid subset: the best step's backbone is kept, patience stops the run, and the
    final metrics come from the chosen step's weights."""
    curve = iter([0.1, 0.3, 0.2, 0.1, 0.5])  # valid NDCG@10 at steps 0, 1, 2, 3 (4 never comes: patience 2)
    real = rporec.evaluate_split

    def scripted(cfg, head, inputs, samples, ground=False):
        m = real(cfg, head, inputs, samples, ground)
        return {**m, "ndcg@10": next(curve)} if len(samples) == 5 else m

    monkeypatch.setattr(rporec, "evaluate_split", scripted)
    m = rporec.main(small(tmp_path, "--grpo.steps", "6", "--grpo.eval_every", "1", "--grpo.eval_samples", "5",
                          "--grpo.patience", "2"))
    run = tmp_path / "run"
    assert m["stage2"]["step"] == 1 == json.load(open(run / "best" / "info.json"))["step"]
    recs = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in recs if "valid_ndcg@10" in r and r["stage"] == 2] == [0, 1, 2, 3]
    assert [r["step"] for r in recs if "reward" in r] == [1, 2, 3]
    assert (run / "stage2.png").stat().st_size > 0


def test_stage2_at_step_zero_reports_the_stage1_backbone(tmp_path, monkeypatch):
    """When no step beats step 0, Stage II reports the Stage I backbone's own CoTs: its valid equals Stage I's."""
    monkeypatch.setattr(rporec.grpo, "update", lambda *a, **k: {
        "loss": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "clip_frac": 0.0, "grad_norm": 0.0,
        "kept": 0.0, "skipped": "", "passes": []})
    m = rporec.main(small(tmp_path, "--grpo.steps", "2", "--grpo.eval_every", "1", "--grpo.eval_samples", "8"))
    assert m["stage2"]["step"] == 0 and m["stage2"]["valid"] == m["stage1"]["valid"]


def test_caches_are_keyed_by_weights_not_names(tmp_path):
    """A backbone or encoder whose weights change under the same name gets fresh caches."""
    flags = small(tmp_path, "--stage", "1", "--rechead.trainable", "false")
    rporec.main(flags)
    reasoning, emb = tmp_path / "data" / "reasoning", tmp_path / "data" / "embeddings"
    before = ({p.name for p in reasoning.iterdir()}, {p.name for p in emb.iterdir()})
    from transformers import AutoModelForCausalLM
    path = toy_model(tmp_path, "backbone")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(path)
    enc = rporec.rechead.load_encoder(str(toy_model(tmp_path, "encoder")), 0, "cpu")
    with torch.no_grad():
        enc[0].embedding.weight.mul_(2.0)
    enc.save(str(toy_model(tmp_path, "encoder")))
    shutil.rmtree(tmp_path / "run")
    rporec.main(flags)
    after = ({p.name for p in reasoning.iterdir()}, {p.name for p in emb.iterdir()})
    assert len(after[0] - before[0]) == 1 and len(after[1] - before[1]) == 1


def test_sampled_reasoning_is_seeded_and_keyed(tmp_path):
    cfg = rporec.parse_config(small(tmp_path, "--gen_batch", "8"))
    ds = rporec.data.load_dataset(cfg.data)
    model, tok = rporec.load_backbone(cfg, ds)
    s = decode.resolve_sampling(cfg.decode, model)
    assert (s.greedy, s.temperature, s.top_p, s.top_k) == (False, 1.0, 0.95, 0)  # no generation_config values
    model.generation_config.temperature, model.generation_config.top_k = 0.6, 20
    s = decode.resolve_sampling(cfg.decode, model)
    assert (s.temperature, s.top_k) == (0.6, 20)
    samples = ds.splits["valid"][:16]
    first, rate = rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples)
    path = checkpoint.reasoning_cache(cfg, model, "valid", cfg.run.seed, data.reasoning_key(cfg.data))
    os.remove(path)
    assert rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples)[0] == first  # a rerun draws the same
    other = rporec.generate_reasoning(cfg, ds, model, tok, "valid", samples, seed=7)[0]
    assert other != first and checkpoint.reasoning_cache(cfg, model, "valid", 7, data.reasoning_key(cfg.data)) != path
    cfg.decode.greedy = True
    assert checkpoint.reasoning_cache(cfg, model, "valid", cfg.run.seed, data.reasoning_key(cfg.data)) != path
    assert 0.0 <= rate <= 1.0


def test_weights_digest_sees_values_not_dtype():
    """A bf16 backbone and its fp32 master copy (Stage II's step 0) share caches; any changed weight does not."""
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    master = torch.nn.Linear(8, 8)
    master.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert files.weights_digest(model) == files.weights_digest(master)
    with torch.no_grad():
        master.weight[0, 0] += 1e-3
    assert files.weights_digest(model) != files.weights_digest(master)


def test_toy_numbers_do_not_depend_on_a_warm_data_folder(tmp_path):
    """The toy models are built into the data folder on the first run only; the metrics are the same."""
    flags = small(tmp_path, "--stage", "1")
    fresh = rporec.main(flags)
    shutil.rmtree(tmp_path / "run")
    assert rporec.main(flags)["stage1"] == fresh["stage1"]


def test_toy_models_are_kept_per_item_table(tmp_path):
    """A data folder shared by the bookstore and another item table builds toy models for each: the other
    table's words are in its backbone's and its encoder's vocabularies."""
    cfg = rporec.parse_config(small(tmp_path))
    ds = rporec.data.load_dataset(cfg.data)
    rporec.make_head(cfg, ds), rporec.load_backbone(cfg, ds)  # the bookstore's, built first
    other = dataclasses.replace(ds, name="custom-zebra",
                                texts=[""] + [f"zebra quartet live {i}" for i in range(1, ds.n_items + 1)])
    assert "zebra" in rporec.make_head(cfg, other).item_encoder[0].tokenizer.get_vocab()
    assert "zebra" in rporec.load_backbone(cfg, other)[1].get_vocab()
    assert "zebra" not in rporec.make_head(cfg, ds).item_encoder[0].tokenizer.get_vocab()


@pytest.mark.parametrize("argv", [["--stage"], ["--stage", "--resume"], ["--out", "--stage", "1"]])
def test_a_flag_without_its_value_says_so(argv):
    """`--stage --resume` is a --stage without its value, not the stage '--resume'; --flag=VALUE still takes a
    value that starts with --."""
    with pytest.raises(SystemExit, match=f"error: {argv[0]} needs a value"):
        rporec.parse_config(argv)
    assert rporec.parse_config(["--prompt_suffix=--- hint"]).run.prompt_suffix == "--- hint"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_stops_with_the_files_name(tmp_path):
    """Real failed writes (to /dev/full, a device that is always full) become one error line naming the file
    and saying that the disk is full; other errors pass through."""
    with pytest.raises(SystemExit, match=r"^error: could not write run/rechead.pt: the disk is full.*unexpected pos"):
        with files.writing("run/rechead.pt"):
            torch.save({"a": torch.zeros(100000)}, "/dev/full")  # torch's own words: 'enforce fail ... unexpected pos'
    with pytest.raises(SystemExit, match=r"^error: could not write run/log.jsonl: the disk is full.*No space left"):
        with files.writing("run/log.jsonl"), open("/dev/full", "a") as f:
            f.write("x" * 100000)
    with pytest.raises(ValueError, match="not a write"):
        with files.writing("run/x"):
            raise ValueError("not a write")


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(both_run, tmp_path, monkeypatch):
    run = copy_run(both_run, tmp_path / "c") / "run"
    before = (run / "ckpt" / "trainer_state.pt").read_bytes()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(run / "ckpt"), AutoTokenizer.from_pretrained(run / "ckpt")

    def full(folder, **kw):
        (tmp_path / "c" / "run" / "ckpt.tmp" / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(SystemExit, match=f"could not write {run / 'ckpt'}: the disk is full"):
        checkpoint.save(str(run), model, tok, torch.optim.AdamW(model.parameters()), {"step": 9})
    assert (run / "ckpt" / "trainer_state.pt").read_bytes() == before and not (run / "ckpt.tmp").exists()


def test_a_file_size_limit_in_stage2_is_one_error_line(both_run, tmp_path):
    """The real thing, in a process of its own: `ulimit -f` during Stage II into a new folder. The run stops with
    one error line that names the first folder it could not write (encoder/, the run folder's copy of the
    encoder, or best/) and says that the disk is full, and no traceback."""
    import resource
    flags = on_data(small(tmp_path, "--stage", "2", "--init", str(both_run / "run"), "--grpo.steps", "1"), both_run)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    p = subprocess.run([sys.executable, "rporec.py", *flags], cwd=os.path.dirname(rporec.__file__), preexec_fn=limit,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert re.match(rf"error: could not write {re.escape(str(tmp_path / 'run'))}/(encoder|best): the disk is full or "
                    "a file-size limit", last), p.stderr[-2000:]


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    """RPOREC_DEBUG=1 prints the traceback behind an error line; without it there is none."""
    inter = _rows_of(tmp_path, "inter.tsv", [{"user_id": "u", "item_id": 1, "timestamp": "yesterday"}])
    flags = small(tmp_path, "--dataset", "custom", "--data.interactions", inter, "--data.items",
                  _rows_of(tmp_path, "items.tsv", [{"item_id": 1, "title": "a"}]))
    with pytest.raises(SystemExit, match="is not a number"):
        errors.run_main(rporec.main, flags)
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setattr(errors, "DEBUG", True)
    with pytest.raises(SystemExit, match="is not a number"):
        errors.run_main(rporec.main, flags)
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError" in err


def test_an_out_that_is_a_file_or_read_only_is_refused_before_any_write(tmp_path, monkeypatch):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(SystemExit, match=f"--out {tmp_path / 'run'}: .* is a file, not a folder"):
        rporec.main(small(tmp_path))
    (tmp_path / "run").unlink()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    flags = small(tmp_path / "ro")
    if os.geteuid() == 0:  # root writes through permission bits: stand in for the kernel's answer
        monkeypatch.setattr(rporec.config.os, "access", lambda p, mode: not p.startswith(str(tmp_path / "ro")))
    with pytest.raises(SystemExit, match=f"--out {tmp_path / 'ro' / 'run'}: {tmp_path / 'ro'} is not writable"):
        rporec.main(flags)
    assert not (tmp_path / "ro" / "run").exists() and not (tmp_path / "ro" / "data").exists()


def test_a_read_only_file_system_is_one_error_line(tmp_path, monkeypatch):
    """A folder that passes the access check but whose file system refuses the write (read-only mount)."""
    real = os.makedirs

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "run")):
            raise OSError(30, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(SystemExit, match=f"^error: cannot write {tmp_path / 'run'} \\(Read-only file system\\)"):
        rporec.main(small(tmp_path))


def _rows_of(tmp_path, name, rows):
    from test_data import write_table
    return write_table(tmp_path / name, rows)


@pytest.mark.parametrize("case, msg", [
    ("0-byte", "items.tsv is empty"), ("header-only", "items.tsv is empty"), ("binary", "items.tsv is not UTF-8"),
    ("latin-1", "items.tsv is not UTF-8"), ("bad timestamp", "timestamp 'yesterday' is not a number"),
    ("duplicate id", "item id '20' is on line 3 and again"), ("missing column", r"lacks column\(s\) timestamp"),
    ("extra field", "line 2 has 5 fields but the header has 4"), ("unknown item", "names 1 item id"),
    ("no user long enough", "too few for non-empty train/valid/test"), ("row twice", "line 18 repeats line 2"),
    ("no title", "item '30' has an empty title")])
def test_every_custom_table_problem_is_one_error_line(tmp_path, case, msg):
    from test_data import MOVIES, RATINGS
    ratings, movies = [dict(r) for r in RATINGS], [dict(m) for m in MOVIES]
    if case == "bad timestamp":
        ratings[3]["timestamp"] = "yesterday"
    elif case == "duplicate id":
        movies.append(dict(movies[1]))
    elif case == "missing column":
        ratings = [{k: v for k, v in r.items() if k != "timestamp"} for r in ratings]
    elif case == "unknown item":
        ratings.append(dict(ratings[0], item_id=99))
    elif case == "no user long enough":
        ratings = [dict(r, user_id=f"u{k}") for k, r in enumerate(ratings)]
    elif case == "row twice":
        ratings += ratings
    elif case == "no title":
        movies[2]["title"] = ""
    inter, items = _rows_of(tmp_path, "inter.tsv", ratings), _rows_of(tmp_path, "items.tsv", movies)
    raw = {"0-byte": b"", "header-only": b"item_id\ttitle\n", "binary": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe",
           "latin-1": "item_id\ttitle\n10\tCaf\xe9 Society\n".encode("latin-1")}.get(case)
    if raw is not None:
        (tmp_path / "items.tsv").write_bytes(raw)
    if case == "extra field":
        text = (tmp_path / "inter.tsv").read_text().splitlines()
        (tmp_path / "inter.tsv").write_text("\n".join([text[0], text[1] + "\textra", *text[2:]]) + "\n")
    with pytest.raises(SystemExit, match=f"^error: .*{msg}"):
        rporec.main(small(tmp_path, "--dataset", "custom", "--data.interactions", inter, "--data.items", items))


def test_one_run_per_folder(tmp_path):
    """A second run on a folder in use stops at once with the holder's pid and writes nothing; once the holder
    is gone, its run.lock is taken over."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text("99999999 gone-host\n")  # left by a killed run: no one holds it
    files.lock_run(str(tmp_path / "run"))  # taken over
    assert (tmp_path / "run" / "run.lock").read_text().split()[0] == str(os.getpid())
    files.unlock_run(str(tmp_path / "run"))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from plumbing import files; files.lock_run(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(600)", str(tmp_path / "run")],
                              cwd=os.path.dirname(rporec.__file__), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=f"run is in use by another process \\(pid {holder.pid} on "):
            rporec.main(small(tmp_path, "--stage", "1"))
        assert sorted(os.listdir(tmp_path / "run")) == ["run.lock"] and not (tmp_path / "data").exists()
    finally:
        holder.kill()
        holder.wait()
    rporec.main(small(tmp_path, "--stage", "1", "--model", "none", "--ablate", "cot"))  # the folder is free again
    assert (tmp_path / "run" / "metrics.json").exists()


def _bad_values(rule, kind):
    """Flag texts that `rule` refuses for a field of type `kind`."""
    if isinstance(rule, flags.Range):
        integer = kind is int or int in typing.get_args(kind)
        out = [] if integer else ["nan", "inf"]
        if math.isfinite(rule.low):
            out.append(str(rule.low - (0 if rule.open in ("low", "both") and not integer else 1)))
        if math.isfinite(rule.high):
            out.append(str(rule.high + (0 if rule.open in ("high", "both") and not integer else 1)))
        return out
    if isinstance(rule, flags.OneOf):
        return ["nope"]
    if isinstance(rule, flags.Text):
        return [""]
    return []


def test_every_field_of_every_config_is_checked_before_any_work(tmp_path):
    """Walks every field of every config section: each is a setting() with its allowed values, and
    a value outside them stops the run before any write with an error naming the flag. Fields checked by their
    own code get a value of their own here; free fields are booleans and text."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    own = {"run.dataset": ["nope"], "run.out": [str(a_file / "run")], "run.init": [str(tmp_path / "nowhere")],
           "data.data_dir": [str(a_file)], "data.interactions": ["a.tsv"], "data.items": ["a.tsv"],
           "data.start": ["yesterday", "2030-01-01"], "data.end": ["2000-01-01"], "data.train_end": ["0", "0.95"],
           "data.valid_end": ["1", "nan"], "rewards.drop": ["fun"], "eval.ks": ["5,20", "0,10"]}
    cfg, checked = rporec.Config(), 0
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            key = f"{section.name}.{f.name}"
            assert "allowed" in f.metadata, f"{key} is no setting(): give it its allowed values"
            rule, kind = f.metadata["allowed"], typing.get_type_hints(type(obj))[f.name]
            bad = own.pop(key, []) + ([] if isinstance(rule, flags.Own) else _bad_values(rule, kind))
            if rule is None:
                assert kind is bool or str in (kind, *typing.get_args(kind)), f"{key} is free but not bool or text"
            flag = f"--{f.name}" if section.name == "run" else f"--{key}"
            for value in bad:
                extra = ["--stage", "2"] if key == "run.init" else []
                with pytest.raises(SystemExit) as e:
                    rporec.main(small(tmp_path, *extra, flag, value))
                assert (flag in str(e.value) or f"{flag[2:].split('.')[-1]}" in str(e.value)) and \
                    str(e.value).startswith("error:"), (key, value, str(e.value))
                assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists(), (key, value)
                checked += 1
    assert not own and checked > 100


def test_checks_that_need_the_data_come_before_any_model(tmp_path):
    with pytest.raises(SystemExit, match="toy has 191 items .*--rewards.negatives 500 asks .* at most 190 negatives"):
        rporec.main(small(tmp_path, "--rewards.negatives", "500"))
    with pytest.raises(SystemExit, match="encoder dimension 64 is not divisible by heads=3"):
        rporec.main(small(tmp_path, "--rechead.heads", "3", "--out", str(tmp_path / "other")))
    assert not list((tmp_path / "data" / "toy").glob("backbone-*"))  # the big model never loaded


def test_a_moved_run_folder_resumes_with_its_data_elsewhere(both_run, tmp_path):
    """Paths are not a run's identity: a run folder copied elsewhere resumes there, reading the same data from
    another --data.data_dir."""
    run = copy_run(both_run, tmp_path / "c") / "run"
    rporec.main(small(tmp_path / "c", "--stage", "2", "--init", str(run), "--grpo.steps", "3", "--grpo.eval_every", "1",
                      "--grpo.eval_samples", "8", "--resume"))
    assert [json.loads(line)["step"] for line in open(run / "log.jsonl") if '"reward"' in line] == [1, 2, 3]


def test_stage2_refuses_an_unfinished_stage1(both_run, tmp_path, monkeypatch):
    """A Stage I killed during Rechead training leaves rechead.pt of its best epoch so far: Stage II refuses it and
    says how to finish it; the finished rerun is taken."""
    real, calls = rporec.evaluate_split, []

    def killed_in_epoch_1(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rporec, "evaluate_split", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        rporec.main(on_data(small(tmp_path, "--stage", "1", "--rechead.epochs", "3"), both_run))
    assert (tmp_path / "run" / "rechead.pt").exists()
    monkeypatch.setattr(rporec, "evaluate_split", real)
    stage2 = small(tmp_path / "b", "--stage", "2", "--init", str(tmp_path / "run"), "--rechead.epochs", "3")
    with pytest.raises(SystemExit, match=f"--init {tmp_path / 'run'}: its Stage I did not finish .*epoch 0.* Finish "
                                         f"it with `python rporec.py --stage 1 --out {tmp_path / 'run'}`"):
        rporec.parse_config(stage2)
    rporec.main(on_data(small(tmp_path, "--stage", "1", "--rechead.epochs", "3"), both_run))
    assert rporec.parse_config(stage2).run.init == str(tmp_path / "run")


def test_stage2_refuses_a_stage1_run_on_other_data(both_run, tmp_path):
    other = small(tmp_path, "--stage", "2", "--init", str(both_run / "run"), "--data.seed", "1")
    with pytest.raises(SystemExit, match=r"is a Stage I run on other data \(data.seed: 0 -> 1\)"):
        rporec.parse_config(other)
    cfg = rporec.parse_config(small(tmp_path, "--data.seed", "1"))  # and if the files say nothing of it
    head = rporec.make_head(cfg, rporec.data.load_dataset(cfg.data))
    with pytest.raises(SystemExit, match="rechead.pt does not fit this run's Rechead .*size mismatch"):
        checkpoint.restore_rechead(head, str(both_run / "run"))


def test_resume_after_stage1_does_not_rerun_it(both_run, tmp_path, monkeypatch):
    """`--stage both --resume` continues Stage II and never runs Stage I again; log.jsonl gains no line twice, and
    a last line cut short by a full disk does not stop it."""
    run = copy_run(both_run, tmp_path / "c") / "run"
    before = (run / "log.jsonl").read_text()
    with open(run / "log.jsonl", "a") as f:
        f.write('{"stage": 2, "step": 3, "rew')  # an append that met a full disk
    monkeypatch.setattr(rporec, "stage1", lambda *a: pytest.fail("Stage I ran again"))
    m = rporec.main(small(tmp_path / "c", "--grpo.steps", "2", "--grpo.eval_every", "1", "--grpo.eval_samples", "8",
                          "--resume"))
    b, a = ([json.loads(line) for line in text.splitlines()] for text in (before, (run / "log.jsonl").read_text()))
    same = lambda recs: [r for r in recs if r["stage"] not in ("final", "run")]
    assert same(a) == same(b)  # the final evaluation's lines replaced, one line for this invocation added
    assert [r["split"] for r in a if r["stage"] == "final"] == ["valid", "test"]
    assert sum(r["stage"] == "run" for r in a) == sum(r["stage"] == "run" for r in b) + 1
    assert m["stage1"] == json.load(open(both_run / "run" / "metrics.json"))["stage1"]


def test_resume_after_stage1_alone_starts_stage2(both_run, tmp_path, monkeypatch):
    """Killed after Stage I finished and before Stage II's first checkpoint: --resume starts Stage II at step 0
    on the finished Stage I, which it does not run again."""
    rporec.main(on_data(small(tmp_path, "--stage", "1"), both_run))
    stage1_lines = (tmp_path / "run" / "log.jsonl").read_text()
    monkeypatch.setattr(rporec, "stage1", lambda *a: pytest.fail("Stage I ran again"))
    rporec.main(on_data(small(tmp_path, "--grpo.steps", "1", "--resume"), both_run))
    lines = (tmp_path / "run" / "log.jsonl").read_text()
    assert lines.startswith(stage1_lines) and lines.count('"stage": 1') == stage1_lines.count('"stage": 1')
    assert [json.loads(line)["step"] for line in lines.splitlines() if '"reward"' in line] == [1]


def test_sigterm_in_stage2_checkpoints_the_step_and_resumes_to_the_same_run(tmp_path, monkeypatch):
    """SIGTERM (a scheduler's notice) during step 2 with no checkpoint due before step 50: the step finishes, is
    checkpointed, the run exits 143 saying how to go on; --resume then ends with an uninterrupted run's weights,
    metrics and log. Nothing is lost."""
    import signal
    flags = ("--grpo.steps", "4", "--grpo.save_every", "50", "--grpo.eval_every", "2")
    straight = rporec.main(small(tmp_path / "a", *flags))
    real, steps = rewards.score, []

    def preempted(*a):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)

    monkeypatch.setattr(rewards, "score", preempted)
    with pytest.raises(SystemExit) as e:
        rporec.main(on_data(small(tmp_path / "b", *flags), tmp_path / "a"))
    assert e.value.code == 128 + signal.SIGTERM
    run = tmp_path / "b" / "run"
    assert torch.load(run / "ckpt" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with Stage II
    monkeypatch.setattr(rewards, "score", real)
    resumed = rporec.main(on_data(small(tmp_path / "b", *flags, "--resume"), tmp_path / "a"))
    cost, straight_cost = resumed.pop("cost"), straight.pop("cost")  # time differs, and so does the work:
    assert resumed == straight  # one more checkpoint, at the signal; the stopped invocation logs no "run" line
    assert (cost["checkpoint"]["count"], cost["run"]["count"]) == (straight_cost["checkpoint"]["count"] + 1, 1)
    assert cost["grpo_step"]["count"] == straight_cost["grpo_step"]["count"] == 4
    from transformers import AutoModelForCausalLM
    a, b = (AutoModelForCausalLM.from_pretrained(p / "run" / "ckpt").state_dict() for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = lambda p: [line for line in open(p / "run" / "log.jsonl") if '"stage": 2' in line]
    # the cost fields: seconds, rates, memory, and what was generated (b reads a's reasoning cache)
    timing = lambda k: k == "s" or k.endswith("_s") or k in ("peak_gib", "samples", "prompt_tokens", "tokens")
    strip = lambda lines: [{k: v for k, v in json.loads(line).items() if not timing(k)} for line in lines
                           if json.loads(line).get("phase") != "checkpoint"]
    assert strip(log(tmp_path / "a")) == strip(log(tmp_path / "b"))


def test_a_second_signal_stops_at_once():
    import signal
    with Preemption() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("passes", ["1", "4"])
def test_an_update_that_breaks_the_weights_stops_the_run(both_run, tmp_path, passes):
    """--grpo.lr 1e10: the gradient is finite, the update is not NaN, but the weights it leaves give NaN outputs.
    The run stops after that step with the fix, saves nothing of it, and does not advise a --resume; also when
    the broken weights make a later pass's gradient non-finite (--grpo.iterations 4), which stops the step."""
    with pytest.raises(SystemExit) as e:
        rporec.main(on_data(small(tmp_path, "--stage", "2", "--init", str(both_run / "run"), "--grpo.lr", "1e10",
                                  "--grpo.steps", "3", "--grpo.iterations", passes, "--rewards.drop", "fmt"),
                            both_run))  # rewards that vary
        # in a group, even where the barely taught backbone of --limit 48 misses the format: a gradient
    msg = str(e.value)
    assert msg.startswith("error: step 1's update broke the weights") and "--grpo.lr 1e+10 far too high" in msg
    assert "No checkpoint was written yet" in msg and "--resume" not in msg
    assert not (tmp_path / "run" / "ckpt").exists()
    from transformers import AutoModelForCausalLM
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best").state_dict()
    start = AutoModelForCausalLM.from_pretrained(toy_model(both_run, "backbone")).state_dict()
    assert all(torch.equal(best[k], start[k]) for k in start)  # step 0, not the broken weights
