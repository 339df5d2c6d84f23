"""The card rehearsal's path on the CPU: the stand-in backbone built in code (--model random:NAME), the cost that
every run measures (log.jsonl, metrics.json "cost") and the projection of the paper runs from it."""
import json
import math

import pytest
import torch
from test_rporec import small

import rporec
from plumbing import flags, toy
from plumbing.cost import STEP_PARTS, cost_summary
from tools import bench

TEXTS = ["Toy Story (1995) Animation", "Heat (1995) Crime Thriller", "Recommend the next movie: <answer>"]


def test_standin_tokenizer_has_the_real_size_ids_and_template():
    tok = toy.standin_tokenizer("Qwen3-0.6B", TEXTS)
    assert len(tok) == toy.STANDINS["Qwen3-0.6B"]["vocab_size"] == 151936
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [151643, 151644, 151645, 151667, 151668]  # Qwen3's own ids
    assert tok.pad_token_id == 151643 and tok.eos_token_id == 151645
    msgs = [{"role": "user", "content": "Toy Story"}]
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\nToy Story<|im_end|>\n<|im_start|>assistant\n"  # Qwen3's template, no tools
    assert off == on + "<think>\n\n</think>\n\n"
    assert tok("Heat (1995)", add_special_tokens=False).input_ids == tok.convert_tokens_to_ids(
        ["heat", "(", "1", "9", "9", "5", ")"])  # words known, digits one by one as Qwen splits them
    # the think tags survive skip_special_tokens (rewards read them); the special tokens do not
    text = tok.decode([151667, ids[1], tok.convert_tokens_to_ids("heat"), 151668, 151700], skip_special_tokens=True)
    assert text.split() == ["<think>", "heat", "</think>"]


def test_standin_noise_decodes_to_text_of_the_same_length():
    """A completion re-encodes to as many tokens (r_comp counts them; the summary prompt holds them)."""
    tok = toy.standin_tokenizer("tiny", TEXTS)
    noise = torch.randint(0, 1900, (200,), generator=torch.Generator().manual_seed(0)).tolist()  # ordinary ids
    assert tok(tok.decode(noise), add_special_tokens=False).input_ids == noise


