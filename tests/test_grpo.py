import copy
import math
import os
import tempfile
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers

import grpo
from speed import chunked_head

V = 64  # tiny vocabulary


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def toy_batch(model, temperature=1.0, seed=0):
    """Two left-padded prompts, two right-padded completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(1, V, (2, 5), generator=g)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    prompt_ids[~prompt_mask] = 0
    tokens = torch.randint(1, V, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    tokens[~mask] = 0
    ids = torch.cat([prompt_ids, tokens], 1)
    am = torch.cat([prompt_mask, mask], 1).long()
    with torch.no_grad():
        logp, ent = grpo.sequence_logprobs(model, ids, am, 6, temperature, with_entropy=True)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "tokens": tokens, "mask": mask,
            "old_logp": logp, "entropy": ent, "advantages": torch.tensor([1.0, -1.0])}


def mean_logp(model, batch):
    ids = torch.cat([batch["prompt_ids"], batch["tokens"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["mask"]], 1).long()
    with torch.no_grad():
        logp = grpo.sequence_logprobs(model, ids, am, batch["tokens"].shape[1])
    m = batch["mask"].float()
    return (logp * m).sum(1) / m.sum(1)  # (B,)


# ---------------------------------------------------------------- advantages, KL, entropy mask

def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.3, 0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.9])
    adv = grpo.group_advantages(r, 4, eps=1e-4)
    groups = r.view(3, 4)
    assert torch.allclose(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6)  # zero mean per group
    assert torch.equal(adv[4:8], torch.zeros(4))  # constant group: exactly 0
    for i in (0, 2):
        x = groups[i]
        mean = x.sum() / 4
        std = ((x - mean).pow(2).sum() / 3).sqrt()  # unbiased
        assert torch.allclose(adv.view(3, 4)[i], (x - mean) / (std + 1e-4), atol=1e-6)
    assert grpo.zero_spread_groups(r, 4) == 1
    assert torch.equal(grpo.group_advantages(torch.full((4,), 0.1), 4), torch.zeros(4))
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(r, 5)
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(r, 1)


def test_kl_k3():
    a = torch.tensor([-1.0, -2.0, -0.1])
    assert torch.equal(grpo.kl_k3(a, a), torch.zeros(3))
    kl = grpo.kl_k3(a, a + torch.tensor([0.3, -0.5, 1.0]))
    assert (kl > 0).all()
    d = torch.tensor(0.3)
    assert kl[0] == pytest.approx(float(d.exp() - d - 1))


def test_kl_k3_stays_finite_at_large_log_prob_gaps():
    """A gap of 100 overflows exp in fp32; the clamp at KL_LOG_RATIO_MAX keeps value and gradient finite."""
    logp = torch.tensor([-101.0, -1.0, -1.0]).requires_grad_(True)
    ref = torch.tensor([-1.0, -101.0, -1.5])
    kl = grpo.kl_k3(logp, ref)
    assert torch.isfinite(kl).all()
    d = torch.tensor(grpo.KL_LOG_RATIO_MAX)
    assert float(kl[0].detach()) == pytest.approx(float(d.exp() - d - 1))  # clamped at +20
    assert float(kl[1].detach()) == pytest.approx(float((-d).exp() + d - 1))  # clamped at -20
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[2] == pytest.approx(1 - math.exp(-0.5))  # inside the clamp: d(e^d - d)/dlogp = 1 - e^d


def test_entropy_mask_counts_valid_tokens_only():
    torch.manual_seed(0)
    ent = torch.rand(4, 10)
    mask = torch.arange(10)[None] < torch.tensor([10, 7, 3, 5])[:, None]  # (4, 10)
    ent[~mask] = 100.0  # huge padding entropies must not move the threshold or be kept
    got = grpo.entropy_mask(ent, mask, rho=0.2)
    valid = ent[mask]
    tau = torch.quantile(valid, 0.8)
    assert int(got.sum()) == int((valid >= tau).sum())
    assert not (got & ~mask).any()
    assert int(got.sum()) == 5  # 25 valid tokens, linear interpolation between distinct values
    assert torch.equal(grpo.entropy_mask(ent, mask, rho=1.0), mask)  # rho = 1 keeps everything
    assert not grpo.entropy_mask(ent, torch.zeros_like(mask), 0.2).any()
    with pytest.raises(ValueError, match="rho"):
        grpo.entropy_mask(ent, mask, rho=0.0)


def test_quantile_sort_fallback_matches_torch(monkeypatch):
    x = torch.randn(1001, generator=torch.Generator().manual_seed(1))
    expected = [torch.quantile(x, q) for q in (0.0, 0.37, 0.8, 1.0)]
    monkeypatch.setattr(grpo, "QUANTILE_MAX", 100)
    for q, e in zip((0.0, 0.37, 0.8, 1.0), expected):
        assert float(grpo.quantile(x, q)) == pytest.approx(float(e), abs=1e-6)


def _dist_worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        ents = [torch.rand(3, 8, generator=g) for _ in range(world)]
        lengths = ([8, 2, 5], [1, 0, 3])  # uneven token counts per process
        masks = [torch.arange(8)[None] < torch.tensor(n)[:, None] for n in lengths]
        got = grpo.entropy_mask(ents[rank], masks[rank], rho=0.2)
        tau = torch.quantile(torch.cat([e[m] for e, m in zip(ents, masks)]), 0.8)
        assert torch.equal(got, masks[rank] & (ents[rank] >= tau))
    finally:
        dist.destroy_process_group()


def test_entropy_mask_threshold_spans_processes():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dist_worker, args=(2, os.path.join(d, "init")), nprocs=2)


# ---------------------------------------------------------------- loss

def test_grpo_loss_at_ratio_one_matches_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    ent_mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([2.0, -1.0])
    loss, stats = grpo.grpo_loss(logp, logp.clone(), None, adv, mask, ent_mask, eps=0.2, beta=0.0)
    # w = 1: each kept token contributes -A; denominators are the full lengths 3 and 2
    expected = ((-2.0 * 2) / 3 + (1.0 * 1) / 2) / 2
    assert float(loss) == pytest.approx(expected)
    assert stats["clip_frac"] == 0.0 and stats["kl"] == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(logp, logp, None, adv, mask, ent_mask, beta=0.1)


@pytest.mark.parametrize("adv,clipped_ratio,free_ratio", [(1.0, 1.5, 0.5), (-1.0, 0.5, 1.5)])
def test_grpo_loss_clipping_side(adv, clipped_ratio, free_ratio):
    """Positive A clips w > 1+eps; negative A clips w < 1-eps; the other side keeps its gradient."""
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[clipped_ratio, free_ratio, 1.1]])).requires_grad_(True)
    ones = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = grpo.grpo_loss(logp, old, None, torch.tensor([adv]), ones, ones, eps=0.2, beta=0.0)
    loss.backward()
    grad = logp.grad[0]
    assert grad[0] == 0.0  # clipped: no gradient
    assert grad[1] == pytest.approx(-adv * free_ratio / 3)  # d(-w A / 3)/d logp = -w A / 3
    assert grad[2] == pytest.approx(-adv * 1.1 / 3)
    side = "clip_high" if adv > 0 else "clip_low"
    other = "clip_low" if adv > 0 else "clip_high"
    assert stats[side] == pytest.approx(1 / 3) and stats[other] == 0.0
    assert stats["clip_frac"] == pytest.approx(1 / 3)


def test_grpo_loss_beta_adds_kl():
    g = torch.Generator().manual_seed(0)
    logp, old, ref = (-torch.rand(2, 5, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    ent_mask = mask.clone()
    adv = torch.tensor([0.5, -0.5])
    base, _ = grpo.grpo_loss(logp, old, ref, adv, mask, ent_mask, beta=0.0)
    with_kl, stats = grpo.grpo_loss(logp, old, ref, adv, mask, ent_mask, beta=0.1)
    k3 = grpo.kl_k3(logp, ref) * mask
    per_seq = k3.sum(1) / mask.sum(1)
    assert float(with_kl - base) == pytest.approx(0.1 * float(per_seq.mean()), abs=1e-6)
    assert stats["kl"] == pytest.approx(float(k3.sum() / mask.sum()), abs=1e-6)
    assert stats["kl"] > 0


# ---------------------------------------------------------------- log-probs

def naive_logprobs(model, ids, am, n, temperature):
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits[:, -n - 1:-1]
    lsm = torch.log_softmax(logits.float() / temperature, -1)
    return lsm.gather(-1, ids[:, -n:, None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


@pytest.mark.parametrize("chunk", [0, 5])
def test_sequence_logprobs_matches_naive_with_left_padding(chunk):
    model = tiny_model()
    b = toy_batch(model)
    ids = torch.cat([b["prompt_ids"], b["tokens"]], 1)
    am = torch.cat([b["prompt_mask"], b["mask"]], 1).long()
    logp, ent = grpo.sequence_logprobs(model, ids, am, 6, temperature=0.7, chunk=chunk, with_entropy=True)
    with torch.no_grad():
        ref_lp, ref_ent = naive_logprobs(model, ids, am, 6, 0.7)
    m = b["mask"]
    assert logp.shape == ent.shape == (2, 6) and logp.dtype == torch.float32
    assert torch.allclose(logp[m], ref_lp[m], atol=1e-5)
    assert torch.allclose(ent[m], ref_ent[m], atol=1e-5)
    # the left-padded row equals the same sequence without padding
    alone = torch.cat([b["prompt_ids"][:1, 2:], b["tokens"][:1]], 1)
    single = grpo.sequence_logprobs(model, alone, torch.ones_like(alone), 6, temperature=0.7, chunk=chunk)
    assert torch.allclose(logp[0], single[0], atol=1e-5)
    # gradients reach the decoder and the (tied or untied) output head through the checkpoints
    (logp[m].sum()).backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="n_completion"):
        grpo.sequence_logprobs(model, ids, am, ids.shape[1])


def test_chunked_head_is_the_plain_path_in_value_and_gradient():
    """The fast path (speed/chunked_head.py, the default) against the plain log_softmax path (chunk=0) through a
    whole model: log-probs, entropies and every parameter's gradient."""
    b = toy_batch(tiny_model())
    ids = torch.cat([b["prompt_ids"], b["tokens"]], 1)
    am = torch.cat([b["prompt_mask"], b["mask"]], 1).long()
    got = []
    for chunk in (0, 4):
        model = tiny_model()
        logp, ent = grpo.sequence_logprobs(model, ids, am, 6, temperature=0.7, chunk=chunk, with_entropy=True)
        (logp[b["mask"]] * torch.arange(1.0, 1 + int(b["mask"].sum()))).sum().backward()
        got.append((logp, ent, [p.grad for p in model.parameters()]))
    (plain, plain_ent, plain_grads), (fast, fast_ent, fast_grads) = got
    assert torch.allclose(plain, fast, atol=1e-5) and torch.allclose(plain_ent, fast_ent, atol=1e-5)
    assert all((a - c).norm() <= 1e-5 * (1 + a.norm()) for a, c in zip(plain_grads, fast_grads))


