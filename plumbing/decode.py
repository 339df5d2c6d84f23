"""Batched autoregressive decoding for every generation in RPORec: Stage I CoT generation, Stage II
GRPO rollouts (the G samples per prompt behind eq. 8-11, with the per-token entropies that r_ent and
the entropy mask read, and the log-probs that --grpo.old_logp rollout uses), reference summaries
(y_hat) and evaluation.

Two backends behind one `generate`:
- "hf": plain `model.generate`; per-token stats are recorded by a LogitsProcessor (this file).
- "fast": a compact static-KV-cache decoder for the Qwen3 / Qwen2 / Llama family whose every decode
  step, sampling included, replays as one CUDA graph on CUDA (fastdecode.py).

Sampling semantics are HF's: temperature, then top-k, then top-p, greedy = argmax of raw logits.
logp / entropy always describe log_softmax(logits / temperature), ignoring top-k/top-p truncation.
Those rules (and the Rollout type) live in plumbing/sampling.py, which both backends import.
"""
import dataclasses
from dataclasses import dataclass

import torch

from plumbing.flags import OneOf, Range, setting
from plumbing.sampling import (  # the output type, the stats rule and the seeded draw both backends share
    Rollout,
    choose_tokens_seeded,
    row_uniforms,
    token_stats,
)
from speed import fastdecode


@dataclass
class DecodeConfig:
    max_new_tokens: int = setting(768, Range(1))  # paper's maximum completion length
    temperature: float | None = setting(1.0, Range(0.01, 100, none=True))  # sampling temperature (below 0.01,
    # logits / T overflow fp32);
    # logp/entropy are taken at this temperature too; None (top_p, top_k too) = the backbone's
    # generation_config, filled in by resolve_sampling before decoding
    top_p: float | None = setting(1.0, Range(0, 1, open="low", none=True))  # nucleus: smallest set with
    # cumulative prob >= top_p (1.0 = off)
    top_k: int | None = setting(0, Range(0, none=True))  # keep only the k most likely tokens (0 = off)
    greedy: bool = setting(False)  # argmax decoding (summaries, evaluation); temperature then only scales
    # stats
    backend: str = setting("auto", OneOf("auto", "hf", "fast"), rerun=True)  # "auto" (fast on CUDA for
    # fastdecode.FAST_ARCHS, else hf) | "hf" | "fast"
    cuda_graph: bool = setting(True, rerun=True)  # fast backend on CUDA: replay each decode step as one CUDA
    # graph
    kv_bucket: int = setting(256, Range(1), rerun=True)  # attention reads the cache in multiples of this many
    # columns; one graph each
    kernels: str = setting("torch", OneOf("auto", "triton", "torch"), rerun=True)  # fast backend decode step:
    # "triton" (tritondecode.py: split-KV attention, fused RoPE + q/k norm + cache write, SiLU) | "torch"
    # (SDPA and torch ops, the reference) | "auto" = triton on CUDA when triton imports and the head layout
    # fits, else torch. The default is torch: the Triton kernels are held to it in Triton's CPU interpreter,
    # and their speed on a card is not measured (tools/gpu_speed.sh measures it)
    sync_every: int = setting(16, Range(1), rerun=True)  # fast: test "every row done" each this many steps
    # (on CUDA a host sync)
    prefill_rows: int = setting(16, Range(1), rerun=True)  # prompts per prefill forward; bounds the (rows, P,
    # P) mask and activations
    dtype: str = setting("auto", OneOf("auto", "float32", "bfloat16", "float16"))  # fast backend compute
    # dtype: "auto" = bfloat16 on CUDA else the weights' dtype; or "float32" | "bfloat16" | "float16". The hf
    # backend ignores it (runs the model as it is).


class _Recorder:
    """LogitsProcessor recording per step the entropy, and for the PREVIOUS step the log-prob of the
    token just chosen (now the last column of input_ids), holding one (B, V) log-softmax at a time.
    transformers 5.x runs custom processors before the temperature/top-k/top-p warpers, so `scores`
    are raw logits; we divide by the temperature ourselves either way."""

    def __init__(self, temperature):
        self.temperature = temperature
        self.prev = None  # (B, V) log-softmax of the step before
        self.logp = []  # per step (B,)
        self.entropy = []  # per step (B,)

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.logp.append(self.prev.gather(1, input_ids[:, -1:])[:, 0])
        self.prev, ent = token_stats(scores, self.temperature)
        self.entropy.append(ent)
        return scores


class _SeededChooser:
    """LogitsProcessor that draws each row's token itself (sampling.choose_tokens_seeded, from the row's uniform
    of this step) and leaves only that token finite; generate then runs greedy, so its argmax takes exactly that
    token, and no HF warper or RNG comes after it. Must come after _Recorder, which reads the raw logits."""

    def __init__(self, cfg, u, prompt_len):
        self.cfg, self.u, self.prompt_len = cfg, u, prompt_len  # u: (B, max_new_tokens) float64

    def __call__(self, input_ids, scores):
        nxt = choose_tokens_seeded(scores, self.cfg, self.u[:, input_ids.shape[1] - self.prompt_len])  # (B,)
        return torch.full_like(scores, float("-inf")).scatter_(1, nxt[:, None], 0.0)