def test_standin_model_is_the_named_architecture_and_leaves_the_rng_alone():
    state = torch.get_rng_state()
    model, tok = toy.build_standin("tiny", TEXTS, torch.float32, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    again, _ = toy.build_standin("tiny", TEXTS, torch.float32, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    arch = toy.STANDINS["tiny"]
    assert model.config.vocab_size == len(tok) == arch["vocab_size"]
    assert model.config.num_hidden_layers == arch["num_hidden_layers"] and model.config.tie_word_embeddings
    g = model.generation_config
    assert (g.temperature, g.top_p, g.top_k, sorted(g.eos_token_id)) == (0.6, 0.95, 20, [1900, 1902])


def test_unknown_standin_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="random:NAME with NAME one of Qwen3-0.6B, tiny"):
        rporec.main(small(tmp_path, "--model", "random:Qwen9"))
    assert not (tmp_path / "run").exists()


def test_standin_runs_both_stages_and_every_phase_is_costed(tmp_path, capsys):
    m = rporec.main(small(tmp_path, "--model", "random:tiny", "--grpo.steps", "2", "--grpo.eval_every", "1"))
    out = capsys.readouterr().out
    assert "stand-in backbone random:tiny" in out and "run.model=random:tiny" in out
    assert '"run": {' not in out  # the config prints compactly; config.json holds all of it
    cost = json.load(open(tmp_path / "run" / "metrics.json"))["cost"]
    assert cost == m["cost"]
    assert set(cost) == {"reasoning", "rechead_epoch", "stage2_eval", "grpo_step", "grpo_rollout", "grpo_rewards",
                         "grpo_update", "checkpoint", "final_eval", "run"}
    assert cost["reasoning"]["count"] == 3 and cost["reasoning"]["samples"] == 3 * 48  # --limit 48
    assert cost["reasoning"]["tokens"] == 3 * 48 * 8  # noise runs to the 8-token cap
    assert cost["grpo_step"]["count"] == 2 and cost["stage2_eval"]["count"] == 3  # steps 0, 1, 2
    assert cost["grpo_rollout"]["tokens"] == 2 * 2 * 4 * 8  # 2 steps x 2 prompts x G 4 x 8 tokens
    parts = sum(cost[f"grpo_{p}"]["s"] for p in STEP_PARTS)
    assert 0 < parts <= cost["grpo_step"]["s"] + 0.01
    steps = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    steps = [r for r in steps if r.get("phase") == "grpo_step"]
    for key in ("rollout_s", "rewards_s", "update_s", "tokens", "tok_s", "s"):
        assert all(key in r for r in steps), key
    proj = bench.project(m["cost"], 13435)
    assert proj["steps"] == 1344 and proj["evals"] == 28 and proj["seconds"]["total"] > 0


def test_cost_summary_sums_phases_and_splits_steps():
    recs = [{"stage": 1, "phase": "reasoning", "s": 2.0, "samples": 4, "tokens": 40, "peak_gib": 3.0},
            {"stage": 1, "phase": "reasoning", "s": 3.0, "samples": 6, "tokens": 60, "peak_gib": 5.0},
            {"stage": 1, "epoch": 0, "loss": 1.0},  # no phase: not a cost line
            {"stage": 2, "step": 1, "phase": "grpo_step", "s": 10.0, "rollout_s": 6.0, "rewards_s": 1.0,
             "update_s": 2.5, "tokens": 300, "peak_gib": 7.0}]
    c = cost_summary(recs)
    assert c["reasoning"] == {"count": 2, "s": 5.0, "samples": 10, "tokens": 100, "peak_gib": 5.0, "samples_s": 2.0,
                              "tokens_s": 20.0}
    assert c["grpo_step"]["tokens"] == c["grpo_rollout"]["tokens"] == 300 and "tokens" not in c["grpo_update"]
    assert c["grpo_rollout"]["tokens_s"] == 50.0 and c["grpo_update"] == {"count": 1, "s": 2.5, "peak_gib": 7.0}


def test_projection_arithmetic():
    """By hand: 1,000 samples = 800 train, 100 steps of 8 prompts, evaluations at 0, 50, 100."""
    cost = {"reasoning": {"count": 3, "s": 30.0, "samples": 300, "tokens": 300 * 384},  # 0.1 s at 384 tokens
            "rechead_epoch": {"count": 2, "s": 4.0, "samples": 2000},  # 2 ms per sample-epoch
            "grpo_step": {"count": 4, "s": 20.0},  # 5 s per step
            "stage2_eval": {"count": 2, "s": 8.0, "samples": 20, "tokens": 20 * 768},  # 0.4 s per sample
            "checkpoint": {"count": 1, "s": 3.0},
            "final_eval": {"count": 2, "s": 0.1, "samples": 0, "tokens": 0}}  # cached: Stage I's rate
    p = bench.project(cost, 1000, bench.PaperRun(rechead_epochs=10))
    assert (p["steps"], p["evals"]) == (100, 3)
    s = p["seconds"]
    assert math.isclose(s["stage1_reasoning"], 1000 * 0.2)  # 0.1 s per sample doubled to 768 tokens
    assert math.isclose(s["rechead"], 800 * 10 * 0.002)
    assert math.isclose(s["grpo_steps"], 100 * 5.0)
    assert math.isclose(s["stage2_evals"], 3 * 512 * 0.4)
    assert math.isclose(s["checkpoints"], 2 * 3.0)
    assert math.isclose(s["final_eval"], 200 * 0.2)
    assert math.isclose(s["total"], sum(v for k, v in s.items() if k != "total"))
    with pytest.raises(ValueError, match="no count in phase 'grpo_step'"):
        bench.project({k: v for k, v in cost.items() if k != "grpo_step"}, 1000)
    assert "| total |" in bench.projection_table(cost)
    paper = {"grpo": {"group_size": 4, "prompts_per_step": 8, "max_new_tokens": 768}}
    assert bench.step_mismatch(paper) == {}
    assert bench.step_mismatch({"grpo": {**paper["grpo"], "group_size": 8}}) == {"group_size": 8}


def test_changed_lists_only_what_differs():
    cfg = rporec.parse_config(["--grpo.beta", "0.01"])
    assert "grpo.beta=0.01" in flags.changed(cfg, rporec.Config())
    assert not any(f.startswith("grpo.lr") for f in flags.changed(rporec.parse_config(["--dataset", "cds"]),
                                                                  rporec.Config()))