def head_case(seed=0, n=13, H=24, V=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    return h, w, b, torch.randint(0, V, (n,), generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_matches_autograd_of_log_softmax(dtype):
    """_ChunkedHead's log-probs, entropies and hand-written gradients (h, W, b) against autograd through
    log_softmax of the full logits; the bf16 case rounds the matmul inputs (fp32 logits), as on a GPU."""
    h, w, b, targets, g = head_case()
    logp, ent = chunked_head._ChunkedHead.apply(h, w, b, targets, 0.7, 5, dtype, True)  # chunks of 5, 5, 3
    (logp * g).sum().backward()
    got = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    logits = F.linear(h.to(dtype).float(), w.to(dtype).float(), b) / 0.7
    lsm = torch.log_softmax(logits, -1)
    ref_logp = lsm.gather(1, targets[:, None])[:, 0]
    (ref_logp * g).sum().backward()
    assert torch.allclose(logp, ref_logp, atol=1e-5) and torch.allclose(ent, -(lsm.exp() * lsm).sum(-1), atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the backward's matmul inputs are rounded too
    for a, x in zip(got, (h, w, b)):
        assert (a - x.grad).norm() <= tol * x.grad.norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 GEMM with fp32 output is CUDA's")
def test_chunked_head_on_cuda_equals_its_cpu_emulation():
    h, w, b, targets, g = head_case(n=300, H=64, V=1000)
    out = {}
    for dev in ("cpu", "cuda"):
        args = [x.detach().to(dev).requires_grad_(x.requires_grad) for x in (h, w, b)]
        logp = chunked_head._ChunkedHead.apply(*args, targets.to(dev), 1.0, 128, torch.bfloat16, False)
        (logp * g.to(dev)).sum().backward()
        out[dev] = [logp.detach().cpu()] + [x.grad.cpu() for x in args]
    for a, c in zip(out["cpu"], out["cuda"]):
        assert (a - c).norm() <= 1e-4 * a.norm()


def test_micro_batches_group_similar_completion_lengths(monkeypatch):
    model = tiny_model()
    batch = toy_batch(model)
    batch = {k: torch.cat([v, v]) for k, v in batch.items()}  # completions of 6, 3, 6, 3 tokens
    batch["mask"][2, 5:] = False  # 6, 3, 5, 3
    widths = []
    real = grpo.sequence_logprobs

    def record(model, ids, am, n, *args, **kw):
        widths.append(n)
        return real(model, ids, am, n, *args, **kw)
    monkeypatch.setattr(grpo, "sequence_logprobs", record)
    grpo.update(model, None, torch.optim.SGD(model.parameters(), lr=1e-2), batch,
                grpo.GRPOConfig(beta=0.0, micro_batch=2))
    assert widths == [6, 3]  # (6, 5) and (3, 3), not (6, 3) twice


# ---------------------------------------------------------------- update

def test_one_update_step_moves_logprobs_by_advantage_sign():
    model = tiny_model()
    batch = toy_batch(model)
    before = mean_logp(model, batch)
    cfg = grpo.GRPOConfig(beta=0.0, rho=1.0, micro_batch=2, max_grad_norm=1e9)
    opt = torch.optim.SGD(model.parameters(), lr=1e-1)
    stats = grpo.update(model, None, opt, batch, cfg)
    after = mean_logp(model, batch)
    assert after[0] > before[0] + 0.05  # positive advantage: more likely
    assert after[1] < before[1] - 0.05  # negative advantage: less likely
    assert stats["kept"] == 1.0 and stats["clip_frac"] == 0.0 and stats["grad_norm"] > 0


def test_update_is_micro_batch_invariant_and_uses_reference():
    base = tiny_model()
    batch = toy_batch(base)
    noise = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    batch["old_logp"] = batch["old_logp"] + 0.05 * noise  # w != 1 so the ratio matters
    ref = tiny_model(seed=1)  # a different reference so the KL term carries gradient
    params = []
    for mb in (1, 2):
        model = copy.deepcopy(base)
        cfg = grpo.GRPOConfig(beta=0.1, rho=0.5, micro_batch=mb, max_grad_norm=1e9, old_logp="rollout")
        stats = grpo.update(model, ref, torch.optim.SGD(model.parameters(), lr=1e-1), batch, cfg)
        assert stats["kl"] > 0 and 0 < stats["kept"] < 1
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        stats_by_mb = stats
    start = torch.cat([p.detach().flatten() for p in base.parameters()])
    assert not torch.allclose(params[0], start)
    assert torch.allclose(params[0], params[1], atol=1e-6)
    assert set(stats_by_mb) >= {"loss", "kl", "clip_low", "clip_high", "clip_frac", "grad_norm",
                                "kept"}


def test_old_logp_policy_ignores_the_rollout_logprobs():
    """Default: pi_old = logp.detach() (w = 1), so the decoder's log-probs cannot enter the step;
    with old_logp="rollout" they do."""
    base = tiny_model()
    batch = toy_batch(base)
    noise = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    noisy = dict(batch, old_logp=batch["old_logp"] + 0.3 * noise)
    ref = tiny_model(seed=1)

    def step(b, old_logp):
        model = copy.deepcopy(base)
        cfg = grpo.GRPOConfig(beta=0.1, rho=0.5, micro_batch=1, max_grad_norm=1e9, old_logp=old_logp)
        stats = grpo.update(model, ref, torch.optim.SGD(model.parameters(), lr=1e-1), b, cfg)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), stats

    (a, sa), (b, _) = step(batch, "policy"), step(noisy, "policy")
    assert torch.equal(a, b) and sa["clip_frac"] == 0.0
    (c, _), (d, sd) = step(batch, "rollout"), step(noisy, "rollout")
    assert torch.allclose(a, c, atol=1e-6)  # toy_batch's old_logp is the model's own: the same step
    assert not torch.allclose(c, d, atol=1e-4) and sd["clip_frac"] > 0
    with pytest.raises(ValueError, match="old_logp"):
        step(batch, "sampler")


def test_update_under_bf16_autocast_runs():
    model = tiny_model()
    batch = toy_batch(model)
    cfg = grpo.GRPOConfig(beta=1e-3, rho=0.2, micro_batch=1)
    stats = grpo.update(model, copy.deepcopy(model), torch.optim.AdamW(model.parameters(), lr=1e-3),
                     batch, cfg, autocast_dtype=torch.bfloat16)
    assert all(math.isfinite(stats[k]) for k in grpo.STAT_KEYS + ("kept",))
    assert stats["skipped"] == "" and len(stats["passes"]) == 1


# ---------------------------------------------------------------- rollout

def test_rollout_repeats_prompts_in_contiguous_groups(monkeypatch):
    calls = {}
    out = grpo.decode.Rollout(torch.ones(6, 2, dtype=torch.long), torch.ones(6, 2, dtype=torch.bool),
                              torch.zeros(6, 2), torch.zeros(6, 2))

    def fake_generate(model, input_ids, attention_mask, cfg, eos_ids, pad_id, stats=False):
        calls.update(ids=input_ids, am=attention_mask, stats=stats)
        return out

    monkeypatch.setattr(grpo.decode, "generate", fake_generate)
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    am = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert grpo.rollout(None, ids, am, 3, types.SimpleNamespace(greedy=False), [2], 0) is out
    assert calls["ids"].tolist() == [[0, 5, 6]] * 3 + [[7, 8, 9]] * 3
    assert calls["am"].tolist() == [[0, 1, 1]] * 3 + [[1, 1, 1]] * 3
    assert calls["stats"] is True


def test_a_rollout_from_broken_weights_raises_floating_point_error(monkeypatch):
    """Non-finite probabilities, as a NaN log-prob or as transformers' own refusal to sample, are one
    FloatingPointError (the run turns it into one error line); any other error passes through."""
    nan = grpo.decode.Rollout(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool),
                              torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), torch.zeros(2, 2))

    def refuse(*args, **kwargs):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

    def other(*args, **kwargs):
        raise RuntimeError("something else")
    ids, am = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)
    for fake, error in ((lambda *a, **k: nan, FloatingPointError), (refuse, FloatingPointError), (other, RuntimeError)):
        monkeypatch.setattr(grpo.decode, "generate", fake)
        with pytest.raises(error):
            grpo.rollout(None, ids, am, 2, types.SimpleNamespace(greedy=False), [2], 0)
    with pytest.raises(ValueError, match="greedy"):
        grpo.rollout(None, ids, am, 3, types.SimpleNamespace(greedy=True), [2], 0)


