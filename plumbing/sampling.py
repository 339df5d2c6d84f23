"""What both decoders share (plumbing/decode.py's hf backend and speed/fastdecode.py): the Rollout they
return, the per-token log-prob and entropy of eq. 11 (token_stats), and HF's sampling rules (temperature, then
top-k, then top-p; greedy = argmax of the raw logits). logp and entropy always describe
log_softmax(logits / temperature), ignoring the top-k/top-p truncation.

Two ways to draw from that distribution. choose_tokens takes caller-drawn Exp(1) noise (B, V) from a torch RNG,
so a row's tokens depend on the batch it shares that RNG stream with. choose_tokens_seeded takes one uniform per
row and step, computed by row_uniforms from the row's own seed and the step alone (a counter-based hash), so a
row's tokens depend on its prompt, its seed and the model, never on its batch-mates or the batch size.
"""
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    tokens: torch.Tensor  # (B, T) long, completion only, pad_id after EOS
    mask: torch.Tensor  # (B, T) bool, real completion tokens, EOS included
    logp: torch.Tensor | None  # (B, T) float32, log-prob of the chosen token at `temperature`
    entropy: torch.Tensor | None  # (B, T) float32, entropy of that same distribution


def top_k_filter(logits, k):
    """HF TopKLogitsWarper: -inf below the k-th largest logit (ties with it are kept)."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """HF TopPLogitsWarper: keep the smallest set whose probability reaches p, always >= 1 token."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending, as HF
    drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def token_stats(logits, temperature):
    """log_softmax(logits / T) (B, V) and its entropy (B,); 0 * log 0 counts as 0."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp, -torch.where(logp > float("-inf"), logp.exp() * logp, 0.0).sum(-1)


def sampling_probs(logits, cfg):
    """The distribution a sampled token is drawn from (B, V) float32: softmax of the raw logits divided by the
    temperature, truncated by top-k, then top-p, as HF does."""
    x = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        x = top_k_filter(x, cfg.top_k)
    if cfg.top_p < 1.0:
        x = top_p_filter(x, cfg.top_p)
    return x.softmax(-1)


def choose_tokens(logits, cfg, noise):
    """Next token (B,) from raw logits (B, V). Sampling uses the exponential race: argmax_i p_i / E_i
    with E_i ~ Exp(1) (noise, (B, V)) picks i with probability p_i; torch.multinomial does the same
    for one sample, but a caller-filled noise buffer keeps the RNG out of the CUDA graph."""
    if cfg.greedy:
        return logits.argmax(-1)
    return (sampling_probs(logits, cfg) / noise).argmax(-1)


def choose_tokens_seeded(logits, cfg, u):
    """Next token (B,) from raw logits (B, V) and one uniform u (B,) in [0, 1) per row (row_uniforms): the
    inverse CDF, the first token whose cumulative probability exceeds u, picks i with probability p_i. The
    cumulative sum runs in float64, so even a vocabulary of 150k tokens moves no boundary by more than ~1e-12.
    One uniform per row, not a (B, V) noise tensor: the draw costs a cumulative sum, no random numbers."""
    if cfg.greedy:
        return logits.argmax(-1)
    p = sampling_probs(logits, cfg).double()
    cdf = p.cumsum(-1)  # (B, V)
    target = u.double() * cdf[:, -1]  # (B,)
    last = p.shape[-1] - 1 - (p.flip(-1) > 0).long().argmax(-1)  # (B,) the last token that can be drawn
    return torch.minimum((cdf <= target[:, None]).sum(-1), last)  # a rounded-up target still draws a kept token


MASK32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2**32 for 32-bit words x (an int64 tensor) and c: in two 16-bit halves of c, so that no int64
    product overflows (torch defines no wrap-around for signed overflow)."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & MASK32


def _mix32(x):
    """A bijection of 32-bit words in which every input bit flips about half the output bits (the "lowbias32"
    integer hash by C. Wellons), on int64 tensors holding 32-bit words."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_uniforms(row_seeds, steps):
    """Uniforms in [0, 1) (B, T) float64 with 53 random bits each: a hash of (row seed, step) alone, the same on any
    device and whatever else the batch holds. row_seeds (B,) int64 in [0, 2**63), steps (T,) int64 in [0, 2**30)."""
    seed = row_seeds.long()[:, None]
    lo, hi = seed & MASK32, seed >> 32  # (B, 1) each
    words = []
    for lane in (0, 1):  # two independent 32-bit words per draw
        counter = steps.long()[None, :] * 2 + lane  # (1, T)
        words.append(_mix32(_mix32(_mix32(counter) ^ lo) ^ hi))  # (B, T)
    bits = (words[0] >> 5) * 2 ** 26 + (words[1] >> 6)  # (B, T) 27 + 26 = 53 bits, exact in int64 and float64
    return bits.double() * 2.0 ** -53
