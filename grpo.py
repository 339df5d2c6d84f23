"""GRPO with an entropy token mask for RPORec Stage II (paper Appendix A.1, eq. 8-11).

Pure tensor functions (advantages, KL, entropy mask, loss, chunked log-probs) plus `rollout`
(G completions per prompt through decode.generate) and `update` (one micro-batched step).

Choices the paper leaves open, made here:
- The ratio w = pi_theta / pi_old uses the policy that sampled (eq. 9 writes pi_ref, a typo:
  every GRPO implementation uses pi_old there and pi_ref only in the KL).
- Every rollout batch gets one optimisation step, so pi_old is the policy being optimised and
  w = exp(logp - logp.detach()) = 1 in value (as TRL does with num_iterations=1); the clip is then
  inactive and the gradient is A * grad logp. old_logp="rollout" takes pi_old from the decoder's
  own log-probs instead, which lets decode-vs-train numerics into w: on SmolLM2-135M, bf16
  decoding against a bf16-autocast training forward gave mean |dlogp| 0.037, |w - 1| > 0.05 on
  29% of the tokens (tests/real_model_check.py; README, Choices).
- The entropies of eq. 11 (m_t and r_ent) come from the rollout's own decoding pass
  (decode.generate(stats=True)), not a second forward.
- Logits are divided by the sampling temperature everywhere (rollout, policy, reference), so
  pi_old is the distribution that sampled; rollouts should use top_p = 1, top_k = 0.
- A_i = (r_i - mean_G) / (std_G + adv_eps) with torch's default (unbiased) std; a group whose
  rewards are all equal gets A = 0 exactly (counted by zero_spread_groups).
- KL to pi_ref by the k3 estimator exp(ref - logp) - (ref - logp) - 1 over all completion tokens;
  the entropy mask m_t multiplies the policy-gradient term only.
- m_t = 1 for completion tokens with entropy >= the (1 - rho) quantile (linear interpolation) of
  all completion tokens of the rollout batch, gathered across processes when distributed.
- The 1/|o_i| denominators are the full completion lengths (masked tokens still count), then a
  mean over all sequences of the batch (= mean over prompts of the 1/G sum).
- Log-probs come from the decoder's hidden states and the output head applied in fp32 chunks under
  activation checkpointing, so a 150k vocabulary never materialises logits for the whole batch.
- Gradients are averaged across processes by hand: the chunked head bypasses model.forward, so
  the model is not wrapped in DistributedDataParallel.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

QUANTILE_MAX = 2 ** 24  # torch.quantile refuses larger inputs; beyond it we sort ourselves


@dataclass
class GRPOConfig:
    group_size: int = 4        # G completions per prompt (official)
    prompts_per_step: int = 8  # prompts per rollout batch (paper: LLM batch 8)
    temperature: float = 1.0   # sampling temperature; logits are divided by it in the loss too
    max_new_tokens: int = 768  # completion length cap (paper 768, official 1024)
    eps: float = 0.2           # PPO clip range of eq. 10
    old_logp: str = "policy"   # pi_old in w: "policy" = logp.detach() (one step per batch) | "rollout" = decoder's
    beta: float = 1e-3         # KL weight of eq. 10 (official); 0 skips the reference forward
    rho: float = 0.2           # entropy mask keeps the top-rho tokens of the batch (eq. 11, [31])
    lr: float = 1e-6           # AdamW learning rate
    max_grad_norm: float = 1.0  # gradient-norm clip
    weight_decay: float = 0.0  # AdamW weight decay
    steps: int = 200           # GRPO steps (= rollout batches, one optimisation step each)
    micro_batch: int = 8       # sequences per forward/backward micro-batch
    logit_chunk: int = 1024    # tokens per output-head chunk in sequence_logprobs
    grad_checkpointing: bool = False  # decoder activation checkpointing (rporec.py enables it)
    adv_eps: float = 1e-4      # added to the group std in eq. 8
    save_every: int = 50       # checkpoint every this many steps (0 = only at the end)
    sample_every: int = 10     # print one sampled completion every this many steps


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 8: A_i = (r_i - mean_G) / (std_G + eps) within contiguous groups of size G.
    rewards (N*G,) -> (N*G,); a group with zero spread gets exactly 0."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"need group_size >= 2 dividing the {rewards.numel()} rewards, got "
                         f"group_size={group_size}; sample G >= 2 completions per prompt")
    r = rewards.float().view(-1, group_size)  # (N, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    flat = (r.max(1, keepdim=True).values == r.min(1, keepdim=True).values)  # (N, 1)
    return torch.where(flat, torch.zeros_like(adv), adv).view(-1)


def zero_spread_groups(rewards: torch.Tensor, group_size: int) -> int:
    """Number of groups whose G rewards are all equal (they carry no learning signal)."""
    r = rewards.view(-1, group_size)
    return int((r.max(1).values == r.min(1).values).sum())


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token: exp(d) - d - 1, d = ref - logp (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _gather_1d(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a variable-length 1-D tensor from all processes (sizes, pad, gather, unpad)."""
    world = dist.get_world_size()
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros(max(sizes))
    padded[:x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q) (linear interpolation) for 1-D x of any size."""
    if x.numel() <= QUANTILE_MAX:
        return torch.quantile(x, q)
    s = x.sort().values
    pos = q * (s.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, rho: float = 0.2) -> torch.Tensor:
    """Eq. 11 token selection [31]: (B, T) bool, True for valid tokens whose entropy is at or above
    the (1 - rho) quantile of all valid tokens of the batch (of all processes when distributed)."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho}; 0.2 keeps the top 20% of tokens")
    vals = entropy[mask].float()  # (n_valid,)
    if dist.is_available() and dist.is_initialized():
        vals = _gather_1d(vals)
    if vals.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    tau = quantile(vals, 1 - rho)
    return mask.bool() & (entropy >= tau)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, ent_mask, eps=0.2, beta=1e-3):
    """Eq. 10 as a loss to minimise. logp, old_logp, ref_logp (B, T); advantages (B,); mask and
    ent_mask (B, T) bool. Per token: -min(w A, clip(w, 1-eps, 1+eps) A) * m_t + beta * k3,
    w = exp(logp - old_logp); each sequence averaged over its valid tokens, then mean over
    sequences. ref_logp may be None only when beta == 0. Returns (loss, stats of floats)."""
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp; pass the reference model's log-probs "
                         "or set beta=0")
    m = mask.float()  # (B, T)
    adv = advantages.float()[:, None]  # (B, 1)
    w = torch.exp(logp - old_logp)  # (B, T)
    pg = -torch.min(w * adv, w.clamp(1 - eps, 1 + eps) * adv) * ent_mask.float()  # (B, T)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # (B, T)
    per_token = pg + beta * kl if beta > 0 else pg
    lengths = m.sum(1).clamp(min=1)  # (B,) full |o_i|
    loss = ((per_token * m).sum(1) / lengths).mean()
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        low = ((w < 1 - eps) & (adv < 0) & mask).sum() / n
        high = ((w > 1 + eps) & (adv > 0) & mask).sum() / n
        stats = {"kl": float((kl * m).sum() / n), "clip_low": float(low),
                 "clip_high": float(high), "clip_frac": float(low + high)}
    return loss, stats


