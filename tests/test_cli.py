"""What a user meets at the command line: flags (mistyped, repeated, contradicting), refusals that name the
right flag and leave nothing behind, one error line instead of a traceback, the thread count, progress in a
log file, the lock of a finished run, and a resume that rebuilds a deleted metrics.json."""
import json
import os
import subprocess
import sys

import pytest
import torch
from test_rporec import small

import rewards
import rporec
from plumbing import flags, report
from tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(flags, match):
    with pytest.raises(SystemExit, match=match) as e:
        rporec.main(flags)
    assert str(e.value).startswith("error:") and "\n" not in str(e.value), str(e.value)


def test_a_mistyped_flag_suggests_the_nearest_one(tmp_path):
    refused(small(tmp_path, "--grpo.step", "3"), "unknown flag --grpo.step; did you mean --grpo.steps")
    refused(small(tmp_path, "--sed", "3"), "did you mean --seed")
    refused(small(tmp_path, "--zzzzzz", "3"), r"unknown flag --zzzzzz; --help lists")
    assert not (tmp_path / "run").exists()


def test_a_flag_given_twice_is_refused(tmp_path):
    refused(small(tmp_path, "--seed", "1", "--seed", "2"), "--seed is given twice")
    refused(small(tmp_path, "--grpo.beta", "0", "--grpo.beta=0"), "--grpo.beta is given twice")


def test_an_empty_data_dir_and_an_init_without_stage_2_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(["--data.data_dir", "", "--out", str(tmp_path / "run")], "--data.data_dir must be a folder")
    refused(small(tmp_path, "--init", str(tmp_path), "--stage", "1"), "--init is read by --stage 2 alone")
    refused(small(tmp_path, "--init", str(tmp_path)), r"--init is read by --stage 2 alone \(got --stage both\)")
    assert os.listdir(tmp_path) == []  # nothing written, in the run folder or the working directory


@pytest.mark.parametrize("flags,match", [
    (("--rewards.negatives", "5000", "--grpo.steps", "1"), "--rewards.negatives 5000 asks"),
    (("--stage", "1", "--rechead.heads", "3"), "not divisible by heads=3"),
    (("--stage", "1", "--rechead.encoder", "/nonexistent/encoder"), r"could not load the encoder .*--rechead.enc"),
    (("--stage", "1", "--model", "/nonexistent/backbone"), "could not load the backbone"),
])
def test_a_refused_start_leaves_nothing_and_the_fixed_command_runs_there(tmp_path, flags, match):
    refused(small(tmp_path, *flags), match)
    assert not (tmp_path / "run").exists()  # neither config.json nor run.lock: the folder it made is gone
    fixed = [f for f in flags if f not in ("--rewards.negatives", "5000", "--rechead.heads", "3", "--rechead.encoder",
                                           "/nonexistent/encoder", "--model", "/nonexistent/backbone")]
    rporec.main(small(tmp_path, *fixed))  # the same --out, the flag dropped
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_refused_start_in_an_existing_folder_keeps_what_was_there(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    refused(small(tmp_path, "--stage", "1", "--rechead.heads", "3"), "not divisible by heads=3")
    assert os.listdir(tmp_path / "run") == ["notes.txt"]


def test_a_finished_run_leaves_no_lock(tmp_path):
    rporec.main(small(tmp_path, "--stage", "1", "--model", "none", "--ablate", "cot"))
    assert not (tmp_path / "run" / "run.lock").exists()


@pytest.mark.parametrize("flags,match", [
    (("--data.toy_users", "1"), r"toy has \d+ items \(--data.toy_users readers\)"),
    (("--data.train_end", "0.0001", "--data.valid_end", "0.5"), "leave the train split"),
    (("--grpo.weight_decay", "1e30"), "--grpo.weight_decay 1e.30 with --grpo.lr"),
    (("--grpo.temperature", "1e-300"), "--grpo.temperature must be a finite number in"),
    (("--decode.temperature", "1e-300"), "--decode.temperature must be a finite number in"),
])
def test_each_refusal_names_the_flag_to_change(tmp_path, flags, match):
    refused(small(tmp_path, *flags), match)
    assert not (tmp_path / "run").exists()


def test_a_diverging_rechead_is_one_error_line_not_a_traceback(tmp_path):
    refused(small(tmp_path, "--stage", "1", "--rechead.lr", "1e30"), r"the Rechead diverged in epoch 0 .*lower "
            "--rechead.lr")


def test_a_truncated_best_backbone_is_one_error_line(tmp_path):
    flags = ("--grpo.steps", "2", "--grpo.eval_every", "1")
    rporec.main(small(tmp_path, *flags))
    weights = tmp_path / "run" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "run" / "metrics.json").unlink()
    refused(small(tmp_path, *flags, "--resume"), r"the best step's backbone in .*best does not load")


