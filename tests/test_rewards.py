import math

import pytest
import torch

import rewards as W

GOOD = "<think>I like jazz.</think><answer>'title': Kind of Blue</answer>"


@pytest.mark.parametrize("text,think,answer", [
    (GOOD, "I like jazz.", "'title': Kind of Blue"),
    ("<think> a </think>\n\n<answer> b </answer>", "a", "b"),            # stripped
    ("<think>reasoning that was cut off", None, None),                   # no </think>
    ("<think>only a CoT</think>", "only a CoT", None),                   # CoT, no answer
    ("<think>x</think><answer>unclosed", "x", None),
    ("<answer>z</answer>", None, "z"),                                   # no think block
    ("<think></think><answer></answer>", "", ""),                        # empty pairs -> ""
    ("<think>y <answer>inner</answer></think><answer>z</answer>", "y <answer>inner</answer>", "z"),
    ("<think>a</think><think>b</think><answer>c</answer><answer>d</answer>", "a", "c"),
    ("pre <think>y</think> mid <answer>z</answer> post", "y", "z"),
    ("no tags at all", None, None),
])
def test_parse_completion(text, think, answer):
    assert W.parse_completion(text) == (think, answer)


@pytest.mark.parametrize("text,expected", [
    (GOOD, 1.0),
    ("\n<think>y</think>\n\n<answer>z</answer>\n", 1.0),
    ("pre <think>y</think> mid <answer>z</answer> post", 1.0),  # outside text: r_clean's job
    ("<think>y</think>", 0.0),                                   # missing answer
    ("<answer>z</answer>", 0.0),                                 # missing think
    ("<think>y</think><answer>z", 0.0),                          # missing </answer>
    ("<think>y<answer>z</answer></think>", 0.0),                 # answer nested in think
    ("<think>y</think><answer>z <think>w</think></answer>", 0.0),  # repeated think, nested
    ("<think>y</think><answer>z</answer><answer>z</answer>", 0.0),  # repeated answer
    ("<think>a</think><think>b</think><answer>z</answer>", 0.0),    # repeated think
    ("<answer>z</answer><think>y</think>", 0.0),                 # wrong order
    ("</think>y<think><answer>z</answer>", 0.0),                 # swapped think tags
    ("<think> </think><answer>z</answer>", 0.0),                 # empty think
    ("<think>y</think><answer>\n</answer>", 0.0),                # empty answer
    ("no tags at all", 0.0),
])
def test_format_reward(text, expected):
    assert W.format_reward(text) == expected


def test_clean_reward_known_l_out():
    assert W.clean_reward(GOOD) == 1.0
    assert W.clean_reward("\n<think>y</think>\n\n<answer>z</answer>\n  ") == 1.0  # whitespace only
    assert W.clean_reward("Sure! <think>y</think><answer>z</answer>") == pytest.approx(0.95)  # 5
    assert W.clean_reward("<think>y</think>ab c<answer>z</answer>") == pytest.approx(0.97)
    assert W.clean_reward("<think>y</think><answer>z</answer>" + "x" * 40) == pytest.approx(0.6)
    assert W.clean_reward("<think>y</think><answer>z</answer>" + "x" * 250) == 0.0  # clipped at 0
    assert W.clean_reward("abc def", kappa=10) == pytest.approx(0.4)  # no tags: all 6 count
    # a second answer block lies outside the blocks: 18 characters of "<answer>c</answer>"
    text = "<think>a</think><answer>b</answer><answer>c</answer>"
    assert W.clean_reward(text) == pytest.approx(1 - 18 / 100)
    # unclosed think: no think block, so the whole "<think>yy" counts
    assert W.clean_reward("<think>yy <answer>z</answer>") == pytest.approx(1 - 9 / 100)
    with pytest.raises(ValueError, match="kappa"):
        W.clean_reward(GOOD, kappa=0)


