"""What both decoders share (plumbing/decode.py's hf backend and speed/fastdecode.py): the Rollout they
return, the per-token log-prob and entropy of eq. 11 (token_stats), and HF's sampling rules (temperature, then
top-k, then top-p; greedy = argmax of the raw logits). logp and entropy always describe
log_softmax(logits / temperature), ignoring the top-k/top-p truncation.
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


def choose_tokens(logits, cfg, noise):
    """Next token (B,) from raw logits (B, V). Sampling uses the exponential race: argmax_i p_i / E_i
    with E_i ~ Exp(1) (noise, (B, V)) picks i with probability p_i; torch.multinomial does the same
    for one sample, but a caller-filled noise buffer keeps the RNG out of the CUDA graph."""
    if cfg.greedy:
        return logits.argmax(-1)
    x = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        x = top_k_filter(x, cfg.top_k)
    if cfg.top_p < 1.0:
        x = top_p_filter(x, cfg.top_p)
    return (x.softmax(-1) / noise).argmax(-1)