def test_one_thread_by_default_whatever_torch_was_given(tmp_path):
    """--threads 1 (the default) fixes torch's intra-op threads, so a run prints the same numbers on a
    machine of any size and load; --threads 0 leaves torch's default."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = rporec.main(small(tmp_path / "a", "--stage", "1"))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(1)
        b = rporec.main(small(tmp_path / "b", "--stage", "1"))
        for m in (a, b):
            m.pop("cost")
        assert a == b
        torch.set_num_threads(2)
        rporec.main(small(tmp_path / "c", "--stage", "1", "--model", "none", "--ablate", "cot", "--threads", "0"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_resume_rebuilds_the_metrics_of_a_deleted_metrics_json(tmp_path):
    flags = ("--grpo.steps", "2", "--grpo.eval_every", "1")
    whole = rporec.main(small(tmp_path, *flags))
    (tmp_path / "run" / "metrics.json").unlink()
    again = rporec.main(small(tmp_path, *flags, "--resume"))
    for key in ("stage1", "popularity", "transition", "stage2"):
        assert again[key] == whole[key], key


def test_progress_in_a_log_file_is_plain_lines(tmp_path):
    """With output to a file, progress comes as a few whole lines, not carriage-return redraws."""
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "rporec.py", *small(tmp_path, "--stage", "1")], cwd=ROOT, stdout=f,
                       stderr=subprocess.STDOUT, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
    text = log.read_text()
    assert "\r" not in text and "stage1  test" in text
    assert len(text) < 20_000, len(text)


def test_progress_lines_come_now_and_then(capsys, monkeypatch):
    monkeypatch.setattr(report, "LINE_EVERY", 0)
    bar = report._Lines(range(3), desc="work", file=sys.stdout)
    for _ in bar:
        pass
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("work:") for line in lines) and "3/3" in lines[-1]


def test_the_stage2_plot_leaves_dropped_rewards_out():
    assert list(rewards.RewardConfig(drop="fmt,sim").labels()) == ["clean", "ndcg", "comp", "ent"]
    assert list(rewards.RewardConfig().labels()) == list(rewards.TERMS)


def test_a_projection_from_cached_reasoning_takes_another_generation_rate():
    cost = {"reasoning": {"count": 3, "s": 0.3, "samples": 0, "tokens": 0},  # every CoT from the cache
            "rechead_epoch": {"count": 2, "s": 4.0, "samples": 2000}, "grpo_step": {"count": 4, "s": 20.0},
            "stage2_eval": {"count": 2, "s": 8.0, "samples": 20, "tokens": 20 * 768},  # 0.4 s per sample
            "checkpoint": {"count": 1, "s": 3.0}, "final_eval": {"count": 2, "s": 0.1, "samples": 0, "tokens": 0}}
    s = bench.project(cost, 1000)["seconds"]
    assert s["stage1_reasoning"] == pytest.approx(1000 * 0.4) and s["final_eval"] == pytest.approx(200 * 0.4)
    cost["stage2_eval"].update(samples=0, tokens=0)
    with pytest.raises(ValueError, match="generated no CoT"):
        bench.project(cost, 1000)


def without_torch(args):
    """rporec.py run with `import torch` made to fail: it answers only if it never loads torch."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['rporec.py', *sys.argv[1:]]; "
            "runpy.run_path('rporec.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_help_and_flag_errors_answer_before_torch_loads(capsys):
    rporec.parse_config([])  # a full parse writes the flag table
    res = without_torch(["--help"])
    assert res.returncode == 0, res.stderr[-500:]
    with pytest.raises(SystemExit):
        rporec.parse_config(["--help"])
    assert res.stdout == capsys.readouterr().out  # the table's help is the classes' own
    res = without_torch(["--grpo.step", "3"])
    assert res.returncode == 1 and res.stderr.strip() == ("error: unknown flag --grpo.step; did you mean "
                                                          "--grpo.steps? --help lists every flag")
    res = without_torch(["--rechead.lr", "-1"])
    assert res.stderr.strip() == "error: --rechead.lr must be a finite number > 0, got -1.0"


def test_a_stale_flag_table_is_not_used(tmp_path, monkeypatch):
    rporec.parse_config([])
    assert flags.load_table("rporec") is not None
    monkeypatch.setattr(flags, "_digest", lambda path: "changed")  # as if a config class were edited
    assert flags.load_table("rporec") is None
    assert flags.answer_early("rporec", ["--grpo.step", "3"], "") is None  # the full parse answers instead


def test_a_reasoning_cache_deleted_mid_run_is_one_error_line(tmp_path, monkeypatch):
    """The cache file removed while a split is generated (by hand, or another tool): one error line, and the
    rerun generates what is missing."""
    from plumbing import checkpoint
    real, calls = checkpoint.append_cache, []

    def append_then_delete(path, records):
        real(path, records)
        calls.append(path)
        if len(calls) == 2:
            os.remove(path)

    monkeypatch.setattr(checkpoint, "append_cache", append_then_delete)
    refused(small(tmp_path, "--stage", "1", "--gen_batch", "16"), r"train.jsonl lost \d+ of its 48 CoTs while")
    monkeypatch.setattr(checkpoint, "append_cache", real)
    rporec.main(small(tmp_path, "--stage", "1", "--gen_batch", "16"))


def test_a_run_folder_from_before_a_new_field_resumes(tmp_path):
    """config.json written before a field existed (here rechead.loss and run.threads): the field's default is
    what that run did, so a resume takes the folder."""
    flags = ("--grpo.steps", "2", "--grpo.save_every", "1")
    rporec.main(small(tmp_path, *flags, "--grpo.eval_every", "1"))
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    del saved["rechead"]["loss"], saved["run"]["threads"]
    path.write_text(json.dumps(saved))
    m = rporec.main(small(tmp_path, "--grpo.steps", "3", "--grpo.save_every", "1", "--grpo.eval_every", "1",
                          "--resume"))
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl") if '"reward"' in line] == \
        [1, 2, 3] and "stage2" in m