def test_ndcg_reward():
    assert W.ndcg_reward(1) == 1.0
    assert W.ndcg_reward(3) == pytest.approx(0.5)
    assert W.ndcg_reward(50) == pytest.approx(1 / math.log2(51))
    with pytest.raises(ValueError, match="1-based"):
        W.ndcg_reward(0)


def test_candidates_deterministic_distinct_and_valid():
    n_items, k = 60, 49
    for index in range(20):
        target = 1 + index % n_items
        c = W.candidates(index, target, n_items, k, seed=7)
        assert c.shape == (k + 1,) and c.dtype == torch.long
        assert int(c[0]) == target
        neg = c[1:]
        assert len(set(neg.tolist())) == k                        # distinct
        assert int(neg.min()) >= 1 and int(neg.max()) <= n_items  # never the pad item 0
        assert target not in neg.tolist()
        assert torch.equal(c, W.candidates(index, target, n_items, k, seed=7))  # fixed per sample
    first = W.candidates(0, 5, 1000, 49, seed=0)
    assert not torch.equal(first, W.candidates(1, 5, 1000, 49, seed=0))  # other sample
    assert not torch.equal(first, W.candidates(0, 5, 1000, 49, seed=1))  # other seed
    # all n_items - 1 negatives when k is the maximum, target excluded
    assert sorted(W.candidates(3, 4, 10, 9, seed=0)[1:].tolist()) == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="negatives"):
        W.candidates(0, 1, 10, 10, seed=0)
    with pytest.raises(ValueError, match="target"):
        W.candidates(0, 0, 10, 3, seed=0)


def test_candidate_rank_ties_count_in_favour():
    assert W.candidate_rank(torch.tensor([0.5, 0.1, 0.2])) == 1
    assert W.candidate_rank(torch.tensor([0.5, 0.9, 0.5, 0.7])) == 3  # tie is not "higher"


def test_similarity_reward_is_strict():
    assert W.similarity_reward(0.51) == 1.0
    assert W.similarity_reward(0.5) == 0.0
    assert W.similarity_reward(0.49) == 0.0
    assert W.similarity_reward(0.8, delta=0.9) == 0.0


def test_compression_reward_clips():
    assert W.compression_reward(10, 40) == pytest.approx(0.25)
    assert W.compression_reward(60, 40) == 1.0
    assert W.compression_reward(0, 40) == 0.0
    assert W.compression_reward(5, 0) == 0.0


def test_entropy_reward_matches_direct_computation():
    e = torch.tensor([0.1, 2.0, 0.3, 0.4, 1.5, 0.2, 0.0, 0.9, 0.5, 0.6])  # n=10 -> top 2
    expected = (2.0 + 1.5) / 2 - float(e.mean())
    assert W.entropy_reward(e) == pytest.approx(expected, abs=1e-6)
    assert W.entropy_reward(torch.tensor([0.7])) == pytest.approx(0.0)  # n=1: top = all
    assert W.entropy_reward(torch.zeros(0)) == 0.0
    e15 = torch.arange(15.0)  # ceil(0.2 * 15) = 3 exactly, despite 0.2 * 15 = 3.0000000000000004
    assert W.entropy_reward(e15) == pytest.approx((14 + 13 + 12) / 3 - 7.0)
    e11 = torch.arange(11.0)  # ceil(2.2) = 3
    assert W.entropy_reward(e11) == pytest.approx((10 + 9 + 8) / 3 - 5.0)


def test_total_reward_eq7_and_gate():
    parts = {"fmt": 1.0, "clean": 0.5, "ndcg": 0.4, "sim": 1.0, "comp": 0.3, "ent": 0.2}
    w = W.RewardConfig().weights()
    expected = 0.1 * 1 + 0.1 * 0.5 + 0.5 * 0.4 + 0.1 * 1.0 + 0.1 * 0.3 + 0.1 * 0.2
    assert W.total_reward(parts, w) == pytest.approx(expected)
    assert W.total_reward({**parts, "fmt": 0.0}, w) == 0.0  # r_fmt gate
    assert W.total_reward({**parts, "fmt": 0.0}, w, gate=False) == pytest.approx(expected - 0.1)
    with pytest.raises(ValueError, match="missing"):
        W.total_reward({"fmt": 1.0}, w)


