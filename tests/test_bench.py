"""bench.py runs end to end on a tiny config: every section writes its numbers, greedy equivalence holds
in fp32 with and without a mid-batch EOS, and a failing section is recorded while the others still run."""
import json

import pytest

from tools import bench

SMALL = dict(batches=[1, 8], prompt_len=8, new_tokens=4, equiv_tokens=16, grpo_prompts=2, grpo_group=2,
             grpo_new_tokens=4, summary_new_tokens=3, repeats=1, model="tiny")


def test_bench_sections_write_results(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(bench.BenchConfig(out=str(out), sections="decode,equiv,grpo", baseline=True, **SMALL))
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert [r["batch"] for r in res["decode"]] == [1, 8]
    # a per-step time is positive, or None when a loaded machine's noise beat the signal: never negative
    times = [r[k] for r in res["decode"] for k in ("fast_ms_per_step", "base_ms_per_step", "hf_ms_per_step")]
    assert all(t is None or t > 0 for t in times)
    assert all(r["speedup"] is None or r["speedup"] > 0 for r in res["decode"])
    for name in ("float32_no_eos", "float32_eos_mid_batch"):
        eq = res["equiv"][name]
        assert eq["rows_identical"] == eq["rows"] == 8, eq
    lengths = res["equiv"]["float32_eos_mid_batch"]["hf_lengths"]
    assert 8 < min(lengths) < 16 == max(lengths)  # one row really stopped mid-way, others ran on
    assert res["kernels"] == "torch"  # auto on a CPU
    for g in (res["grpo"], res["grpo"]["baseline"]):  # the step now and as before the Triton kernels
        assert g["completions"] == 4 and g["step_s"] == pytest.approx(g["rollout_s"] + g["rewards_s"] + g["update_s"])
        assert g["completions_per_s"] == pytest.approx(4 / g["step_s"])
    assert (res["grpo"]["head_fp32"], res["grpo"]["baseline"]["head_fp32"]) == (False, True)


def test_failing_section_is_recorded_and_others_run(tmp_path, monkeypatch):
    def broken(model, bc):
        raise RuntimeError("boom")
    monkeypatch.setattr(bench, "decode_speed", broken)
    out = tmp_path / "b.json"
    res = bench.main(bench.BenchConfig(out=str(out), sections="decode,equiv", **SMALL))
    assert res["decode"] == {"error": "RuntimeError: boom"}
    assert res["equiv"]["float32_no_eos"]["rows_identical"] == 8
    assert json.loads(out.read_text())["decode"]["error"] == "RuntimeError: boom"


def test_left_align_rolls_padding_to_the_front():
    import torch
    tokens = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 1]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    ids, am = bench.left_align(tokens, mask)
    assert ids.tolist() == [[0, 0, 5, 6], [7, 8, 9, 1]] and am.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_flags_parse_like_rporec(monkeypatch):
    monkeypatch.setattr(bench, "GPU", False)
    bc = bench.parse_config(["--sections", "decode,equiv", "--model", "0.6b", "--out=x.json", "--prompt-len", "5"])
    assert (bc.sections, bc.model, bc.out, bc.prompt_len) == ("decode,equiv", "0.6b", "x.json", 5)
    assert bc.new_tokens == bench.CPU_SCALE["new_tokens"]  # unset sizes shrink on CPU
    assert bench.parse_config(["--batches", "1,8"]).batches == (1, 8)
    monkeypatch.setattr(bench, "GPU", True)
    assert bench.parse_config([]).new_tokens == bench.BenchConfig.new_tokens
    for argv, problem in ((["--sections", "decode", "equiv"], "comma-separated"), (["--sections", "fast"], "fast"),
                          (["--kernels", "cuda"], "kernels"),
                          (["--model", "7b"], "7b"), (["--new-tokens", "1"], "new_tokens")):
        with pytest.raises(SystemExit, match=problem):
            bench.parse_config(argv)


def test_trl_section_runs_or_names_what_is_missing(tmp_path):
    """TRL is optional (not in requirements.txt): without it the section is recorded as skipped, naming the
    import that failed, and the run goes on; where trl and datasets import, it measures TRL's step."""
    res = bench.main(bench.BenchConfig(out=str(tmp_path / "t.json"), sections="trl", **SMALL))
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        assert res["trl"] == {"skipped": f"trl or datasets does not import ({e}); optional: pip install trl datasets"}
        return
    assert res["trl"]["completions_per_s"] > 0 and res["trl"]["step_s"] > 0


def test_every_bench_field_is_checked():
    """Every BenchConfig field is a setting() with its allowed values, and a value outside them is refused, naming
    it."""
    import dataclasses
    import typing

    from test_trust import _bad_values
    own = {"bench.sections": ["fast"], "bench.batches": ["0,8"], "bench.project": ["/nonexistent/run"]}
    for f in dataclasses.fields(bench.BenchConfig):
        assert "allowed" in f.metadata, f.name
        rule = f.metadata["allowed"]
        if rule is bench.flags_lib.ANY:  # free: a boolean
            continue
        kind = typing.get_type_hints(bench.BenchConfig)[f.name]
        bad = own.pop(f"bench.{f.name}") if isinstance(rule, bench.flags_lib.Own) else _bad_values(rule, kind)
        assert bad, f.name
        for value in bad:
            with pytest.raises(SystemExit, match=f"^error: .*--{f.name}"):
                bench.parse_config([f"--{f.name}", value])
    assert not own
