import math
import random
import re

import pytest
import torch

import rewards

GOOD = "<think>I like jazz.</think><answer>'title': Kind of Blue</answer>"
# Qwen3 restates the format instruction while thinking, tag words included
QWEN = ("<think>\nThe user wants one item, inside <answer> and </answer>. They like jazz.\n</think>\n\n"
        "<answer>'title': Kind of Blue</answer>")
OFFICIAL = re.compile(r"([\s\S]*)<think>([\s\S]*)</think>([\s\S]*)<answer>([\s\S]*)</answer>([\s\S]*)", re.DOTALL)


@pytest.mark.parametrize("text,think,answer", [
    (GOOD, "I like jazz.", "'title': Kind of Blue"),
    ("<think> a </think>\n\n<answer> b </answer>", "a", "b"),            # stripped
    ("<think>reasoning that was cut off", None, None),                   # no </think>
    ("<think>only a CoT</think>", "only a CoT", None),                   # CoT, no answer
    ("<think>x</think><answer>unclosed", "x", None),
    ("<answer>z</answer>", None, "z"),                                   # no think block
    ("<think></think><answer></answer>", "", ""),                        # empty pairs -> ""
    ("<think>y <answer>inner</answer></think><answer>z</answer>", "y <answer>inner</answer>", "z"),
    ("<think>a</think><think>b</think><answer>c</answer><answer>d</answer>", "a", "d"),  # last answer
    ("pre <think>y</think> mid <answer>z</answer> post", "y", "z"),
    ("no tags at all", None, None),
    (QWEN, "The user wants one item, inside <answer> and </answer>. They like jazz.", "'title': Kind of Blue"),
    ("<think>y</think> I reply inside <answer> and </answer>: <answer>z</answer>", "y", "z"),  # restated after
    ("<think>x</think><answer>a</answer><answer>unclosed", "x", "a"),    # last complete pair
    ("<think>y</think><answer>a<answer>b</answer>", "y", "b"),            # last <answer> before </answer>
    ("<answer>a</answer><answer>b</answer>", None, "b"),                 # no think block: last anywhere
    ("<answer>z</answer><think>y</think>", "y", None),                   # an answer must follow the CoT
])
def test_parse_completion(text, think, answer):
    assert rewards.parse_completion(text) == (think, answer)


@pytest.mark.parametrize("text,expected", [
    (GOOD, 1.0),
    ("\n<think>y</think>\n\n<answer>z</answer>\n", 1.0),
    ("pre <think>y</think> mid <answer>z</answer> post", 1.0),  # outside text: r_clean's job
    ("<think>y</think>", 0.0),                                   # missing answer
    ("<answer>z</answer>", 0.0),                                 # missing think
    ("<think>y</think><answer>z", 0.0),                          # missing </answer>
    ("<think>y<answer>z</answer></think>", 0.0),                 # answer nested in think, none after
    ("<think>y</think><answer>z <think>w</think></answer>", 1.0),  # tags inside z: official regex accepts
    ("<think>y</think><answer>z</answer><answer>z</answer>", 1.0),  # repeated answer: the last is z
    ("<think>a</think><think>b</think><answer>z</answer>", 1.0),    # repeated think: y = "a"
    ("<think>y</think><answer>z</answer><answer> </answer>", 0.0),  # the last answer pair is empty
    (QWEN, 1.0),                                                 # tag words inside the think block
    ("<answer>z</answer><think>y</think>", 0.0),                 # wrong order
    ("</think>y<think><answer>z</answer>", 0.0),                 # swapped think tags
    ("<think> </think><answer>z</answer>", 0.0),                 # empty think
    ("<think>y</think><answer>\n</answer>", 0.0),                # empty answer
    ("no tags at all", 0.0),
])
def test_format_reward(text, expected):
    assert rewards.format_reward(text) == expected


