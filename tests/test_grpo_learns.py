"""GRPO learns: Stage II's loop (grpo.rollout -> reward -> group_advantages -> make_batch -> update,
as rporec.stage2 runs it) raises a verifiable reward on a tiny random Qwen3, and does not when the
advantages are negated, so the test can fail."""
import copy

import pytest
import torch
import transformers

import grpo
from plumbing import decode

V = 48  # vocabulary: chance level of the rewarded token is ~1/48
PAD, EOS, TARGET = 0, 1, 2  # the reward is the share of TARGET among a completion's tokens
STEPS = 40
EVAL_PER_PROMPT = 16  # completions per prompt when measuring the policy's mean reward


@pytest.fixture(autouse=True)
def one_thread():
    """64-wide matmuls gain nothing from a second intra-op thread, and on a busy 2-core CPU the
    threads' spinning made a run 5x slower (33 s against 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_policy(seed):
    """The architecture of toy.build_backbone (2 layers, hidden 64, tied embeddings)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=True, eos_token_id=EOS, pad_token_id=PAD)
    return transformers.Qwen3ForCausalLM(cfg)


def share_of_target(ro) -> torch.Tensor:
    """Verifiable reward per completion: TARGET tokens / completion tokens (EOS included)."""
    m = ro.mask
    return ((ro.tokens == TARGET) & m).sum(1).float() / m.sum(1).clamp(min=1)  # (B,)


def mean_reward(model, prompts, prompt_mask, dcfg, seed):
    """Mean reward of EVAL_PER_PROMPT sampled completions per prompt, on a forked RNG."""
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ro = grpo.rollout(model, prompts, prompt_mask, EVAL_PER_PROMPT, dcfg, [EOS], PAD)
    return float(share_of_target(ro).mean())


def train(seed, sign=1.0, iterations=1):
    """STEPS Stage II steps on 4 fixed prompts; returns the mean reward before and after."""
    model = toy_policy(seed)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    cfg = grpo.GRPOConfig(group_size=8, prompts_per_step=4, max_new_tokens=12, lr=3e-3, beta=1e-3, rho=0.2,
                       micro_batch=8, iterations=iterations)
    dcfg = decode.DecodeConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
                               greedy=False)
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(TARGET + 1, V, (cfg.prompts_per_step, 5), generator=g)  # (N, P), no TARGET in them
    prompt_mask = torch.ones_like(prompts, dtype=torch.bool)
    prompt_mask[0, :2] = False  # one left-padded prompt
    prompts[~prompt_mask] = PAD
    before = mean_reward(model, prompts, prompt_mask, dcfg, seed + 100)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(seed + 1)
    for _ in range(STEPS):
        model.eval()
        ro = grpo.rollout(model, prompts, prompt_mask, cfg.group_size, dcfg, [EOS], PAD)
        adv = sign * grpo.group_advantages(share_of_target(ro), cfg.group_size, cfg.adv_eps)
        model.train()
        stats = grpo.update(model, ref, opt, grpo.make_batch(prompts, prompt_mask, ro, adv, cfg.group_size), cfg)
        assert stats["skipped"] == ""
    return before, mean_reward(model, prompts, prompt_mask, dcfg, seed + 100)


@pytest.mark.parametrize("iterations", [1, 2])
def test_grpo_raises_a_verifiable_reward(iterations):
    before, after = train(seed=0, iterations=iterations)
    assert before < 0.1  # a random policy emits TARGET at about chance level
    assert after >= 2 * before and after >= before + 0.2, (before, after)


def test_negated_advantages_do_not_raise_the_reward():
    before, after = train(seed=0, sign=-1.0)
    assert after < before + 0.05, (before, after)
