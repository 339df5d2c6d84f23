"""decode.py and fastdecode.py: the fast backend reproduces HF generate token for token (greedy), both
backends record logp/entropy equal to a naive recompute, sampling semantics (top-k, top-p, frequencies),
early stop."""
import copy

import pytest
import torch
import transformers

from plumbing import decode, sampling
from speed import fastdecode

V, B, P, NEW, PAD = 128, 6, 12, 16, 0
PROMPT_PADS = [0, 3, 7, 1, 10, 5]  # left-padding per row: mixed prompt lengths
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, initializer_range=0.1)  # larger init, clearer logit gaps


def tiny(arch):
    """A tiny random fp32 model; qwen2 has q/k/v biases, llama here also o_proj and MLP biases."""
    torch.manual_seed(0)
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))
    else:
        config = transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


def prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, P), generator=g)  # (B, P)
    mask = torch.ones_like(ids)
    for row, n in enumerate(PROMPT_PADS):
        ids[row, :n] = PAD
        mask[row, :n] = 0
    return ids, mask


@pytest.fixture(scope="module")
def qwen3():
    return tiny("qwen3")


def run(model, backend, eos_ids, stats=False, generator=None, **kw):
    ids, mask = prompts()
    cfg = decode.DecodeConfig(max_new_tokens=NEW, backend=backend, **kw)
    return decode.generate(model, ids, mask, cfg, eos_ids=eos_ids, pad_id=PAD, stats=stats, generator=generator)


def first_hit(tokens, eos_ids):
    """Per row: index of the first EOS in a no-EOS run, or NEW - 1 if none (row runs to max length)."""
    hit = torch.isin(tokens, torch.tensor(eos_ids))
    return torch.where(hit.any(1), hit.float().argmax(1), torch.full((tokens.shape[0],), NEW - 1))


def pick_eos(tokens):
    """A token greedy emits mid-way in some row (index >= 3) but never in some other row."""
    for tok in tokens[:, 3:NEW - 2].flatten().tolist():
        rows = (tokens == tok).any(1)
        if not rows.all() and tok not in tokens[:, :3].flatten().tolist():
            return tok
    raise AssertionError("no usable EOS candidate; change the prompt seed")