def test_clean_reward_known_l_out():
    assert rewards.clean_reward(GOOD) == 1.0
    assert rewards.clean_reward(QWEN) == 1.0  # Qwen3 layout: the newlines lie inside or between the blocks
    # pre " \t" (2) + after " \n\n" (3): whitespace counts, as in the official pre_len + after_len
    assert rewards.clean_reward(" \t<think>y</think><answer>z</answer> \n\n") == pytest.approx(0.95)
    assert rewards.clean_reward("\n<think>y</think>\n\n<answer>z</answer>\n  ") == pytest.approx(0.96)  # 1 + 3
    assert rewards.clean_reward("Sure! <think>y</think><answer>z</answer>") == pytest.approx(0.94)  # 6
    assert rewards.clean_reward("<think>y</think>ab c<answer>z</answer>") == 1.0  # between the blocks: free
    assert rewards.clean_reward("<think>y</think><answer>z</answer>" + "x" * 40) == pytest.approx(0.6)
    assert rewards.clean_reward("<think>y</think><answer>z</answer>" + "x" * 250) == 0.0  # clipped at 0
    assert rewards.clean_reward("abc def", kappa=10) == pytest.approx(0.3)  # no tags: all 7 count
    # the last answer pair is the answer block, so nothing lies after it
    assert rewards.clean_reward("<think>a</think><answer>b</answer><answer>c</answer>") == 1.0
    # an unclosed answer after the last pair: "\n<answer>c" (10) counts
    assert rewards.clean_reward("<think>a</think><answer>b</answer>\n<answer>c") == pytest.approx(0.9)
    # unclosed think: no think block, so "<think>yy " (10) before <answer> counts
    assert rewards.clean_reward("<think>yy <answer>z</answer>") == pytest.approx(0.9)
    # no answer block: "pre" (3) plus " tail" (5) after </think>
    assert rewards.clean_reward("pre<think>y</think> tail") == pytest.approx(0.92)
    # an answer before the CoT is not the answer block: the 18 characters before <think> count
    assert rewards.clean_reward("<answer>z</answer><think>y</think>") == pytest.approx(0.82)
    with pytest.raises(ValueError, match="kappa"):
        rewards.clean_reward(GOOD, kappa=0)


def test_blocks_agree_with_the_official_regex():
    """On random tag soup, a (think, answer) pair exists iff the official regex matches, z is its
    group 4 and the text after </answer> its group 5; with one <think> the text before it is group 1.
    (With several <think>s the regex's greedy group 1 runs to the last usable one; the SPEC's y
    starts at the first, so L_out does too.)"""
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "a", " ", "\n"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        m = OFFICIAL.search(text)
        think, answer = rewards._blocks(text)
        assert (m is not None) == (think is not None and answer is not None), text
        if m is None:
            continue
        assert rewards.parse_completion(text)[1] == m.group(4).strip(), text
        assert len(text) - answer[1] == len(m.group(5)), text
        if text.count("<think>") == 1:
            assert think[0] == len(m.group(1)), text
            l_out = len(m.group(1)) + len(m.group(5))
            assert rewards.clean_reward(text, kappa=1000) == pytest.approx(1 - l_out / 1000), text
        y, z = rewards.parse_completion(text)
        assert rewards.format_reward(text) == float(bool(y) and bool(z)), text


def test_ndcg_rewards_known_ranks():
    scores = torch.zeros(3, 50)  # (3, 50): the target among 49 negatives
    scores[1, 1:3] = 1.0          # two strictly higher -> rank 3
    scores[2, 1:] = 1.0           # all 49 higher -> rank 50
    got = rewards.ndcg_rewards(scores)
    assert float(got[0]) == 1.0
    assert float(got[1]) == pytest.approx(0.5)
    assert float(got[2]) == pytest.approx(1 / math.log2(51))
    # rank >= 1 by construction, so no score row can push the reward above 1 (no rank 0)
    s = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))  # (64, 50)
    assert (rewards.ndcg_rewards(s) <= 1.0).all()