def _generate_hf(model, input_ids, attention_mask, cfg, eos_ids, pad_id, stats, row_seeds=None):
    from transformers import GenerationConfig, LogitsProcessorList

    seeded = row_seeds is not None and not cfg.greedy
    # greedy (and seeded: _SeededChooser has drawn): temperature/top_p 1.0 and top_k 50 are HF's neutral defaults,
    # so nothing warns
    sampling = dict(temperature=1.0, top_p=1.0, top_k=50) if cfg.greedy or seeded else \
        dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=not (cfg.greedy or seeded),
                               eos_token_id=list(eos_ids), pad_token_id=pad_id, **sampling)
    rec = _Recorder(cfg.temperature) if stats else None
    processors = [rec] if stats else []
    if seeded:
        u = row_uniforms(row_seeds, torch.arange(cfg.max_new_tokens, device=input_ids.device))  # (B, T)
        processors.append(_SeededChooser(cfg, u, input_ids.shape[1]))
    seq = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg,
                         logits_processor=LogitsProcessorList(processors))
    tokens = seq[:, input_ids.shape[1]:]  # (B, T)
    is_eos = torch.isin(tokens, torch.tensor(list(eos_ids), dtype=torch.long, device=tokens.device))
    mask = is_eos.long().cumsum(1) - is_eos.long() == 0  # up to and including the first EOS
    if not stats:
        return Rollout(tokens, mask, None, None)
    logp = torch.stack(rec.logp + [rec.prev.gather(1, tokens[:, -1:])[:, 0]], 1)  # (B, T)
    return Rollout(tokens, mask, logp.masked_fill(~mask, 0.0),
                   torch.stack(rec.entropy, 1).masked_fill(~mask, 0.0))


@torch.no_grad()
def generate(model, input_ids, attention_mask, cfg, eos_ids, pad_id, stats=False, generator=None, row_seeds=None):
    """Decode completions for left-padded prompts. row_seeds (B,) (ints in [0, 2**63), e.g. seeds.row_seed): each
    row samples from its own seed (sampling.row_uniforms), so its tokens depend on its prompt, its seed and the
    model alone, not on the batch. Without them, `generator` seeds the fast backend's sampling and the hf backend
    draws from the global RNG (use torch.manual_seed): a row's tokens then depend on its batch."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be (B, P); tokenize the batch with padding=True")
    am = attention_mask.long()
    if not bool((am[:, 1:] >= am[:, :-1]).all() and am[:, -1].all()):
        raise ValueError("prompts must be left-padded with at least one real token; "
                         "set tokenizer.padding_side = 'left'")
    if None in (cfg.temperature, cfg.top_p, cfg.top_k):
        raise ValueError("DecodeConfig temperature/top_p/top_k are None (= take them from the backbone's "
                         "generation_config); resolve them first, as rporec.sampling does")
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (it also scales the recorded logp/entropy), got "
                         f"{cfg.temperature}; for argmax decoding set greedy=True and leave temperature at 1.0")
    if not (0.0 <= cfg.top_p <= 1.0 and cfg.top_k >= 0):
        raise ValueError(f"need 0 <= top_p <= 1 and top_k >= 0, got top_p={cfg.top_p}, top_k={cfg.top_k}; "
                         "use top_p=1.0 and top_k=0 to turn them off")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if row_seeds is not None:
        row_seeds = torch.as_tensor(row_seeds, dtype=torch.long, device=input_ids.device)
        if row_seeds.shape != input_ids.shape[:1] or bool((row_seeds < 0).any()):
            raise ValueError(f"row_seeds must be one non-negative int per prompt ({input_ids.shape[0]}), got shape "
                             f"{tuple(row_seeds.shape)}; build them with seeds.row_seed")
    backend = cfg.backend
    if backend == "auto":
        backend = "fast" if input_ids.is_cuda and fastdecode.fast_unsupported(model) is None else "hf"
    if backend == "hf":
        return _generate_hf(model, input_ids, am, cfg, list(eos_ids), pad_id, stats, row_seeds)
    if backend == "fast":
        return fastdecode.generate_fast(model, input_ids, am, cfg, list(eos_ids), pad_id, stats, generator, row_seeds)
    raise ValueError(f"unknown decode backend {cfg.backend!r}; use 'auto', 'hf' or 'fast'")


def eos_ids(model, tok):
    """Every id that ends a completion: the generation_config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    return sorted({*([ids] if isinstance(ids, int) else ids or []), tok.eos_token_id} - {None})


def encode_prompts(tok, messages, thinking, device):
    """Chat-templated, left-padded prompts: (B, P) ids and mask on device."""
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
             for m in messages]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def complete(model, tok, messages, cfg, thinking, row_seeds=None):
    """Completion texts, the Rollout and the number of prompt tokens for a batch of chat messages, through
    generate (row_seeds: one seed per message, see generate)."""
    ids, mask = encode_prompts(tok, messages, thinking, model.device)
    out = generate(model, ids, mask, cfg, eos_ids(model, tok), tok.pad_token_id, row_seeds=row_seeds)
    texts = tok.batch_decode(out.tokens.masked_fill(~out.mask, tok.pad_token_id), skip_special_tokens=True)
    return texts, out, int(mask.sum())


def load_model(name, dtype, device):
    """(model, tokenizer) from a hub id or a local folder, with the error naming the fix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: could not load the backbone {name!r} (--model): {str(e).splitlines()[0][:300]}; "
                         "pass a local folder with --model PATH, check the hub id and the network, or delete a "
                         "corrupt local copy") from None
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, tok


def resolve_sampling(cfg, model):
    """cfg with its None fields taken from the backbone's generation_config (Qwen3-0.6B: temperature 0.6,
    top_p 0.95, top_k 20; the official script samples with it), else temperature 1.0, top_p 0.95."""
    given = model.generation_config.to_diff_dict()  # only what the checkpoint sets
    fallback = {"temperature": 1.0, "top_p": 0.95, "top_k": 0}
    return dataclasses.replace(cfg, **{k: given.get(k) or v for k, v in fallback.items() if getattr(cfg, k) is None})