def naive_stats(model, tokens, temperature):
    """Log-probs and entropies from one full forward over prompt + completion."""
    ids, mask = prompts()
    full = torch.cat([ids, tokens], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    pos = (full_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits[:, P - 1:-1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, T, V)
    return logp.gather(2, tokens[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_fast_greedy_equals_hf(arch):
    model = tiny(arch)
    free = run(model, "hf", [], greedy=True).tokens  # (B, NEW), no EOS
    assert free.shape == (B, NEW)
    eos = pick_eos(free)
    hf = run(model, "hf", [eos, V - 1], greedy=True)
    fast = run(model, "fast", [eos, V - 1], greedy=True)
    assert torch.equal(hf.tokens, fast.tokens) and torch.equal(hf.mask, fast.mask)
    lengths = fast.mask.sum(1)
    assert (lengths < NEW).any() and (lengths == NEW).any()  # EOS mid-batch and max length both occur
    assert torch.equal(lengths, first_hit(free, [eos, V - 1]) + 1)
    assert (fast.tokens[~fast.mask] == PAD).all()


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_stats_match_naive_recompute(qwen3, backend):
    torch.manual_seed(3)
    out = run(qwen3, backend, [5, 9], stats=True, generator=torch.Generator().manual_seed(3),
              temperature=0.7, top_k=20, top_p=0.9)
    logp, ent = naive_stats(qwen3, out.tokens, 0.7)
    assert out.logp.dtype == out.entropy.dtype == torch.float32
    assert torch.allclose(out.logp[out.mask], logp[out.mask], atol=1e-4)
    assert torch.allclose(out.entropy[out.mask], ent[out.mask], atol=1e-4)
    assert (out.logp[~out.mask] == 0).all() and (out.entropy[~out.mask] == 0).all()
    assert (out.logp[out.mask] < 0).all() and (out.entropy[out.mask] > 0).all()


def test_fast_bf16_stats_close_to_naive():
    model = tiny("qwen3").to(torch.bfloat16)  # the dtype used on GPU: masks, caches, RoPE tables in bf16
    out = run(model, "fast", [], stats=True, generator=torch.Generator().manual_seed(0))
    logp, ent = naive_stats(model, out.tokens, 1.0)
    assert out.logp.dtype == torch.float32 and out.tokens.shape == (B, NEW)
    assert (out.logp - logp).abs().max() < 0.1 and (out.entropy - ent).abs().max() < 0.05


def test_greedy_stats_equal_between_backends(qwen3):
    hf = run(qwen3, "hf", [], stats=True, greedy=True, temperature=1.3)
    fast = run(qwen3, "fast", [], stats=True, greedy=True, temperature=1.3)
    assert torch.equal(hf.tokens, fast.tokens)
    assert torch.allclose(hf.logp, fast.logp, atol=1e-5) and torch.allclose(hf.entropy, fast.entropy, atol=1e-5)


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_top_k_1_sampling_equals_greedy(qwen3, backend):
    torch.manual_seed(0)
    sampled = run(qwen3, backend, [], generator=torch.Generator().manual_seed(0), temperature=0.8, top_k=1)
    assert torch.equal(sampled.tokens, run(qwen3, backend, [], greedy=True).tokens)


def test_sampling_uses_generator_and_differs_from_greedy(qwen3):
    a = run(qwen3, "fast", [], generator=torch.Generator().manual_seed(7), temperature=1.5)
    b = run(qwen3, "fast", [], generator=torch.Generator().manual_seed(7), temperature=1.5)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, run(qwen3, "fast", [], greedy=True).tokens)


def test_top_p_filter_hand_example():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = {p: torch.isfinite(sampling.top_p_filter(logits, p))[0].tolist() for p in (0.0, 0.4, 0.7, 0.9, 0.96)}
    assert kept[0.0] == kept[0.4] == [True, False, False, False]  # always at least one token
    assert kept[0.7] == [True, True, False, False]
    assert kept[0.9] == [True, True, True, False]
    assert kept[0.96] == [True, True, True, True]


def test_filters_match_hf_warpers():
    scores = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(5, 1, dtype=torch.long)
    for p in (0.3, 0.8, 0.95):
        assert torch.equal(sampling.top_p_filter(scores, p), transformers.TopPLogitsWarper(p)(ids, scores.clone()))
    for k in (1, 7, 50):
        assert torch.equal(sampling.top_k_filter(scores, k), transformers.TopKLogitsWarper(k)(ids, scores.clone()))


def test_sampled_frequencies_match_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n, g = 40000, torch.Generator().manual_seed(0)
    logits = probs.log().expand(n, -1)
    cfg = decode.DecodeConfig()
    noise = torch.empty(n, 4).exponential_(generator=g)
    freq = torch.bincount(sampling.choose_tokens(logits, cfg, noise), minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.01)
    cfg.top_p = 0.7  # keeps {0.5, 0.3}, renormalised to {0.625, 0.375}
    freq = torch.bincount(sampling.choose_tokens(logits, cfg, noise), minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01)


@pytest.mark.parametrize("backend", ["hf", "fast"])
def test_early_stop_when_every_row_is_done(qwen3, backend):
    free = run(qwen3, "hf", [], greedy=True).tokens
    eos = sorted({free[row, 1 + row].item() for row in range(B)})  # every row meets one by step 1 + row
    out = run(qwen3, backend, eos, greedy=True)
    ends = first_hit(free, eos)
    assert out.tokens.shape[1] == int(ends.max()) + 1 < NEW  # T = longest completion
    assert torch.equal(out.mask.sum(1), ends + 1)
    assert torch.equal(out.tokens[out.mask], free[:, :out.tokens.shape[1]][out.mask])


def test_fast_loop_stops_within_sync_every_steps(qwen3, monkeypatch):
    free = run(qwen3, "hf", [], greedy=True).tokens
    eos = sorted({free[row, 1 + row].item() for row in range(B)})
    T = int(first_hit(free, eos).max()) + 1
    steps = []
    real_step = fastdecode._FastDecoder.run_step

    def counted_step(self, *args):
        steps.append(1)
        return real_step(self, *args)

    monkeypatch.setattr(fastdecode._FastDecoder, "run_step", counted_step)
    for every in (1, 4):
        steps.clear()
        out = run(qwen3, "fast", eos, greedy=True, sync_every=every)
        assert out.tokens.shape[1] == T
        assert len(steps) + 1 == -(-T // every) * every  # prefill emits step 0; checks at multiples of every


def test_fast_sees_in_place_weight_updates(qwen3):
    model = tiny("qwen3")
    run(model, "fast", [], greedy=True)  # builds and caches the fused weights
    with torch.no_grad():
        for layer in model.model.layers:  # an optimizer step updates parameters in place
            layer.self_attn.k_proj.weight.mul_(-1.5)
            layer.mlp.up_proj.weight.add_(0.05)
    assert torch.equal(run(model, "fast", [], greedy=True).tokens, run(model, "hf", [], greedy=True).tokens)


def bf16_copy(model):
    """The model cast to bf16, except the RoPE inv_freq buffer (.to() rounds it too; the decoder reads it)."""
    ref = copy.deepcopy(model).to(torch.bfloat16)
    ref.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.clone()
    return ref


def test_fast_bf16_decode_of_fp32_weights_equals_bf16_model():
    model = tiny("qwen3")  # fp32 masters
    a = run(model, "fast", [], stats=True, greedy=True, dtype="bfloat16")
    b = run(bf16_copy(model), "fast", [], stats=True, greedy=True)  # "auto" on CPU: the weights' bf16
    for field in ("tokens", "mask", "logp", "entropy"):  # same bf16 weights, same computation
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    (bf16,) = fastdecode._DECODERS[model]
    assert bf16.cache.dtype == bf16.cos.dtype == bf16.embed.dtype == bf16.layers[0].o.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the masters are not touched
    run(model, "fast", [], greedy=True, dtype="float32")  # another dtype: another decoder, no weight copies
    f32 = fastdecode._DECODERS[model][-1]
    assert f32 is not bf16 and f32.signature != bf16.signature
    assert f32.layers[0].o is model.model.layers[0].self_attn.o_proj.weight
    assert f32.embed is model.model.embed_tokens.weight
    assert f32.layers[0].ln1 is model.model.layers[0].input_layernorm.weight


def test_bf16_decode_sees_in_place_master_updates():
    model = tiny("qwen3")
    before = run(model, "fast", [], greedy=True, dtype="bfloat16").tokens  # builds the bf16 copies
    with torch.no_grad():  # an optimizer step on the fp32 masters, in place: fused and plain weights
        model.model.embed_tokens.weight.add_(0.02)
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(-1.5)
            layer.self_attn.o_proj.weight.mul_(1.3)
            layer.mlp.up_proj.weight.add_(0.05)
    after = run(model, "fast", [], greedy=True, dtype="bfloat16").tokens
    assert not torch.equal(before, after)
    assert torch.equal(after, run(bf16_copy(model), "fast", [], greedy=True).tokens)


def prompt_batch(n):
    """n left-padded prompts of P columns, 0 to P - 2 pads each; seeded by n."""
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(1, V, (n, P), generator=g)
    pads = torch.randint(0, P - 1, (n, 1), generator=g)
    mask = (torch.arange(P) >= pads).long()
    return ids.masked_fill(mask == 0, PAD), mask


def test_decoder_cache_reuses_pads_and_evicts():
    model = tiny("qwen3")

    def gen(n, greedy=True):
        cfg = decode.DecodeConfig(max_new_tokens=NEW, backend="fast", greedy=greedy)
        out = decode.generate(model, *prompt_batch(n), cfg, eos_ids=[7, 21, 40], pad_id=PAD, stats=True,
                              generator=torch.Generator().manual_seed(0))
        T = out.tokens.shape[1]
        assert all(getattr(out, f).shape == (n, T) for f in ("tokens", "mask", "logp", "entropy"))
        return out

    rows = lambda: [d.batch for d in fastdecode._DECODERS[model]]  # noqa: E731, least recently used first
    gen(5)
    (d8,) = fastdecode._DECODERS[model]
    reused = {3: gen(3)}  # the 8-row decoder, 5 padding rows
    assert fastdecode._DECODERS[model] == [d8]
    reused[11] = gen(11)
    assert rows() == [8, 16]
    gen(20)  # a third decoder evicts the least recently used (8 rows)
    assert rows() == [16, 24]
    sampled = gen(2, greedy=False)  # the smallest that fits: 16 rows, 14 padding rows
    assert rows() == [24, 16]
    gen(30)
    assert rows() == [16, 32]
    assert not all(out.mask.all() for out in reused.values())  # EOS ends some rows early
    for n, out in reused.items():
        fastdecode.clear_fast_cache(model)
        fresh = gen(n)
        assert rows() == [-(-n // 8) * 8]
        for f in ("tokens", "mask", "logp", "entropy"):
            assert torch.equal(getattr(out, f), getattr(fresh, f)), (n, f)
        hf_cfg = decode.DecodeConfig(max_new_tokens=NEW, backend="hf", greedy=True)
        hf = decode.generate(model, *prompt_batch(n), hf_cfg, eos_ids=[7, 21, 40], pad_id=PAD)
        assert torch.equal(hf.tokens, out.tokens) and torch.equal(hf.mask, out.mask)
    fastdecode.clear_fast_cache(model)
    fresh = gen(2, greedy=False)  # 8-row decoder: a seed gives the same samples whatever decoder is used
    assert rows() == [8] and torch.equal(sampled.tokens, fresh.tokens) and torch.equal(sampled.logp, fresh.logp)


@torch.no_grad()
def test_graph_step_needs_no_host_sync():
    """The CUDA-graph body (decode_step, sampling and bookkeeping included) runs on the meta device,
    where any data-dependent host sync (.item(), bool(), nonzero, boolean indexing) raises."""
    dec = fastdecode._FastDecoder(tiny("qwen3").to("meta"), B, 64)
    for cfg in (decode.DecodeConfig(greedy=True), decode.DecodeConfig(temperature=0.7, top_k=5, top_p=0.9)):
        for stats in (False, True):
            dec.decode_step(32, cfg, stats)
    assert dec.out_tok.is_meta and dec.cache.shape == (2, 2, B, 2, 64, 16)


def test_bad_inputs_raise_clear_errors(qwen3):
    ids, mask = prompts()
    cfg = decode.DecodeConfig(max_new_tokens=4, backend="fast")
    with pytest.raises(ValueError, match="left-padded"):
        decode.generate(qwen3, ids, mask.flip(1), cfg, eos_ids=[], pad_id=PAD)
    with pytest.raises(ValueError, match="top_p"):
        decode.generate(qwen3, ids, mask, decode.DecodeConfig(top_p=1.5), eos_ids=[], pad_id=PAD)
    with pytest.raises(ValueError, match="kv_bucket"):
        decode.generate(qwen3, ids, mask, decode.DecodeConfig(backend="fast", kv_bucket=12), [], PAD)
    with pytest.raises(ValueError, match="dtype"):
        decode.generate(qwen3, ids, mask, decode.DecodeConfig(backend="fast", dtype="fp8"), [], PAD)
    with pytest.raises(ValueError, match="backend"):
        decode.generate(qwen3, ids, mask, decode.DecodeConfig(backend="vllm"), eos_ids=[], pad_id=PAD)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V))
    with pytest.raises(ValueError, match="gpt2.*--decode.backend hf"):
        decode.generate(gpt2, ids, mask, cfg, eos_ids=[], pad_id=PAD)


def test_auto_backend_uses_hf_on_cpu(qwen3, monkeypatch):
    calls = []
    monkeypatch.setattr(decode, "_generate_hf", lambda *a: calls.append("hf"))
    run(qwen3, "auto", [], greedy=True)
    assert calls == ["hf"]