def test_candidates_deterministic_distinct_and_valid():
    n_items, k = 60, 49
    for index in range(20):
        target = 1 + index % n_items
        c = rewards.candidates(index, target, n_items, k, seed=7)
        assert c.shape == (k + 1,) and c.dtype == torch.long
        assert int(c[0]) == target
        neg = c[1:]
        assert len(set(neg.tolist())) == k                        # distinct
        assert int(neg.min()) >= 1 and int(neg.max()) <= n_items  # never the pad item 0
        assert target not in neg.tolist()
        assert torch.equal(c, rewards.candidates(index, target, n_items, k, seed=7))  # fixed per sample
    first = rewards.candidates(0, 5, 1000, 49, seed=0)
    assert not torch.equal(first, rewards.candidates(1, 5, 1000, 49, seed=0))  # other sample
    assert not torch.equal(first, rewards.candidates(0, 5, 1000, 49, seed=1))  # other seed
    # all n_items - 1 negatives when k is the maximum, target excluded
    assert sorted(rewards.candidates(3, 4, 10, 9, seed=0)[1:].tolist()) == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    with pytest.raises(ValueError, match="negatives"):
        rewards.candidates(0, 1, 10, 10, seed=0)
    with pytest.raises(ValueError, match="target"):
        rewards.candidates(0, 0, 10, 3, seed=0)


def test_ndcg_rewards_ties_count_in_favour():
    assert rewards.ndcg_rewards(torch.tensor([[0.5, 0.1, 0.2]])).tolist() == [1.0]  # rank 1
    # tie is not "higher": rank 3
    assert rewards.ndcg_rewards(torch.tensor([[0.5, 0.9, 0.5, 0.7]])).tolist() == [pytest.approx(0.5)]
    with pytest.raises(ValueError, match="k\\+1"):
        rewards.ndcg_rewards(torch.zeros(2, 3, 4))


NAN, INF = float("nan"), float("inf")


def test_ndcg_rewards_batched():
    scores = torch.tensor([[0.5, 0.1, 0.2, 0.3],    # target first -> rank 1
                           [0.5, 0.9, 0.5, 0.7],    # two strictly higher, a tie -> rank 3
                           [-1.0, 0.0, 1.0, 2.0],   # last -> rank 4
                           [0.2, 0.2, 0.2, 0.2]])   # all tied -> rank 1
    got = rewards.ndcg_rewards(scores)
    assert got.shape == (4,) and got.dtype == torch.float32
    expected = [1.0, 1 / math.log2(4), 1 / math.log2(5), 1.0]
    assert got.tolist() == pytest.approx(expected)
    # one row at a time agrees with the batch
    assert [float(rewards.ndcg_rewards(row[None])[0]) for row in scores] == pytest.approx(expected)
    # against a plain loop on random scores, bf16 included (ties are frequent there)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.randn(16, 50, generator=g).to(dtype)  # (16, 50)
        loop = [1 / math.log2(2 + sum(float(v) > float(r[0]) for v in r[1:])) for r in s]
        assert rewards.ndcg_rewards(s).tolist() == pytest.approx(loop, abs=1e-6)
    with pytest.raises(ValueError, match="k\\+1"):
        rewards.ndcg_rewards(torch.zeros(5))


def test_ndcg_rewards_non_finite_rows_give_nan():
    """NaN compares False, so a NaN target used to rank 1st and collect r_ndcg = 1."""
    scores = torch.tensor([[NAN, 0.1, 0.2],    # NaN target
                           [0.5, NAN, 0.2],    # NaN negative
                           [INF, 0.1, 0.2],    # infinite target
                           [0.5, 0.1, -INF],   # infinite negative
                           [0.5, 0.9, 0.1]])   # finite row stays a reward
    got = rewards.ndcg_rewards(scores)
    assert torch.isnan(got[:4]).all()
    assert float(got[4]) == pytest.approx(1 / math.log2(3))
    assert math.isnan(float(rewards.ndcg_rewards(scores[:1])[0]))   # a single row too
    assert math.isnan(float(rewards.ndcg_rewards(scores[1:2])[0]))