def test_rollout_with_real_decoder_feeds_update():
    decode = pytest.importorskip("plumbing.decode")
    model = tiny_model()
    prompt_ids = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    dcfg = decode.DecodeConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0, greedy=False)
    torch.manual_seed(0)
    ro = grpo.rollout(model, prompt_ids, prompt_mask, 2, dcfg, [1], 0)
    assert ro.tokens.shape[0] == 4 and ro.logp.shape == ro.tokens.shape
    batch = grpo.make_batch(prompt_ids, prompt_mask, ro, torch.tensor([1.0, -1.0, 0.5, -0.5]), 2)
    ids = torch.cat([batch["prompt_ids"], batch["tokens"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["mask"]], 1).long()
    with torch.no_grad():
        logp, ent = grpo.sequence_logprobs(model, ids, am, ro.tokens.shape[1], with_entropy=True)
    m = batch["mask"]
    assert torch.allclose(logp[m], batch["old_logp"][m], atol=1e-4)  # pi_old = the sampler
    assert torch.allclose(ent[m], batch["entropy"][m], atol=1e-4)
    stats = grpo.update(model, None, torch.optim.SGD(model.parameters(), lr=1e-2), batch,
                     grpo.GRPOConfig(beta=0.0, micro_batch=2))
    assert stats["clip_frac"] == pytest.approx(0.0)


# ---------------------------------------------------------------- mu > 1 passes

class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the (clipped) gradients it steps with."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return super().step(closure)


def count_forwards(model):
    calls = []
    model.get_decoder().register_forward_hook(lambda mod, args, out: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("old_logp", ["policy", "rollout"])
def test_iterations_make_the_clip_live_and_pass_one_is_the_single_step(old_logp):
    base = tiny_model()
    batch = toy_batch(base)  # old_logp = the model's own log-probs: the two choices start at w = 1
    runs = {}
    for mu in (1, 4):
        model = copy.deepcopy(base)
        calls = count_forwards(model)
        opt = RecordingSGD(model.parameters(), lr=2.0)
        cfg = grpo.GRPOConfig(beta=0.0, rho=1.0, micro_batch=1, iterations=mu, old_logp=old_logp)
        runs[mu] = (grpo.update(model, None, opt, batch, cfg), opt.grads, calls)
    one, grads1, calls1 = runs[1]
    four, grads4, calls4 = runs[4]
    assert len(grads1) == 1 and len(grads4) == 4  # one optimizer step per pass
    for a, b in zip(grads1[0], grads4[0]):
        assert torch.allclose(a, b, atol=1e-7)  # pass 1 of mu = 4 is the mu = 1 step
    assert four["skipped"] == "" and len(four["passes"]) == 4
    assert four["passes"][0]["clip_frac"] == 0.0 and one["clip_frac"] == 0.0
    assert all(p["clip_frac"] > 0 for p in four["passes"][1:])  # w has left [1 - eps, 1 + eps]
    assert four["clip_frac"] == pytest.approx(sum(p["clip_frac"] for p in four["passes"]) / 4)
    assert set(four["passes"][0]) >= {"loss", "kl", "clip_low", "clip_high", "grad_norm"}
    # no forward besides the passes': pi_old is the decoder's or pass 1's own log-probs
    assert calls1 == [True, True]
    assert calls4 == [True] * 8
    with pytest.raises(ValueError, match="iterations"):
        grpo.update(base, None, opt, batch, grpo.GRPOConfig(iterations=0))


# ---------------------------------------------------------------- non-finite numbers never reach the weights

def warm_adamw(model, batch):
    """AdamW after one normal step, so that its state (moments, step count) is not empty."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = grpo.update(model, None, opt, batch, grpo.GRPOConfig(beta=0.0, rho=1.0, micro_batch=1))
    assert stats["skipped"] == ""
    return opt


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_untouched(model, opt, snap):
    params, state = snap
    assert all(torch.equal(a, b.detach()) for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    now = opt.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for k, s in state["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(now["state"][k][n])) for n, v in s.items())


@pytest.mark.parametrize("field,row,col,value,reason", [
    ("advantages", 1, None, math.nan, "advantage"),
    ("advantages", 0, None, math.inf, "advantage"),
    ("entropy", 0, 2, math.nan, "entropy"),
    ("entropy", 1, 0, math.inf, "entropy"),
])
def test_update_skips_non_finite_advantages_and_entropies(field, row, col, value, reason):
    model = tiny_model()
    batch = toy_batch(model)
    opt = warm_adamw(model, batch)
    bad = {k: v.clone() for k, v in batch.items()}
    if col is None:
        bad[field][row] = value
    else:
        bad[field][row, col] = value
    snap = snapshot(model, opt)
    stats = grpo.update(model, copy.deepcopy(model), opt, bad, grpo.GRPOConfig(beta=0.1, micro_batch=1, iterations=2))
    assert reason in stats["skipped"] and stats["passes"] == []
    assert_untouched(model, opt, snap)


def test_non_finite_entropy_on_padding_is_ignored():
    model = tiny_model()
    batch = toy_batch(model)
    batch["entropy"][1, 4] = math.nan  # row 1 has 3 completion tokens: column 4 is padding
    stats = grpo.update(model, None, torch.optim.SGD(model.parameters(), lr=1e-2), batch,
                     grpo.GRPOConfig(beta=0.0, micro_batch=2))
    assert stats["skipped"] == "" and 0 < stats["kept"] < 1


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_update_skips_a_non_finite_loss_or_gradient(where):
    model = tiny_model()
    batch = toy_batch(model)
    opt = warm_adamw(model, batch)
    snap = snapshot(model, opt)
    if where == "loss":  # NaN hidden states: NaN log-probs, loss and gradients
        hook = model.get_decoder().norm.register_forward_hook(lambda mod, args, out: out * math.nan)
    else:  # a finite loss whose gradient overflows
        hook = model.get_decoder().layers[0].mlp.up_proj.weight.register_hook(lambda g: g * math.inf)
    stats = grpo.update(model, copy.deepcopy(model), opt, batch, grpo.GRPOConfig(beta=0.1, rho=0.5, micro_batch=1))
    hook.remove()
    expected = "non-finite loss" if where == "loss" else "non-finite gradient norm"
    assert stats["skipped"].startswith(f"pass 1 of 1: {expected}") and stats["passes"] == []
    assert math.isnan(stats["loss"]) and 0 < stats["kept"] < 1
    assert_untouched(model, opt, snap)


def test_a_non_finite_pass_stops_the_remaining_passes():
    """mu = 3, NaN from the second pass on: the first pass's step stays (it equals the mu = 1 step),
    passes 2 and 3 change nothing."""
    base = tiny_model()
    batch = toy_batch(base)
    single = copy.deepcopy(base)
    grpo.update(single, None, torch.optim.SGD(single.parameters(), lr=0.5), batch,
             grpo.GRPOConfig(beta=0.0, rho=1.0, micro_batch=2))
    model = copy.deepcopy(base)
    forwards = []

    def poison_after_first_pass(mod, args, out):
        forwards.append(1)
        return out * math.nan if len(forwards) > 1 else out  # forward 1: pass 1 (and pi_old)

    model.get_decoder().norm.register_forward_hook(poison_after_first_pass)
    stats = grpo.update(model, None, torch.optim.SGD(model.parameters(), lr=0.5), batch,
                     grpo.GRPOConfig(beta=0.0, rho=1.0, micro_batch=2, iterations=3))
    assert stats["skipped"].startswith("pass 2 of 3: non-finite loss") and len(stats["passes"]) == 1
    assert len(forwards) == 2  # pass 3 never ran
    assert stats["loss"] == stats["passes"][0]["loss"]  # the averages cover the passes that stepped
    for a, b in zip(model.parameters(), single.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