def _head_logprobs(h, targets, weight, bias, temperature, with_entropy):
    """Log-prob of targets (and entropy) for hidden states h (n, H), in fp32."""
    with torch.autocast(h.device.type, enabled=False):
        logits = F.linear(h.float(), weight.float(), None if bias is None else bias.float())
        logprobs = torch.log_softmax(logits / temperature, dim=-1)  # (n, V)
        logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
        if not with_entropy:
            return logp
        return logp, -(logprobs.exp() * logprobs).sum(-1)


def sequence_logprobs(model, input_ids, attention_mask, n_completion: int, temperature=1.0,
                      chunk=1024, with_entropy=False):
    """log pi(o_t | x, o_<t) under softmax(logits / temperature) for the last n_completion tokens
    of input_ids (B, L) (left-padded prompt + right-padded completion) -> (B, T) fp32
    [and entropy (B, T)]. The output head runs on chunks of `chunk` tokens, each checkpointed
    when grad is enabled, so only one chunk's fp32 logits exist at a time."""
    if not 0 < n_completion < input_ids.shape[1]:
        raise ValueError(f"n_completion={n_completion} must be in 1..{input_ids.shape[1] - 1} "
                         "(at least one prompt token precedes the completion)")
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L) positions under left pad
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=pos, use_cache=False).last_hidden_state  # (B, L, H)
    B, T = input_ids.shape[0], n_completion
    h = hidden[:, -T - 1:-1].reshape(B * T, -1)  # (B*T, H) states that predict the completion
    targets = input_ids[:, -T:].reshape(B * T)  # (B*T,)
    head = model.get_output_embeddings()
    outs = []
    for s in range(0, B * T, chunk):
        args = (h[s:s + chunk], targets[s:s + chunk], head.weight, getattr(head, "bias", None),
                temperature, with_entropy)
        if torch.is_grad_enabled():
            outs.append(checkpoint(_head_logprobs, *args, use_reentrant=False))
        else:
            outs.append(_head_logprobs(*args))
    if not with_entropy:
        return torch.cat(outs).view(B, T)
    return torch.cat([o[0] for o in outs]).view(B, T), torch.cat([o[1] for o in outs]).view(B, T)