def test_similarity_rewards_are_strict():
    got = rewards.similarity_rewards(torch.tensor([0.51, 0.5, 0.49]), 0.5)
    assert got.dtype == torch.float32
    assert got.tolist() == [1.0, 0.0, 0.0]  # cos == delta gives 0
    assert rewards.similarity_rewards(torch.tensor([0.8]), 0.9).tolist() == [0.0]


def test_compression_rewards_clip():
    got = rewards.compression_rewards(torch.tensor([10, 60, 0, 5]), torch.tensor([40, 40, 40, 0]))
    assert got.dtype == torch.float32
    assert float(got[0]) == pytest.approx(0.25)
    assert got[1:].tolist() == [1.0, 0.0, 0.0]  # clipped at 1; an empty CoT gives 0


def test_entropy_reward_matches_direct_computation():
    e = torch.tensor([0.1, 2.0, 0.3, 0.4, 1.5, 0.2, 0.0, 0.9, 0.5, 0.6])  # n=10 -> top 2
    expected = (2.0 + 1.5) / 2 - float(e.mean())
    assert rewards.entropy_reward(e) == pytest.approx(expected, abs=1e-6)
    assert rewards.entropy_reward(torch.tensor([0.7])) == pytest.approx(0.0)  # n=1: top = all
    assert rewards.entropy_reward(torch.zeros(0)) == 0.0
    e15 = torch.arange(15.0)  # ceil(0.2 * 15) = 3 exactly, despite 0.2 * 15 = 3.0000000000000004
    assert rewards.entropy_reward(e15) == pytest.approx((14 + 13 + 12) / 3 - 7.0)
    e11 = torch.arange(11.0)  # ceil(2.2) = 3
    assert rewards.entropy_reward(e11) == pytest.approx((10 + 9 + 8) / 3 - 5.0)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_entropy_reward_non_finite_gives_nan(bad):
    e = torch.arange(15.0)
    e[3] = bad
    assert math.isnan(rewards.entropy_reward(e))
    assert math.isnan(rewards.entropy_reward(torch.tensor([bad])))


def test_total_rewards_eq7_and_gate():
    # rows: well formed, r_fmt = 0, a NaN term, a NaN term under r_fmt = 0
    parts = {"fmt": torch.tensor([1.0, 0.0, 1.0, 0.0]), "clean": torch.full((4,), 0.5),
             "ndcg": torch.tensor([0.4, 0.4, NAN, NAN]), "sim": torch.ones(4), "comp": torch.full((4,), 0.3),
             "ent": torch.full((4,), 0.2)}
    w = rewards.RewardConfig().weights()
    expected = 0.1 * 1 + 0.1 * 0.5 + 0.5 * 0.4 + 0.1 * 1.0 + 0.1 * 0.3 + 0.1 * 0.2
    got = rewards.total_rewards(parts, w)
    assert got.shape == (4,) and got.dtype == torch.float32
    assert float(got[0]) == pytest.approx(expected)
    assert float(got[1]) == 0.0  # r_fmt gate
    assert float(rewards.total_rewards(parts, w, gate=False)[1]) == pytest.approx(expected - 0.1)
    with pytest.raises(ValueError, match="missing"):
        rewards.total_rewards({"fmt": torch.ones(1)}, w)
    # a NaN term reaches the caller's non-finite check even through a zero gate or weight
    assert math.isnan(float(got[2]))
    assert math.isnan(float(got[3]))
    nan_ent = {**parts, "ent": torch.tensor([NAN, 0.2, 0.2, 0.2])}
    assert math.isnan(float(rewards.total_rewards(nan_ent, {**w, "ent": 0.0})[0]))