def test_reward_config_weights_and_drop():
    cfg = W.RewardConfig()
    assert cfg.weights() == {"fmt": 0.1, "clean": 0.1, "ndcg": 0.5, "sim": 0.1, "comp": 0.1,
                             "ent": 0.1}
    assert cfg.gate
    cfg = W.RewardConfig(drop="sim, -comp")
    assert cfg.weights()["sim"] == 0.0 and cfg.weights()["comp"] == 0.0
    assert cfg.weights()["ndcg"] == 0.5 and cfg.gate
    cfg = W.RewardConfig(drop="fmt")
    assert cfg.weights()["fmt"] == 0.0 and not cfg.gate
    parts = {"fmt": 0.0, "clean": 1.0, "ndcg": 1.0, "sim": 0.0, "comp": 0.0, "ent": 0.0}
    assert W.total_reward(parts, cfg.weights(), cfg.gate) == pytest.approx(0.6)  # -fmt: no gate
    with pytest.raises(ValueError, match="unknown reward term"):
        W.RewardConfig(drop="fmt,bogus").weights()


def test_summary_messages():
    msgs = W.summary_messages("The user likes jazz.")
    assert msgs[-1]["role"] == "user"
    assert "The user likes jazz." in msgs[-1]["content"]
    assert msgs[-1]["content"].startswith(W.SUMMARY_PROMPT.split("{cot}")[0])


class CharTokenizer:
    """Tiny stand-in tokenizer: ids are indices into a vocabulary of string pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def batch_decode(self, seqs):
        return ["".join(self.pieces[i] for i in s) for s in seqs]


def test_cot_token_mask():
    vocab = ["<pad>", "<think>", "</think>", "<answer>", "</answer>", "I ", "like ", "jazz", "\n",
             "X", "</th", "ink>"]
    tok = CharTokenizer(vocab)
    # "<think>" "I " "like " "jazz" "</think>" "\n" "<answer>" "X" "</answer>" pad pad
    ids = torch.tensor([1, 5, 6, 7, 2, 8, 3, 9, 4, 0, 0])
    mask = torch.tensor([True] * 9 + [False] * 2)
    got = W.cot_token_mask(ids, mask, tok)
    assert got.tolist() == [False, True, True, True] + [False] * 7
    # a close tag split over two tokens is still found; padding never counts
    ids = torch.tensor([0, 1, 5, 10, 11, 3, 9, 4])
    mask = torch.tensor([False] + [True] * 7)
    assert W.cot_token_mask(ids, mask, tok).tolist() == [False, False, True] + [False] * 5
    # no complete think block: the CoT is everything before <answer>, as rporec.split_reasoning reads y
    ids = torch.tensor([1, 5, 6, 7])
    assert W.cot_token_mask(ids, torch.ones(4, dtype=torch.bool), tok).all()
    ids = torch.tensor([5, 6, 3, 9, 4, 0])
    assert W.cot_token_mask(ids, ids != 0, tok).tolist() == [True, True, False, False, False, False]


def test_cot_token_mask_with_byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<think>", "</think>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the user likes jazz and café music", "answer title rating"] * 20
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>")
    text = "<think>The user likes jazz café</think>\n<answer>'title': Blue</answer>"
    ids = torch.tensor(tok(text)["input_ids"] + [tok.pad_token_id] * 3)
    mask = ids != tok.pad_token_id
    got = W.cot_token_mask(ids, mask, tok)
    assert tok.decode(ids[got]) == "The user likes jazz café"
    assert not got[-3:].any()