@torch.no_grad()
def rollout(model, prompt_ids, prompt_mask, group_size, decode_cfg, eos_ids, pad_id):
    """G completions per prompt, groups contiguous: prompt_ids (N, P) -> decode.Rollout with
    tokens, mask, logp, entropy of shape (N*G, T) from the sampling pass itself."""
    import decode  # lazy: only sampling needs decode.py
    if getattr(decode_cfg, "greedy", False):
        raise ValueError("GRPO rollouts must sample; set greedy=False in the rollout DecodeConfig")
    ids = prompt_ids.repeat_interleave(group_size, 0)  # (N*G, P)
    am = prompt_mask.repeat_interleave(group_size, 0)  # (N*G, P)
    return decode.generate(model, ids, am, decode_cfg, eos_ids, pad_id, stats=True)


def make_batch(prompt_ids, prompt_mask, ro, advantages, group_size) -> dict:
    """Bundle a rollout for update(): prompts repeated per group, completions and their stats."""
    return {"prompt_ids": prompt_ids.repeat_interleave(group_size, 0),  # (B, P)
            "prompt_mask": prompt_mask.repeat_interleave(group_size, 0),  # (B, P)
            "tokens": ro.tokens, "mask": ro.mask.bool(),  # (B, T)
            "old_logp": ro.logp.float(), "entropy": ro.entropy.float(),  # (B, T)
            "advantages": advantages.float().to(ro.tokens.device)}  # (B,)


def _micro(batch, s, e):
    """Inputs of sequences s:e with all-pad prompt columns and completion tail trimmed."""
    pm, cm = batch["prompt_mask"][s:e], batch["mask"][s:e]
    p0 = int(pm.any(0).long().argmax())  # first prompt column used by any row (left pad)
    t = max(1, int(cm.sum(1).max()))  # longest completion in the micro-batch
    ids = torch.cat([batch["prompt_ids"][s:e, p0:], batch["tokens"][s:e, :t]], 1)  # (b, P'+t)
    am = torch.cat([pm[:, p0:].long(), cm[:, :t].long()], 1)  # (b, P'+t)
    return ids, am, t


def update(model, ref_model, optimizer, batch: dict, cfg: GRPOConfig, autocast_dtype=None) -> dict:
    """One GRPO optimisation step on a rollout batch (make_batch): entropy mask over the whole
    batch, micro-batches of cfg.micro_batch sequences whose losses are scaled so their sum is the
    full-batch mean, grad-norm clip, optimizer step. autocast_dtype: e.g. torch.bfloat16 on GPU."""
    if cfg.old_logp not in ("policy", "rollout"):
        raise ValueError(f"old_logp={cfg.old_logp!r}; use 'policy' (pi_old = the policy being updated) or 'rollout'")
    mask = batch["mask"]
    B = mask.shape[0]
    ent_mask = entropy_mask(batch["entropy"], mask, cfg.rho)  # (B, T)
    device = batch["tokens"].device
    optimizer.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "clip_frac": 0.0}
    n_tok = mask.sum().clamp(min=1).item()
    for s in range(0, B, cfg.micro_batch):
        e = min(s + cfg.micro_batch, B)
        ids, am, t = _micro(batch, s, e)
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with amp:
            logp = sequence_logprobs(model, ids, am, t, cfg.temperature, cfg.logit_chunk)  # (b, t)
            ref = None
            if cfg.beta > 0:
                with torch.no_grad():
                    ref = sequence_logprobs(ref_model, ids, am, t, cfg.temperature, cfg.logit_chunk)
        old = logp.detach() if cfg.old_logp == "policy" else batch["old_logp"][s:e, :t]
        loss, st = grpo_loss(logp, old, ref, batch["advantages"][s:e],
                             mask[s:e, :t], ent_mask[s:e, :t], cfg.eps, cfg.beta)
        (loss * (e - s) / B).backward()
        totals["loss"] += loss.item() * (e - s) / B
        share = mask[s:e].sum().item() / n_tok  # token-level stats: weight by valid tokens
        for k in ("kl", "clip_low", "clip_high", "clip_frac"):
            totals[k] += st[k] * share
    params = [p for p in model.parameters() if p.grad is not None]
    if dist.is_available() and dist.is_initialized():
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    kept = ent_mask.sum().item() / n_tok
    return {**totals, "grad_norm": float(grad_norm), "kept": kept}