def test_total_rewards_match_python_floats_row_by_row():
    """The vectorised eq. 7 is, bit for bit, the Python-float sum in TERMS order rounded to float32,
    non-finite terms included; terms of different lengths are refused."""
    g = torch.Generator().manual_seed(0)
    parts = {k: torch.rand(32, generator=g) for k in rewards.TERMS}  # each (32,)
    parts["fmt"] = (parts["fmt"] > 0.5).float()
    parts["ndcg"][::5] = NAN
    parts["ent"][3] = INF
    w = {"fmt": 0.1, "clean": 0.3, "ndcg": 0.0, "sim": 0.7, "comp": 0.1, "ent": 0.2}
    for gate in (True, False):
        loop = []
        for b in range(32):
            r = sum(w[k] * float(parts[k][b]) for k in rewards.TERMS)
            loop.append(float(parts["fmt"][b]) * r if gate else r)
        got = rewards.total_rewards(parts, w, gate)
        assert torch.equal(got.isnan(), torch.tensor(loop).isnan())
        assert torch.equal(got.nan_to_num(), torch.tensor(loop).nan_to_num())
    with pytest.raises(ValueError, match="one length"):
        rewards.total_rewards({**parts, "sim": torch.ones(31)}, w)


def test_reward_config_weights_and_drop():
    cfg = rewards.RewardConfig()
    assert cfg.weights() == {"fmt": 0.1, "clean": 0.1, "ndcg": 0.5, "sim": 0.1, "comp": 0.1,
                             "ent": 0.1}
    assert cfg.gate
    cfg = rewards.RewardConfig(drop="sim, -comp")
    assert cfg.weights()["sim"] == 0.0 and cfg.weights()["comp"] == 0.0
    assert cfg.weights()["ndcg"] == 0.5 and cfg.gate
    cfg = rewards.RewardConfig(drop="fmt")
    assert cfg.weights()["fmt"] == 0.0 and not cfg.gate
    parts = {k: torch.tensor([v]) for k, v in {"fmt": 0.0, "clean": 1.0, "ndcg": 1.0, "sim": 0.0, "comp": 0.0,
                                                "ent": 0.0}.items()}
    assert float(rewards.total_rewards(parts, cfg.weights(), cfg.gate)[0]) == pytest.approx(0.6)  # -fmt: no gate
    with pytest.raises(ValueError, match="unknown reward term"):
        rewards.RewardConfig(drop="fmt,bogus").weights()


def test_summary_messages():
    msgs = rewards.summary_messages("The user likes jazz.")
    assert msgs[-1]["role"] == "user"
    assert "The user likes jazz." in msgs[-1]["content"]
    assert msgs[-1]["content"].startswith(rewards.SUMMARY_PROMPT.split("{cot}")[0])


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
    got = rewards.cot_token_mask(ids, mask, tok)
    assert got.tolist() == [False, True, True, True] + [False] * 7
    # a close tag split over two tokens is still found; padding never counts
    ids = torch.tensor([0, 1, 5, 10, 11, 3, 9, 4])
    mask = torch.tensor([False] + [True] * 7)
    assert rewards.cot_token_mask(ids, mask, tok).tolist() == [False, False, True] + [False] * 5
    # no complete think block: the CoT is everything before <answer>, as split_reasoning reads y
    ids = torch.tensor([1, 5, 6, 7])
    assert rewards.cot_token_mask(ids, torch.ones(4, dtype=torch.bool), tok).all()
    ids = torch.tensor([5, 6, 3, 9, 4, 0])
    assert rewards.cot_token_mask(ids, ids != 0, tok).tolist() == [True, True, False, False, False, False]


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
    got = rewards.cot_token_mask(ids, mask, tok)
    assert tok.decode(ids[got]) == "The user likes jazz café"
    assert not got[-3:].any()
